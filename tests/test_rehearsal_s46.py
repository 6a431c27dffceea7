"""Session 46, a review of the consortium rehearsal (`mllmdr-center simulate`): a signal stops every process;
one rehearsal per folder (a lock) and a SuperLink start that trusts only its own process; Ray checked before
any temporary folder, a failed rehearsal's temporary folder removed; a dropout rate that drops no site, or
dropouts under secure aggregation, refused; a slow log fetch never hides the run's outcome; a stopped run's
history marked failed; leftover processes named, exit 2; peak memory as PSS. All in-process, no Flower."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import fl_server.simulation as simulation
import fl_server.superlink as superlink
from cli.common import Stopped
from mllm_dr.errors import InputError
from mllm_dr.processes import ProcessError
from mllm_dr.rehearsal import REHEARSAL_FILE, Preparation, Rehearsal, read_folder

PLAN = {"run-name": "rehearsal-x", "base-model": "tiny-random"}
LOCK_FILE = "rehearsal.lock"


def _simulate(*args: str):
    from cli.center import app

    return CliRunner().invoke(app, ["simulate", "--sites", "3", *args])


def _completed_out(root, **extra) -> dict:
    return {"sites": 3, "base_model": "tiny-random", "run": "rehearsal-x", "dir": str(root),
            "flower_status": "finished:completed", "status": "completed", "error": None, "prepare_seconds": 1.0,
            "run_seconds": 2.0, "round_seconds": [1.0], "rounds_per_minute": 60.0, "peak_rss_bytes": 2,
            "peak_memory_bytes": 1, "memory_measure": "pss", "actors": 2, "dropouts": {}, "site_policy_holders": [],
            "rejected": {"1": {}}, "stray_pids": [], "joined": 3, "not_joined": [], "evaluation": None,
            "log": str(root / "run.log"), **extra}


# ------------------------------------------------- 1 + 3. a signal reaches `rehearse`; its temporary folder goes
def test_simulate_turns_sigterm_into_stopped_and_removes_its_temporary_folder(tmp_path, monkeypatch):
    """Before: SIGTERM killed `simulate` outright (no finally ran: the SuperLink, flwr-simulation and Ray, in
    their own session, kept running), and a failed rehearsal left its /tmp/mllmdr-rehearsal-* folder."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = {}

    def rehearse(root, *args, **kwargs):
        seen["root"] = root
        (root / "rehearsal.json").write_text("{}")          # what a preparation cut short leaves
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), f"SIGTERM is not handled while rehearsing ({handler!r})"
        handler(signal.SIGTERM, None)                       # what the signal does: raises Stopped here

    monkeypatch.setattr(simulation, "rehearse", rehearse)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped):                               # a BaseException: CliRunner lets it through
        _simulate()
    assert signal.getsignal(signal.SIGTERM) == before          # restored
    assert seen["root"].parent == tmp_path and not seen["root"].exists()
    assert list(tmp_path.glob("mllmdr-rehearsal-*")) == []


def test_a_failed_rehearsal_keeps_its_temporary_folder_only_when_a_run_started_there_and_says_so(tmp_path,
                                                                                                  monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def rehearse(root, *args, **kwargs):
        (root / "center" / "runs" / "rehearsal-x").mkdir(parents=True)
        raise ProcessError("the SuperLink went away")

    monkeypatch.setattr(simulation, "rehearse", rehearse)
    result = _simulate()
    assert isinstance(result.exception, ProcessError)
    kept = list(tmp_path.glob("mllmdr-rehearsal-*"))
    assert len(kept) == 1 and "the rehearsal folder is kept" in result.output


# ------------------------------------------- 1 + 6. the `finally` of `rehearse`: processes stopped, history ended
# (`fake_rehearsal`: tests/conftest.py)
@pytest.mark.parametrize("during_run, said", [(superlink.RunTimedOut("run 7 did not finish"), "--timeout 1800 s"),
                                              (KeyboardInterrupt(), "interrupted (Ctrl-C)"),
                                              (Stopped("SIGTERM"), "Stopped: SIGTERM")])
def test_a_stopped_rehearsal_stops_its_processes_and_marks_its_run_failed(fake_rehearsal, during_run, said):
    """Before: the history stayed "running" after --timeout, Ctrl-C or a signal (the processes were stopped)."""
    go, calls = fake_rehearsal
    hist = go(during_run)
    assert calls["stop"] == 1
    assert hist["status"] == "failed" and hist["error"] == f"stopped by 'mllmdr-center simulate': {said}"


def test_processes_left_after_a_failed_rehearsal_are_named(fake_rehearsal):
    go, calls = fake_rehearsal
    calls["stray"] = [4242]
    go(superlink.RunTimedOut("run 7 did not finish"), warn=calls["warned"].append)
    assert len(calls["warned"]) == 1 and "PID 4242" in calls["warned"][0] and "kill 4242" in calls["warned"][0]


# --------------------------------------------------------------------- 7. leftover processes: named, exit 2
def test_simulate_names_leftover_processes_and_fails(tmp_path, monkeypatch):
    """Before: `stray_pids` was in the JSON and the command exited 0."""
    monkeypatch.setattr(simulation, "rehearse", lambda root, *a, **k: _completed_out(root, stray_pids=[4242, 4243]))
    result = _simulate("--dir", str(tmp_path / "r"), "--json")
    assert isinstance(result.exception, ProcessError), result.exception
    assert "PID 4242, 4243" in str(result.exception)
    assert json.loads(result.stdout)["stray_pids"] == [4242, 4243]          # the output came first
    monkeypatch.setattr(simulation, "rehearse", lambda root, *a, **k: _completed_out(root))
    assert _simulate("--dir", str(tmp_path / "r")).exit_code == 0           # none left: exit 0


# ------------------------------------------------------------------------- 2. one rehearsal per folder
def test_a_second_rehearsal_of_a_locked_folder_is_refused_and_changes_nothing(tmp_path, monkeypatch):
    """Before: no lock; the second rewrote rehearsal.json and stopped the first one's processes."""
    root = tmp_path / "r"
    Rehearsal(workspaces=[], preparation=Preparation(sites=3, participants=4, seed=0)).write(root / REHEARSAL_FILE)
    record = (root / REHEARSAL_FILE).read_bytes()
    monkeypatch.setattr(simulation, "ray_available", lambda: True)

    def prepared(*args):
        raise AssertionError("prepared a folder another rehearsal holds")

    monkeypatch.setattr(simulation, "_prepared", prepared)
    with open(root / LOCK_FILE, "a") as held:                  # the first rehearsal (another open: flock conflicts)
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another 'mllmdr-center simulate' is using this rehearsal folder") as err:
            simulation.rehearse(root, 3, PLAN)
    assert err.value.path == str(root.resolve())
    assert (root / REHEARSAL_FILE).read_bytes() == record
    # released: the lock file alone is no content, and a folder with a record and the lock file is a rehearsal's
    assert read_folder(root) is not None
    (root / REHEARSAL_FILE).unlink()
    assert read_folder(root) is None


def test_the_simulation_superlink_trusts_only_its_own_process(tmp_path, monkeypatch):
    """Before: another rehearsal's SuperLink answering on the port was taken for this one's, whose own process
    had exited; its stop() then killed the other's processes."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))    # Ray's folder (stop(), which removes it, is faked)
    real_spawn = simulation.spawn

    def spawn(cmd, log, pidfile, env=None, cwd=None):
        proc = real_spawn(["true"], log, pidfile, env=env, cwd=cwd)
        proc.wait()                                            # it exited (its port was taken)
        return proc

    monkeypatch.setattr(simulation, "ray_available", lambda: True)
    monkeypatch.setattr(simulation, "spawn", spawn)
    monkeypatch.setattr(simulation, "superlink_command", lambda center: ["flower-superlink"])
    monkeypatch.setattr(simulation.SimulationLink, "_answers", lambda self: True)      # someone else answers
    stopped = []
    monkeypatch.setattr(simulation.SimulationLink, "stop", lambda self: stopped.append(1) or [])
    center = SimpleNamespace(state_dir=tmp_path / "state", root=tmp_path)
    link = simulation.SimulationLink(center, tmp_path / REHEARSAL_FILE)
    with pytest.raises(ProcessError, match="process exited with code 0"):
        link.start(timeout=10)
    assert stopped == [1]


# ------------------------------------------------------------ 3, 4, 9. check_plan refuses in one line
def test_check_plan_refuses_without_ray_and_simulate_makes_no_temporary_folder(tmp_path, monkeypatch):
    """Before: Ray was checked after every site was prepared, in a temporary folder never removed."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(simulation, "ray_available", lambda: False)
    with pytest.raises(InputError, match=r"needs Ray: pip install 'mllm-dr\[simulation\]'"):
        simulation.check_plan(tmp_path / "r", 3, PLAN)
    monkeypatch.setattr(simulation, "rehearse", lambda *a, **k: pytest.fail("rehearsed without Ray"))
    result = _simulate()
    assert isinstance(result.exception, InputError) and "needs Ray" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_a_dropout_rate_that_drops_no_site_is_refused(tmp_path):
    """Before: 0.1 of 5 sites rounded to no dropout at all, silently."""
    with pytest.raises(InputError, match=r"--dropout-rate 0.1 of 5 site\(s\) drops no site; use at least 0.2"):
        simulation.check_plan(tmp_path, 5, PLAN, dropout_rate=0.1)
    _, dropouts = simulation.check_plan(tmp_path, 5, PLAN, dropout_rate=0.2)
    assert dropouts and all(len(v) == 1 for v in dropouts.values())
    assert simulation.check_plan(tmp_path, 5, PLAN, dropout_rate=0.0)[1] == {}


def test_dropouts_under_secure_aggregation_are_refused(tmp_path):
    """Before: accepted; every rehearsed dropout came after the key exchange and failed its round."""
    from policies.schema import load_policy

    policy = load_policy().model_dump()
    policy["secagg"]["enabled"] = True
    plan = {**PLAN, "aggregation": "ffa-lora", "policy": json.dumps(policy)}
    run_plan, _ = simulation.check_plan(tmp_path, 5, plan)                  # the plan itself is fine
    assert run_plan.secagg.enabled
    with pytest.raises(InputError, match="a rehearsed dropout happens after the key exchange, which fails the round"):
        simulation.check_plan(tmp_path, 5, plan, dropout_rate=0.2)


# ---------------------------------------------------------------------- 5. the run's log, best effort
def test_a_slow_or_missing_log_fetch_gives_what_came_back_and_a_note(tmp_path, monkeypatch):
    """Before: TimeoutExpired escaped from the `finally` that fetches it (a completed rehearsal: exit 3)."""
    center = SimpleNamespace(state_dir=tmp_path, root=tmp_path, pki=tmp_path,
                             config=SimpleNamespace(address="127.0.0.1:9"))

    def slow(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], output=b"ServerApp started\n", stderr=None)

    monkeypatch.setattr(superlink.subprocess, "run", slow)
    text = superlink.run_log(center, 7)
    assert text.startswith("ServerApp started\n") and "'flwr log 7' gave no complete answer within 60 s" in text

    def missing(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(superlink.subprocess, "run", missing)
    assert "'flwr log 7' could not run: No such file or directory" in superlink.run_log(center, 7)


# ------------------------------------------------------------------------------------- 8. memory as PSS
def test_peak_memory_counts_shared_pages_once(monkeypatch):
    pss, rss, measure = simulation.tree_memory(os.getpid())
    assert measure == "pss" and 0 < pss <= rss
    with simulation.PeakMemory(os.getpid(), interval=0.05) as memory:
        time.sleep(0.2)
    assert 0 < memory.peak_pss <= memory.peak and memory.measure == "pss"
    # where smaps_rollup cannot be read, VmRSS stands in, and the measure says so
    monkeypatch.setattr(simulation, "_kib_fields", lambda path, names: {} if "smaps" in path else {"VmRSS:": 4096})
    pss, rss, measure = simulation.tree_memory(os.getpid())
    assert measure == "rss" and pss == rss and rss % 4096 == 0 and rss > 0
