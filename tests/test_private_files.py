"""What a site or the center writes about people or secrets is readable by its owner only
(0600 files, 0700 folders); tracebacks stay out of /tmp; the audit actor is never 'unknown'."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from mllm_dr import audit
from mllm_dr.workspace import Workspace


def _mode(p: Path) -> str:
    return oct(p.stat().st_mode & 0o777)


@pytest.fixture(autouse=True)
def open_umask():
    old = os.umask(0o022)                  # what a default account has: files 0644 unless made private
    yield
    os.umask(old)


def test_workspace_audit_log_keys_and_reviews_are_private(tmp_path):
    from mllm_dr.review import ItemReview, Review, record_review

    ws = Workspace.init(tmp_path / "ws", "site1")
    audit.append(ws.audit_path, "score", participant="301")
    assert _mode(ws.root) == "0o700"
    for sub in ("features", "rationales", "checkpoints", "audit", "keys", "reviews", "reports"):
        assert _mode(ws.root / sub) == "0o700", sub
    for f in (ws.audit_path, ws.root / "keys" / "audit.key", ws.root / "keys" / "audit.pub"):
        assert _mode(f) == "0o600", f
    record_review(ws, Review(participant="301", reviewer="dr.x", adapters="v1",
                             items=[ItemReview(item="PHQ_1", model_score=1, source="generated", rating=3)]))
    assert _mode(ws.root / "reviews" / "reviews.jsonl") == "0o600"


def test_an_old_world_readable_log_is_tightened_on_the_next_entry(tmp_path):
    ws = Workspace.init(tmp_path / "ws", "site1")
    audit.append(ws.audit_path, "score")
    os.chmod(ws.audit_path, 0o644)
    audit.append(ws.audit_path, "score")
    assert _mode(ws.audit_path) == "0o600" and audit.verify(ws.audit_path)[0]


def test_center_keys_and_pki_are_private(tmp_path):
    from mllm_dr.center import CenterDir
    from mllm_dr.enrollment import make_request, read_request

    c = CenterDir.init(tmp_path / "center")
    audit.append(c.audit_path, "center_init")
    for sub in ("", "pki", "keys", "sites", "runs", "state", "audit"):
        assert _mode(c.root / sub) == "0o700", sub
    for f in [*(c.root / "pki").iterdir(), *(c.root / "keys").iterdir(), c.audit_path]:
        assert _mode(f) == "0o600", f
    ws = Workspace.init(tmp_path / "ws", "site1")
    make_request(ws, tmp_path / "req.json")
    c.approve(read_request(tmp_path / "req.json"))
    assert _mode(c.sites_dir / "site1.pub") == "0o600" and _mode(ws.root / "keys" / "node") == "0o600"
    assert _mode(ws.root / "keys" / "node.pub") == "0o600"


def test_reports_are_private(tmp_path):
    from mllm_dr.reports import write_report

    metrics = {k: 0.5 for k in ("ccc", "precision", "recall", "f1", "rmse", "mae", "format_violation_rate")}
    md = write_report(tmp_path / "ws" / "reports" / "r.md", metrics | {"n": 1},
                      [{"participant": "301", "true": 3, "pred": 4, "regression_total": 4.0}], "t")
    assert (_mode(md), _mode(md.with_suffix(".png")), _mode(md.parent)) == ("0o600", "0o600", "0o700")


def test_actor_is_the_login_name_when_user_is_unset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("USER", "LOGNAME")}
    log = tmp_path / "ws" / "audit" / "audit.jsonl"
    subprocess.run([sys.executable, "-c", f"from mllm_dr import audit; audit.append({str(log)!r}, 'score')"],
                   env=env, check=True, timeout=120)
    assert audit.read(log)[0]["actor"] == pwd.getpwuid(os.getuid()).pw_name != "unknown"


def _crash(ws: Path, env: dict) -> str:
    """An internal error through the real CLI: a bug injected at start-up (tests/fault_injection)
    makes the command raise an exception no known error covers."""
    env = env | {"MLLMDR_INJECT_FAULT": "1", "PYTHONPATH": str(Path(__file__).parent / "fault_injection")}
    proc = run_cli("mllmdr-site", "stop", "--workspace", ws, check=False, env=env)
    assert proc.returncode == 3 and "internal error" in proc.stderr
    return proc.stderr.split("traceback saved to ")[1].split(")")[0].replace("\n", "")


def test_tracebacks_go_to_the_workspace_or_the_user_cache_never_tmp(tmp_path):
    ws = Workspace.init(tmp_path / "ws", "site1")
    cache = tmp_path / "cache"
    saved = Path(_crash(ws.root, {"XDG_CACHE_HOME": str(cache), "TMPDIR": str(tmp_path / "tmp")}))
    assert saved.parent == ws.root / "logs" and _mode(saved) == "0o600" and "Traceback" in saved.read_text()

    from cli import common

    app = common.typer.Typer()

    @app.command()
    def boom():
        raise RuntimeError("a bug")

    old_argv, old_cache = sys.argv, os.environ.get("XDG_CACHE_HOME")
    sys.argv, os.environ["XDG_CACHE_HOME"] = ["mllmdr-site"], str(cache)
    try:
        with pytest.raises(SystemExit) as exit_:
            common.run_app(app)()
    finally:
        sys.argv = old_argv
        os.environ.pop("XDG_CACHE_HOME") if old_cache is None else os.environ.update(XDG_CACHE_HOME=old_cache)
    logs = list((cache / "mllm-dr" / "logs").iterdir())
    assert exit_.value.code == 3 and len(logs) == 1 and _mode(logs[0]) == "0o600"
    assert _mode(logs[0].parent) == "0o700" and "a bug" in logs[0].read_text()
