"""A site's services without a center: `mllmdr-site status`, a port clash named with its
holder, an unreachable center in one line after the configured wait. (With a real
SuperLink: tests/test_services.py.)"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

from conftest import cli_json, run_cli
from mllm_dr import audit
from mllm_dr.processes import free_port


@pytest.fixture
def listening():
    """A port this test process listens on, as another program would."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def site_ws(tmp_path):
    """An enrolled workspace without features (the federation settings are all these tests read)."""
    from mllm_dr.enrollment import FederationSettings
    from mllm_dr.signing import fingerprint, new_signing_key
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    pub = new_signing_key(tmp_path / "center.key")
    (ws.root / "federation.json").write_text(FederationSettings(
        superlink_address="127.0.0.1:1", ca_certificate_path="/dev/null",
        center_public_key=(tmp_path / "center.pub").read_text(), center_fingerprint=fingerprint(pub),
        node_key_path="/dev/null").model_dump_json())
    return ws


def _enrolled(site_ws, superlink_port: int, supernode_port: int):
    fed = json.loads((site_ws.root / "federation.json").read_text())
    fed.update(superlink_address=f"127.0.0.1:{superlink_port}", supernode_port=supernode_port)
    (site_ws.root / "federation.json").write_text(json.dumps(fed))
    return fed


def test_status_reports_center_round_epsilon_and_adapters(site_ws, tmp_path):
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.signing import load_private, write_checkpoint

    fed = _enrolled(site_ws, 9300, 9301)
    before = cli_json("mllmdr-site", "status", "--workspace", site_ws.root)
    assert before["last_round"] is None and before["privacy"] is None and before["adapters"]["in_use"] is None
    assert before["supernode"] == {"running": False, "pid": None, "log": str(site_ws.root / "federation" /
                                   "supernode.log"), "port": 9301, "last_connected": None}

    audit.append(site_ws.audit_path, "federated_round", run="r7", round=3, stage=2)
    audit.append(site_ws.audit_path, "score", participant="301")
    eps = PrivacyLedger(site_ws.root / "privacy.json").record("r7", 3, 1.0, 1.0, 1e-5)[1]
    write_checkpoint(site_ws.checkpoints_dir / "federated" / "latest", load_private(tmp_path / "center.key"),
                     {"lq.w": torch.zeros(2)}, {"round": 3, "run": "r7"})
    local = site_ws.checkpoints_dir / "local" / "latest"
    local.mkdir(parents=True)
    (local / "adapter_meta.json").write_text(json.dumps({"version": "abc123", "base_model": "tiny-random"}))

    st = cli_json("mllmdr-site", "status", "--workspace", site_ws.root)
    assert st["center"]["address"] == "127.0.0.1:9300" and st["center"]["fingerprint"] == fed["center_fingerprint"]
    assert (st["last_round"]["run"], st["last_round"]["round"], st["last_round"]["stage"]) == ("r7", 3, 2)
    assert st["privacy"]["epsilon"] == pytest.approx(eps) and st["privacy"]["rounds"] == 1     # default delta 1e-5
    assert st["adapters"]["in_use"] == "federated" and st["adapters"]["federated"]["version"] == "r7/round-3"
    text = run_cli("mllmdr-site", "status", "--workspace", site_ws.root).stdout
    assert "127.0.0.1:9300" in text and "r7 round 3" in text and "not running" in text


def test_port_clash_names_the_process_holding_it(site_ws, tmp_path, listening):
    _enrolled(site_ws, free_port(), listening)
    bundle = tmp_path / "b.json"        # the port is checked before the bundle is even read
    bundle.write_text("{}")
    proc = run_cli("mllmdr-site", "enroll", "--workspace", site_ws.root, "--accept", bundle, "--supernode-port",
                   str(listening), check=False)
    assert proc.returncode == 2 and f"port {listening}" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert "pytest" in proc.stderr                             # its command line, from /proc
    proc = run_cli("mllmdr-site", "train", "--workspace", site_ws.root, "--federated", "--detach", "--wait", "0",
                   check=False)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr
    assert not (site_ws.root / "federation" / "supernode.pid").exists()


def test_unreachable_center_is_one_line_after_the_wait(site_ws):
    dead = free_port()
    _enrolled(site_ws, dead, free_port())
    t0 = time.monotonic()
    proc = run_cli("mllmdr-site", "train", "--workspace", site_ws.root, "--federated", "--detach", "--wait", "4",
                   check=False)
    took = time.monotonic() - t0
    assert proc.returncode == 2 and f"center unreachable at 127.0.0.1:{dead}" in proc.stderr, proc.stderr
    assert "waiting for the center" in proc.stderr                     # what it waited for, said while waiting
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and 4 <= took < 60
