"""Session 47, one owner per fact: work that was done twice is done once, with the same results.

1. Ignoring the stop signals while child processes are stopped: ``mllm_dr.processes.unsignalled`` for both the
   rehearsal (``fl_server.simulation``) and the foreground services (``cli.common.hold_foreground``).
2. Under exact-lora with sites at their own LoRA rank, the SVD of each of the global's layers is computed once a
   round (``aggregation.GlobalSVD``), not once per such site in the screening and again in the combination.
Each part counts the repeated work with a wrapper around the real function and compares the results with the
old code's way on the same inputs. All in-process, no Flower processes."""

from __future__ import annotations

import os
import signal

import pytest

import mllm_dr.processes as processes


# ----------------------------------------------------------------------------- 1. one owner: unsignalled
@pytest.fixture
def handlers():
    """The stop signals' and Ctrl-C's handlers put back after the test, whatever it set."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.getsignal(s) for s in sigs}
    signal.signal(signal.SIGINT, signal.default_int_handler)   # a background run (CI) starts with SIGINT ignored
    yield
    for s, h in before.items():
        signal.signal(s, h)


class Raised(BaseException):
    pass


def _raise(signum, _frame):
    raise Raised(signum)


def test_a_signal_during_the_step_is_ignored_and_the_handlers_come_back(handlers):
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise)
    seen = {}

    def step():
        seen["during"] = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        os.kill(os.getpid(), signal.SIGTERM)             # a second signal while the processes are stopped
        os.kill(os.getpid(), signal.SIGHUP)
        return 42

    assert processes.unsignalled(step) == 42
    assert seen["during"][signal.SIGTERM] == seen["during"][signal.SIGHUP] == signal.SIG_IGN
    assert seen["during"][signal.SIGINT] is not signal.SIG_IGN          # the rehearsal's: Ctrl-C still interrupts
    assert signal.getsignal(signal.SIGTERM) is _raise and signal.getsignal(signal.SIGHUP) is _raise

    def failing():
        raise ValueError("the stop failed")

    with pytest.raises(ValueError):
        processes.unsignalled(failing)
    assert signal.getsignal(signal.SIGTERM) is _raise                   # restored when the step raises too


def test_off_the_main_thread_the_step_runs_as_it_is(handlers):
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", processes.unsignalled(lambda: signal.getsignal(
        signal.SIGTERM))))
    signal.signal(signal.SIGTERM, _raise)
    t.start()
    t.join()
    assert out["r"] is _raise


def _counted(monkeypatch, module, calls: list):
    real = processes.unsignalled

    def counting(step, *args, **kwargs):
        calls.append((args, kwargs))
        return real(step, *args, **kwargs)

    monkeypatch.setattr(module, "unsignalled", counting)


def test_hold_foreground_goes_through_unsignalled_and_keeps_its_exact_handlers(handlers, monkeypatch, tmp_path):
    """The old ``hold_foreground``: SIGINT, SIGTERM and SIGHUP ignored while ``stop`` runs (also a second Ctrl-C);
    afterwards SIGINT back to Python's default (KeyboardInterrupt), SIGTERM and SIGHUP left ignored for
    ``stop_on_signals`` to restore."""
    from cli.common import hold_foreground, stop_on_signals
    from mllm_dr.errors import InputError

    calls: list = []
    _counted(monkeypatch, processes, calls)
    during = {}

    def stop():
        during.update({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)})
        os.kill(os.getpid(), signal.SIGINT)              # a second Ctrl-C does not cut the stop short
        os.kill(os.getpid(), signal.SIGTERM)

    dead = 2 ** 22 + 1                                    # above pid_max's default: no such process
    with stop_on_signals():
        outer = signal.getsignal(signal.SIGTERM)
        with pytest.raises(InputError, match="exited"):
            hold_foreground(dead, "SuperLink on x", tmp_path / "log", stop)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is not outer                 # stop_on_signals put back the one before
    assert set(during.values()) == {signal.SIG_IGN} and len(during) == 3
    assert len(calls) == 1


def test_the_rehearsal_stops_its_processes_through_unsignalled(handlers, monkeypatch, fake_rehearsal):
    """The rehearsal's own copy (``simulation._unsignalled``) is gone; its stop goes through the one helper with
    SIGTERM and SIGHUP ignored (not Ctrl-C) and both restored afterwards."""
    import fl_server.simulation as simulation

    assert not hasattr(simulation, "_unsignalled")
    calls: list = []
    _counted(monkeypatch, simulation, calls)
    go, seen = fake_rehearsal
    signal.signal(signal.SIGTERM, _raise)
    go(KeyboardInterrupt())
    during = seen["handlers_at_stop"]
    assert len(calls) == 1
    assert during[signal.SIGTERM] == during[signal.SIGHUP] == signal.SIG_IGN
    assert during[signal.SIGINT] is not signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is _raise


# ----------------------------------------------------------------------------- 2. the global's SVD, once a round
def _own_rank_round(layers=3, d=40, ranks=(16, 16, 8, 4), seed=4):
    """A rank-16 global of ``layers`` LoRA layers and one update per site of ``ranks``, each a step from where it
    started (the global re-expressed at its rank); their scalings and the global's."""
    import torch

    from mllm_dr.aggregation import resize_lora
    from mllm_dr.config import LoRAConfig

    g = torch.Generator().manual_seed(seed)
    run = LoRAConfig(r=16, alpha=32)
    glob = {"maa.w": torch.randn(4, generator=g)}
    for i in range(layers):
        glob[f"lora.l{i}.q_proj.lora_A.weight"] = torch.randn(16, d, generator=g) * 0.1
        glob[f"lora.l{i}.q_proj.lora_B.weight"] = torch.randn(d, 16, generator=g) * 0.1
    scalings = [run.at_rank(r).scaling for r in ranks]
    ups = []
    for r, sc in zip(ranks, scalings):
        start = glob if r == 16 else resize_lora(glob, r, run.scaling, sc)
        ups.append({n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in start.items()})
    return glob, ups, scalings, run.scaling


@pytest.fixture
def global_svds(monkeypatch):
    """(layer B tensor's name) per SVD of the global alone (a wrapper around the real ``low_rank_product_svd``)."""
    import mllm_dr.aggregation as agg

    calls: list = []
    real = agg.low_rank_product_svd

    def counting(bs, as_, coefs):
        if len(bs) == 1:
            calls.append(bs[0])
        return real(bs, as_, coefs)

    monkeypatch.setattr(agg, "low_rank_product_svd", counting)
    return calls


@pytest.mark.parametrize("server_lr", [1.0, 1.5])
def test_the_globals_svd_is_computed_once_a_layer_and_the_round_is_bit_identical(global_svds, monkeypatch, server_lr):
    """Before: the screening re-expressed the global at each own-rank site's rank (an SVD of every layer per
    such site) and ``own_rank_corrections`` took the SVD of every layer again: (sites below the global's rank + 1)
    SVDs a layer. Now one ``GlobalSVD`` a round: one a layer, and the same norms and global, bit for bit."""
    import torch

    import mllm_dr.aggregation as agg

    glob, ups, scalings, s = _own_rank_round()              # ranks 16, 16, 8, 4: two sites below the global's
    layers = sum(1 for n in glob if "lora_A" in n)

    def round_(svd):
        global_svds.clear()
        screened = agg.screen_updates(ups, glob, 3.0, scalings, s, reference_svd=svd)
        kept = screened.accepted
        res = agg.exact_lora([ups[i] for i in kept], [10.0 + i for i in kept], [scalings[i] for i in kept], 16, s,
                             reference=glob, server_lr=server_lr, reference_svd=svd)
        return screened, res, list(global_svds)

    def uncached(self, a_name, b_name):                     # the old code: every use took its own SVD
        return agg.low_rank_product_svd([self.state[b_name]], [self.state[a_name]], [self.scaling])

    with monkeypatch.context() as m:
        m.setattr(agg.GlobalSVD, "layer", uncached)
        old_screen, old, old_calls = round_(None)
    assert len(old_calls) == layers * (2 + 1) and old_screen.accepted == [0, 1, 2, 3]
    assert len(round_(None)[2]) == layers * 2              # none handed over: the screening's and the combination's
    new_screen, new, new_calls = round_(agg.GlobalSVD(glob, s))
    assert len(new_calls) == layers                         # one handed over: once a layer
    assert all(sum(t is glob[n] for t in new_calls) == 1 for n in glob if "lora_B" in n)
    assert new_screen.norms == old_screen.norms and new_screen.rejected == old_screen.rejected
    assert new.state.keys() == old.state.keys() and all(torch.equal(new.state[n], old.state[n]) for n in old.state)
    assert (new.residual, new.method) == (old.residual, old.method)


def test_a_global_svd_of_another_state_is_refused():
    from mllm_dr.aggregation import GlobalSVD, screen_updates

    glob, ups, scalings, s = _own_rank_round(layers=1)
    with pytest.raises(ValueError, match="another state or scaling"):
        screen_updates(ups, glob, 3.0, scalings, s, reference_svd=GlobalSVD(dict(glob), s))
    with pytest.raises(ValueError, match="another state or scaling"):
        screen_updates(ups, glob, 3.0, scalings, s, reference_svd=GlobalSVD(glob, 2 * s))


def test_the_center_takes_the_globals_svd_once_a_layer_a_round(tmp_path, flower_task, global_svds):
    """The strategy hands one ``GlobalSVD`` to its screening and its combination: with two sites at rank 1 of a
    rank-2 run, the global's one layer has one SVD in the round (three before)."""
    import torch
    from test_federation_units import _replies, _strategy

    g = torch.Generator().manual_seed(0)
    strat = _strategy(tmp_path, aggregation="exact-lora", **{"lora-rank": 2})
    a_name, b_name = "lora.l.q_proj.lora_A.weight", "lora.l.q_proj.lora_B.weight"
    strat.state = strat.state | {a_name: torch.randn(2, 3, generator=g), b_name: torch.randn(3, 2, generator=g)}
    glob_b = strat.state[b_name]

    def near(rank, step=0.01):
        return {"maa.v": torch.zeros(2), a_name: strat.state[a_name][:rank] + step * torch.randn(rank, 3, generator=g),
                b_name: strat.state[b_name][:, :rank] + step * torch.randn(3, rank, generator=g)}

    strat.aggregate_train(2, _replies({11: near(2), 12: near(1), 13: near(1)}))
    assert strat.folder.history()["rounds"][-1]["rejected"].keys() == {"site-d", "site-e"}    # no reply: 14, 15
    assert sum(t is glob_b for t in global_svds) == 1
