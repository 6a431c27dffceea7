import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
BIN = Path(sys.executable).parent

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_cli(tool: str, *args: str, check: bool = True, timeout: float = 600, env: dict | None = None):
    """Run a real console script; returns CompletedProcess. Never a traceback on stderr."""
    proc = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    return proc


def cli_json(tool: str, *args: str, **kw):
    return json.loads(run_cli(tool, *args, "--json", **kw).stdout)


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, logs=()) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` after ``timeout`` seconds.

    With ``proc`` (a command the test started) fail as soon as it exits, and on any failure
    show its output and the last lines of ``logs``: a failure says why, not only that it waited.
    """
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"waiting for {what}: the command exited with code {proc.returncode}"
                                 + _what_it_said(proc, logs))
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + _what_it_said(proc, logs))


def _what_it_said(proc: subprocess.Popen | None, logs, lines: int = 15) -> str:
    """The command's stdout/stderr (stopped first if still running) and the tails of ``logs``
    (``mllm_dr.processes._tail``, as the kit's own start-up errors show them)."""
    from mllm_dr.processes import _tail

    out = []
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        stdout, stderr = proc.communicate(timeout=30)
        out += [f"--- stdout:\n{stdout}", f"--- stderr:\n{stderr}"]
    out += [f"--- log{_tail(Path(log), lines) or f' {log}: (absent or empty)'}" for log in logs]
    return ("\n" + "\n".join(out)) if out else ""


@pytest.fixture
def fixture_copy(tmp_path):
    def _copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return dst
    return _copy


@pytest.fixture(scope="session")
def synth_site(tmp_path_factory):
    from mllm_dr.synth import SynthConfig, write_synthetic

    out = tmp_path_factory.mktemp("synth")
    return write_synthetic(SynthConfig(out, "edaic", participants=8, sites=2, seed=1, seconds=3.0))


@pytest.fixture(scope="session")
def tiny():
    from mllm_dr.base_model import load_base

    return load_base("tiny-random")


@pytest.fixture
def flower_task():
    """Flower's per-process task identity, so Messages can be built and handlers called in-process."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.fixture(scope="module")
def scored_ws(tmp_path_factory, synth_site):
    """A workspace with features and zero-shot local adapters on the test model (no training: quick); one per
    test module that uses it (test_clinician_safety, test_clinician_s44)."""
    from mllm_dr.config import ModelConfig, TrainConfig
    from mllm_dr.corpus import read_corpus
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.local_run import train_local
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path_factory.mktemp("clinician") / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(synth_site[0]), "edaic"
    ws.save()
    extract_corpus(read_corpus(synth_site[0]), FeatureStore(ws.features_dir), ws.config.extraction)
    train_local(ws, "tiny-random", ModelConfig(), TrainConfig(), zero_shot=True)
    return ws


@pytest.fixture
def logged(tmp_path):
    """A fresh workspace whose audit log holds five `score` entries."""
    from mllm_dr import audit
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    for i in range(5):
        audit.append(ws.audit_path, "score", actor="dr.x", participant=f"30{i}")
    return ws


@pytest.fixture
def site_ws(tmp_path, synth_site):
    """A site workspace with extracted features and federation settings (center key in tmp_path)."""
    from mllm_dr.corpus import read_corpus
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(synth_site[0]), "edaic"
    ws.save()
    extract_corpus(read_corpus(synth_site[0]), FeatureStore(ws.features_dir), ws.config.extraction)
    return enrolled_with_test_center(ws, tmp_path)


def enrolled_with_test_center(ws, tmp_path):
    """``ws`` enrolled with a center whose signing key is ``tmp_path/center.key`` (the federation settings are all
    these tests read: no CA, no node key)."""
    from mllm_dr.atomic import atomic_write_text
    from mllm_dr.enrollment import FederationSettings
    from mllm_dr.signing import fingerprint, new_signing_key

    pub = new_signing_key(tmp_path / "center.key")
    atomic_write_text(ws.root / "federation.json", FederationSettings(
        superlink_address="127.0.0.1:1", ca_certificate_path="/dev/null",
        center_public_key=(tmp_path / "center.pub").read_text(), center_fingerprint=fingerprint(pub),
        node_key_path="/dev/null").model_dump_json())
    return ws


@pytest.fixture
def enrolled_ws(tmp_path):
    """An enrolled workspace without features (the federation settings are all these tests read)."""
    from mllm_dr.workspace import Workspace

    return enrolled_with_test_center(Workspace.init(tmp_path / "ws", "site1"), tmp_path)


def resign_bundle(path: Path, key_path: Path) -> Path:
    """Sign the enrollment bundle ``path`` again with the center key at ``key_path`` after a test edited a field
    (a bundle is refused unless signed: session 47), so the check under test is the one that refuses it."""
    from mllm_dr.enrollment import bundle_payload
    from mllm_dr.signing import load_private

    fields = json.loads(Path(path).read_text())
    fields["signature"] = load_private(key_path).sign(bundle_payload(fields)).hex()
    Path(path).write_text(json.dumps(fields))
    return Path(path)


@pytest.fixture(scope="session")
def federation(tmp_path_factory):
    """One running federation shared by the end-to-end tests (real SuperLink + 4 SuperNodes on
    127.0.0.1, TLS, node authentication), the way hospitals that record differently join:

    - the center fixes the feature recipe ``egemaps-openface``; each site extracts with it (from
      its bundle);
    - site1: E-DAIC layout shipping its own 23-column openSMILE tables; site2: DAIC layout (CLNF
      files, no tables); site3: E-DAIC layout. Without the recipe site1 and site2 differ in width;
    - site4 is enrolled and connected, but its policy requires DP: it refuses every run here.

    Tests that change a site's files put them back (or work on a copy); every process is stopped
    by PID at the end of the session.
    """
    from bench.deployment import LocalFederation
    from mllm_dr.synth import SynthConfig, write_synthetic
    from policies.schema import load_policy

    root = tmp_path_factory.mktemp("federation")
    edaic = write_synthetic(SynthConfig(root / "edaic", "edaic", participants=15, sites=3, seed=3, seconds=3.0,
                                        audio_tables=True))
    daic = write_synthetic(SynthConfig(root / "daic", "daic", participants=5, sites=1, seed=4, seconds=3.0))
    small = load_policy().model_dump() | {"min_participants": 2}          # tiny synthetic sites
    strict = json.loads(json.dumps(small))
    strict["dp"]["enabled"] = True
    fed = LocalFederation(root / "fed", [edaic[0], daic[0], edaic[1], edaic[2]], feature_recipe="egemaps-openface",
                          policies={"site1": small, "site2": small, "site3": small, "site4": strict})
    try:
        fed.setup()
        fed.start()
        yield fed
    finally:
        assert fed.stop() == [], "processes left behind"


def pytest_collection_modifyitems(config, items):
    """Tests that break and restore the shared federation (``federation_last``) run after all others."""
    items.sort(key=lambda item: item.get_closest_marker("federation_last") is not None)


@pytest.fixture
def fake_rehearsal(tmp_path, monkeypatch):
    """`rehearse` with the preparation, the SuperLink and the flwr calls replaced; what stop() was asked, and the
    signal handlers in force while it ran (``handlers_at_stop``). Used by test_rehearsal_s46 and test_one_owner_s47."""
    import signal
    from types import SimpleNamespace

    import fl_server.simulation as simulation
    import fl_server.superlink as superlink
    from mllm_dr.run_folder import RunFolder

    center = SimpleNamespace(runs_dir=tmp_path / "r" / "center" / "runs", state_dir=tmp_path / "state", root=tmp_path)
    calls = {"stop": 0, "stray": [], "warned": []}
    monkeypatch.setattr(simulation, "_prepared", lambda root, asked, progress: (center, []))
    monkeypatch.setattr(simulation, "ray_available", lambda: True)

    def start(self, timeout=90):
        self.proc = SimpleNamespace(pid=os.getpid())
        return self.proc.pid

    def stop(self):
        calls["stop"] += 1
        calls["handlers_at_stop"] = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        return calls["stray"]

    monkeypatch.setattr(simulation.SimulationLink, "start", start)
    monkeypatch.setattr(simulation.SimulationLink, "configure", lambda self, sites, actors: None)
    monkeypatch.setattr(simulation.SimulationLink, "stop", stop)
    monkeypatch.setattr(superlink, "submit_run", lambda center, config: 7)
    monkeypatch.setattr(superlink, "run_log", lambda center, run_id: "the log")
    folder = RunFolder(center.runs_dir, "rehearsal-x")

    def go(during_run: BaseException, **kw):
        def wait_run(*args, **kwargs):
            folder.start(base_model="tiny-random")            # the ServerApp started the run's history
            raise during_run

        monkeypatch.setattr(superlink, "wait_run", wait_run)
        with pytest.raises(type(during_run)):
            simulation.rehearse(tmp_path / "r", 3, {"run-name": "rehearsal-x", "base-model": "tiny-random"}, **kw)
        return folder.history()

    return go, calls
