"""Session 45's benchmark review: the fixes to bench/ (federation processes left behind on SIGTERM, arms
overwriting each other's --out, rmtree of any --out, a federated arm covering fewer sites, step counts of the
DP benchmark, bare tracebacks on bad arguments, --seed/--threads of the local benchmark, the secagg docstring,
as-if arms of one clip only, the uplink shape check recorded only, the federated curve drawn per round).

Every test is fast and starts no federation and trains nothing: where a benchmark's main() is called, the
first step that would do real work is replaced by one that raises ``WouldRun``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench

BENCH_ROOT = Path(bench.__file__).resolve().parents[1]     # the folder holding the bench package under test


class WouldRun(Exception):
    """Raised where a benchmark would start real work (corpus, extraction, training, measuring)."""


def _would_run(*_a, **_k):
    raise WouldRun


def _run_main(monkeypatch, module: str, *argv: str):
    """``module``'s main() with ``argv``; returns the SystemExit code (WouldRun propagates)."""
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [module.split(".")[-1] + ".py", *argv])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    return exc.value.code


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(BENCH_ROOT), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------ 1. SIGTERM / SIGHUP stop the federation
SIGNAL_SCRIPT = """
import subprocess, sys, time
from pathlib import Path
import bench.deployment as deployment
from mllm_dr.processes import spawn

# the stop commands are stand-ins too (the real CLIs take seconds each): what must stop the detached
# process is __exit__'s stop by PID of every survivor, reached through the signal handler
deployment.cli = lambda *a, **k: subprocess.CompletedProcess(a, 0, "", "")
root = Path(sys.argv[1])
fed = deployment.LocalFederation(root, [Path("/nonexistent")])
stand_in = spawn(["sleep", "120"], root / "superlink.log", fed.center / "state" / "superlink.pid")
print(stand_in.pid, flush=True)
with fed:
    print("inside", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_benchmark_killed_inside_a_local_federation_stops_its_detached_processes(tmp_path, signum):
    """The SuperLink and SuperNodes start in sessions of their own: a benchmark killed with SIGTERM (kill,
    timeout, systemd) or SIGHUP (closed terminal) left them running, since cleanup was only in __exit__ and
    no handler turned the signal into an exception (a review, session 45)."""
    from mllm_dr.processes import alive

    script = tmp_path / "holder.py"
    script.write_text(SIGNAL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "fed")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=BENCH_ROOT)
    stand_in = None
    try:
        stand_in = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "inside", proc.stderr.read()
        proc.send_signal(signum)
        deadline = time.monotonic() + 15
        while alive(stand_in) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(stand_in), "the detached stand-in outlived the benchmark that started it"
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if stand_in and alive(stand_in):
            os.kill(stand_in, signal.SIGKILL)


def test_cli_all_leaves_no_child_running_when_interrupted(tmp_path, monkeypatch):
    """cli_all killed its siblings only on a timeout: Ctrl-C or a signal (Stopped) left them running."""
    import bench.deployment as deployment

    tool = tmp_path / "sleeper"
    tool.write_text("#!/bin/sh\nexec sleep 30\n")
    tool.chmod(0o755)
    monkeypatch.setattr(deployment, "BIN", tmp_path)
    started = []
    real_popen = subprocess.Popen

    class Recording(real_popen):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            started.append(self)

        def communicate(self, *a, **k):
            raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", Recording)
    try:
        with pytest.raises(KeyboardInterrupt):
            deployment.cli_all([("sleeper",), ("sleeper",)], timeout=5)
        assert len(started) == 2
        assert all(p.poll() is not None for p in started), "a child of cli_all is still running"
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_local_federation_stops_by_pid_what_its_stop_commands_left(tmp_path, monkeypatch):
    """__exit__ took no PIDs itself: what survived the stop commands was reported by stop() and dropped."""
    import bench.deployment as deployment
    from mllm_dr.processes import alive, spawn

    monkeypatch.setattr(deployment, "cli", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    fed = deployment.LocalFederation(tmp_path / "fed", [Path("/nonexistent")])
    stand_in = spawn(["sleep", "120"], tmp_path / "node.log", fed.workspace("site1") / "federation" / "supernode.pid")
    try:
        with fed:
            assert fed.pids() == [stand_in.pid]
        assert not alive(stand_in.pid)
    finally:
        if alive(stand_in.pid):
            stand_in.kill()
        stand_in.wait()


# ------------------------------------------------------------------ 2. one --out per federation run
def _report(folder: Path, arms: list[str], seeds: str = "0,1") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "federation.json").write_text(json.dumps({"config": {"arms": arms, "seeds": seeds}, "per_seed": []}))


def test_the_federation_benchmark_refuses_an_out_holding_another_arms_report(tmp_path):
    """Arms run one at a time with the same --out deleted each other's seed folders and replaced the
    federation.json that --merge needs. Refused (exit 2, one line) within seconds, nothing trained."""
    _report(tmp_path, ["local_only"])
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.federation", "--arms", "pooled", "--out", str(tmp_path),
                           # were it not refused, the cheapest failing run: no real base to train
                           "--participants", "2", "--sites", "1", "--seeds", "0", "--base-model", "/nonexistent"],
                          capture_output=True, text=True, timeout=120, cwd=BENCH_ROOT, env=_env())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "local_only" in proc.stderr and "--merge" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "seed0").exists()
    assert json.loads((tmp_path / "federation.json").read_text())["config"]["arms"] == ["local_only"]


@pytest.mark.parametrize("argv,refused", [
    (["--arms", "pooled"], True),                                   # another arm
    (["--arms", "local_only", "--seeds", "0"], True),               # other seeds
    (["--arms", "local-only"], False),                              # the same run again may replace its report
    (["--arms", "pooled", "--overwrite"], False)])                  # said so
def test_the_federation_benchmark_replaces_only_its_own_report(tmp_path, monkeypatch, argv, refused):
    import bench.federation as federation

    _report(tmp_path, ["local_only"])
    monkeypatch.setattr(federation, "one_seed", _would_run)
    monkeypatch.setattr(federation, "commit", lambda: None)
    if refused:
        assert _run_main(monkeypatch, "bench.federation", *argv, "--out", str(tmp_path)) == 2
    else:
        with pytest.raises(WouldRun):
            _run_main(monkeypatch, "bench.federation", *argv, "--out", str(tmp_path))


def test_the_federation_benchmark_refuses_an_out_another_run_is_using(tmp_path, monkeypatch):
    """Two runs at once in one --out: the second is refused while the first holds the lock (a flock on
    --out/federation.lock, as a run holds it)."""
    import fcntl

    import bench.federation as federation

    monkeypatch.setattr(federation, "one_seed", _would_run)
    monkeypatch.setattr(federation, "commit", lambda: None)
    with open(tmp_path / "federation.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert _run_main(monkeypatch, "bench.federation", "--arms", "pooled", "--out", str(tmp_path)) == 2
    with pytest.raises(WouldRun):          # released: the next run may go
        _run_main(monkeypatch, "bench.federation", "--arms", "pooled", "--out", str(tmp_path))


def test_an_exclusive_lock_refuses_a_second_holder(tmp_path, capsys):
    from bench.common import exclusive_lock

    with exclusive_lock(tmp_path, "x.lock"):
        with pytest.raises(SystemExit) as exc:
            with exclusive_lock(tmp_path, "x.lock"):
                pass
        assert exc.value.code == 2
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    with exclusive_lock(tmp_path, "x.lock"):
        pass


# ------------------------------------------------------------------ 3. never rmtree a foreign --out
def test_train_speed_refuses_to_delete_a_folder_it_did_not_write(tmp_path):
    """`--out bench/results` would have deleted the committed results."""
    (tmp_path / "keep.txt").write_text("results")
    proc = subprocess.run([sys.executable, "-m", "bench.train_speed", "--out", str(tmp_path), "--prepare-only",
                           "--participants", "2"], capture_output=True, text=True, timeout=120, cwd=BENCH_ROOT,
                          env=_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "results"


def _stop_real_work(monkeypatch):
    import bench.federation
    import bench.simulation
    import mllm_dr.evidence
    import mllm_dr.synth
    import transformers

    monkeypatch.setattr(mllm_dr.synth, "write_synthetic", _would_run)
    monkeypatch.setattr(mllm_dr.evidence, "default_encoder", _would_run)
    monkeypatch.setattr(bench.simulation, "run_point", _would_run)
    monkeypatch.setattr(bench.federation, "seed_corpora", _would_run)
    monkeypatch.setattr(bench.federation, "commit", lambda: None)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _would_run)


@pytest.mark.parametrize("module,folder,argv", [
    ("bench.train_speed", "", ["--prepare-only", "--participants", "2"]),
    ("bench.local_model", "", ["--participants", "2"]),
    ("bench.simulation", "", ["--baseline", "none", "--sweep", "tiny-random=2"]),
    ("bench.scoring", "", ["--base-model", "tiny-random"]),
    ("bench.evidence_selection", "", []),
    ("bench.random_base", "", ["--shape", "tiny", "--tokenizer", "/nonexistent"]),
    ("bench.dp_patient", "seed0", ["--seeds", "0"]),
    ("bench.federation", "seed0", ["--seeds", "0", "--arms", "pooled"])])
def test_no_benchmark_deletes_a_folder_it_did_not_write(tmp_path, monkeypatch, module, folder, argv):
    import torch

    _stop_real_work(monkeypatch)
    (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / folder / "keep.txt").write_text("results")
    threads = torch.get_num_threads()
    try:
        assert _run_main(monkeypatch, module, *argv, "--out", str(tmp_path)) == 2
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / folder / "keep.txt").read_text() == "results"


def test_a_fresh_output_folder_is_emptied_only_when_its_benchmark_made_it(tmp_path):
    from bench.common import MARKER, fresh_output

    out = fresh_output(tmp_path / "new", "bench.x")                 # made, marked
    (out / "old").mkdir()
    (out / "old" / "a.json").write_text("{}")
    (out / "b.txt").write_text("b")
    fresh_output(out, "bench.x", keep=("b.txt",))                   # its own: emptied but for what it keeps
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    for other in (lambda: fresh_output(out, "bench.y"),            # another benchmark's
                  lambda: fresh_output(tmp_path / "new" / "b.txt", "bench.x")):   # a file
        with pytest.raises(SystemExit) as exc:
            other()
        assert exc.value.code == 2
    assert (out / "b.txt").is_file()
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(SystemExit):
        fresh_output(tmp_path / "link", "bench.x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (fresh_output(empty, "bench.x") / MARKER).is_file()


# ------------------------------------------------------------------ 4. the federated arm covers every site
def _history(rounds=3, sites=("site1", "site2"), n=4, failed=None, site_n=None, missing_in_round=None):
    rs = [{"round": r, "stage": 1 if r == 1 else 2, "train_loss": 1.0 / r, "round_seconds": 10.0,
           "validation": {"global_round": r - 1, "ccc": 0.1 * r, "mae": 5.0}, "rejected": {}, "sites": {s: {"bytes_up": 100 * r, "examples": 16} for s in sites
                                     if not (missing_in_round and (r, s) == missing_in_round)}}
          for r in range(1, rounds + 1)]
    return {"rounds": rs, "evaluation": {"round": rounds, "pooled": {"n": n, "ccc": 0.5},
                                         "sites": {s: {"n": (site_n or {}).get(s, 2), "ccc": 0.4} for s in sites
                                                   if s not in (failed or {})},
                                         "failed": failed or {}}}


def _rows():
    return {s: [{"participant": f"{s}-{i}", "true": 5 + i, "pred": 6 + i} for i in range(2)] for s in ("site1", "site2")}


def test_the_federated_arm_reads_every_site_and_puts_each_round_at_its_epochs():
    from bench.federation import federated_result

    res = federated_result(_history(), _rows(), local_epochs=3)
    assert res["pooled_over_sites"]["n"] == 4 and len(res["rows"]) == 4
    assert {r["site"] for r in res["rows"]} == {"site1", "site2"}
    curve = res["curves"]["federated"]
    assert [p["step"] for p in curve] == [1, 2, 3] and [p["epochs"] for p in curve] == [3, 6, 9]
    assert res["bytes_up_per_site"] == {1: 100, 2: 300} and res["epochs_per_round"] == 3
    # steps per round: steps x batch size / the sites' mean training examples
    steps = federated_result(_history(), _rows(), local_epochs=1, local_steps=8, batch_size=1)
    assert [p["epochs"] for p in steps["curves"]["federated"]] == [0.5, 1.0, 1.5]


@pytest.mark.parametrize("hist,says", [
    (_history(failed={"site2": "no reply"}, n=2), "site2 failed the evaluation"),
    (_history(n=2, site_n={"site2": 0}), "withholds"),              # under min_release_participants
    (_history(n=3), "pooled evaluation counts 3"),
    (_history(missing_in_round=(2, "site1")), "round 2 aggregated without site1")])
def test_the_federated_arm_fails_when_it_covers_fewer_sites(hist, says):
    """The benchmark ignored the evaluation's ``failed`` and never compared its n with the rows: the arm
    could be read on fewer sites than the local arms, silently."""
    from bench.federation import federated_result

    with pytest.raises(SystemExit, match=says):
        federated_result(hist, _rows(), local_epochs=1)


def test_the_federation_benchmark_pins_the_release_floor_of_its_sites(monkeypatch):
    import policies.schema as schema
    from bench.federation import _policies

    strict = schema.load_policy().model_copy(update={"min_release_participants": 5})
    monkeypatch.setattr(schema, "load_policy", lambda *a: strict)
    pols = _policies([Path("a"), Path("b")])
    assert set(pols) == {"site1", "site2"}
    assert all(p["min_release_participants"] == 1 and p["min_participants"] == 2 for p in pols.values())


# ------------------------------------------------------------------ 5. DP benchmark: steps per epoch
def test_the_dp_benchmark_reports_the_plain_trainers_steps_beside_dp_sgds():
    """The docstring said DP-SGD takes the plain trainer's number of steps per epoch: 16 against 24 at 19
    patients, 8 per step, batches of 8."""
    import bench.dp_patient as dp_patient
    from mllm_dr.config import DEFAULT_MODEL, TrainConfig
    from mllm_dr.phq import PHQ8_ITEMS

    exs = [SimpleNamespace(instance=SimpleNamespace(participant=f"p{k:02d}", item=item))
           for k in range(19) for item in PHQ8_ITEMS]
    args = SimpleNamespace(stage1_epochs=1, stage2_epochs=6, step="item", patients_per_step=8.0)
    budget = dp_patient.epoch_budget(args, {1: exs, 2: exs}, 8 / 19, TrainConfig(batch_size=8), DEFAULT_MODEL)
    assert budget["epoch"]["stage2"] == {"dp_steps": 16, "plain_steps": 24, "plain_examples": 152,
                                         "dp_expected_examples": 128.0}
    assert budget["steps"] == 7 * 16 and budget["plain_steps"] == 7 * 24
    assert "the same number of them per epoch" not in dp_patient.__doc__


# ------------------------------------------------------------------ 6. bad arguments: argparse's one line
@pytest.mark.parametrize("module,argv", [
    ("bench.federation", ["--seeds", "a"]),
    ("bench.aggregation", ["--sites", "3,x"]),
    # the cheapest failing run, were they accepted (the old code ran run_sites before dividing by 0)
    ("bench.aggregation", ["--old-layers", "0", "--shape", "smollm2", "--layers", "1", "--sites", "2", "--repeats", "1"]),
    ("bench.aggregation", ["--repeats", "0", "--shape", "smollm2", "--layers", "1", "--sites", "2"]),
    ("bench.simulation", ["--sweep", "foo"]),
    ("bench.dp_patient", ["--epsilons", "x"]),
    ("bench.secagg", ["--sites", "x"]),
    ("bench.uplink", ["--shapes", "foo"]),
    ("bench.train_speed", ["--participants", "0"])])
def test_a_bad_argument_ends_in_one_line_not_a_traceback(tmp_path, module, argv):
    out = [] if module == "bench.aggregation" else ["--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", module, *argv, *out], capture_output=True, text=True, timeout=120,
                          cwd=BENCH_ROOT, env=_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"argument {argv[0]}" in proc.stderr.strip().splitlines()[-1]


def test_the_shared_parsers():
    import argparse

    from bench.common import as_text, comma_list, non_negative_int, positive_int, positive_number_list

    assert comma_list(positive_int)("3, 10,50") == [3, 10, 50]
    assert positive_number_list("1,inf") == [1.0, float("inf")]
    assert as_text(positive_number_list)("0.5,1") == "0.5,1"
    assert comma_list(positive_int, allow_empty=True)("") == []
    for parse, text in ((positive_int, "0"), (non_negative_int, "-1"), (positive_number_list, "1,nan"),
                        (comma_list(positive_int), ""), (comma_list(int, unique=True), "1,1")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


# ------------------------------------------------------------------ 7. local benchmark: --seed, --threads
def test_the_local_benchmark_trains_with_its_seed_and_threads(tmp_path, monkeypatch):
    """--seed changed the corpus only (training used TrainConfig's default seed); the threads line did
    nothing (max(torch.get_num_threads(), 1))."""
    import torch

    import bench.local_model
    import mllm_dr.synth

    monkeypatch.setattr(mllm_dr.synth, "write_synthetic", _would_run)
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(sys, "argv", ["local_model.py", "--threads", "1", "--out", str(tmp_path / "o")])
        with pytest.raises(WouldRun):
            bench.local_model.main()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    from bench.local_model import parser, train_configs

    zero_shot, trained = train_configs(parser().parse_args(["--seed", "7", "--stage2-epochs", "3"]))
    assert zero_shot.seed == trained.seed == 7 and trained.stage2_epochs == 3
    src = Path(bench.local_model.__file__).read_text()
    assert '"seed": args.seed' in src and '"threads": torch.get_num_threads()' in src      # in the JSON


# ------------------------------------------------------------------ 8. secagg's docstring
def test_the_secagg_benchmark_says_it_runs_plain_masked_masked_plain():
    import bench.secagg

    doc = " ".join(bench.secagg.__doc__.split())
    assert "one plain run and one masked run" not in doc
    assert "plain, masked, masked, plain" in doc and "A B B A" in doc


# ------------------------------------------------------------------ 9. every clip's as-if arms; uplink shapes
def test_the_as_if_arms_run_at_every_clip(monkeypatch):
    import bench.dp_patient as dp_patient

    monkeypatch.setattr(dp_patient, "noise_for", lambda eps, delta, rate, steps: 2.0)
    args = SimpleNamespace(clips=[0.5, 1.0], direct=False, direct_epsilons=[8.0], epsilons=[8.0, float("inf")],
                           as_if_patients=[500], delta=1e-5)
    arms = {name: (clip, z) for name, clip, z, _ in dp_patient.dp_arms(args, 0.4, 100, 20)}
    assert arms == {"eps=8@500,clip=0.5": (0.5, 2.0 * 20 / 500), "eps=8@500,clip=1": (1.0, 2.0 * 20 / 500)}
    one = SimpleNamespace(**vars(args) | {"clips": [1.0], "direct": True})
    assert [a[0] for a in dp_patient.dp_arms(one, 0.4, 100, 20)] == ["eps=8", "eps=8@500"]


def test_the_uplink_benchmark_stops_when_its_shapes_are_not_a_real_site_models(tmp_path, monkeypatch):
    """``shapes_match_a_real_site_model`` was only recorded: a false one went on to measure other tensors."""
    import bench.uplink as uplink

    monkeypatch.setattr(uplink, "real_tiny_stage2", lambda: {"maa.x": (1, 2)})
    monkeypatch.setattr(uplink, "measure", _would_run)
    monkeypatch.setattr(uplink.torch, "set_num_threads", lambda n: None)
    code = _run_main(monkeypatch, "bench.uplink", "--shapes", "tiny-random", "--out", str(tmp_path))
    assert code not in (0, None) and "does not match a real tiny-random site model" in str(code)


# ------------------------------------------------------------------ 10. the federated curve at its epochs
def test_the_figure_draws_federated_rounds_at_the_epochs_they_trained(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.plots import federation_figure

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    local = {"curves": {"site1": [{"step": e, "stage": 2, "train_loss": 1.0, "check_ccc": 0.1} for e in range(1, 10)]},
             "rows": [{"true": 5, "pred": 6}]}
    # what federated_result stores at 3 local epochs a round
    fed = {"curves": {"federated": [{"step": r, "epochs": 3 * r, "stage": 2, "train_loss": 1.0 / r, "check_ccc": 0.1}
                                    for r in (1, 2, 3)]}, "epochs_per_round": 3, "rows": [{"true": 5, "pred": 6}]}
    federation_figure([{"seed": 0, "local_only": local, "federated": fed}], tmp_path / "f.png")
    xs = {line.get_label(): list(line.get_xdata()) for line in figures[-1].axes[0].lines}
    assert xs["federated seed 0"] == [3, 6, 9] and xs["local_only site1 seed 0"] == list(range(1, 10))
    # a report written before the curve carried its epochs: the run's --local-epochs places its rounds
    old = json.loads(json.dumps(fed))
    for p in old["curves"]["federated"]:
        del p["epochs"]
    del old["epochs_per_round"]
    federation_figure([{"seed": 0, "federated": old}], tmp_path / "g.png", local_epochs=3)
    assert list(figures[-1].axes[0].lines[0].get_xdata()) == [3, 6, 9]
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)
