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
