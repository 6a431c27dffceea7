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


def _enrolled(enrolled_ws, superlink_port: int, supernode_port: int):
    fed = json.loads((enrolled_ws.root / "federation.json").read_text())
    fed.update(superlink_address=f"127.0.0.1:{superlink_port}", supernode_port=supernode_port)
    (enrolled_ws.root / "federation.json").write_text(json.dumps(fed))
    return fed


def test_status_reports_center_round_epsilon_and_adapters(enrolled_ws, tmp_path):
    from mllm_dr.errors import InputError
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.signing import load_private, write_checkpoint

    fed = _enrolled(enrolled_ws, 9300, 9301)
    before = cli_json("mllmdr-site", "status", "--workspace", enrolled_ws.root)
    assert before["last_round"] is None and before["privacy"] is None and before["adapters"]["in_use"] is None
    assert before["supernode"] == {"running": False, "pid": None, "log": str(enrolled_ws.root / "federation" /
                                   "supernode.log"), "port": 9301, "last_connected": None, "started_connected": None}

    audit.append(enrolled_ws.audit_path, "federated_round", run="r7", round=3, stage=2)
    audit.append(enrolled_ws.audit_path, "score", participant="301")
    eps = PrivacyLedger(enrolled_ws.root / "privacy.json").record("r7", 3, 1.0, 1.0, 1e-5)[1]
    write_checkpoint(enrolled_ws.checkpoints_dir / "federated" / "latest", load_private(tmp_path / "center.key"),
                     {"lq.w": torch.zeros(2)}, {"round": 3, "run": "r7"})
    local = enrolled_ws.checkpoints_dir / "local" / "latest"
    local.mkdir(parents=True)
    (local / "adapter_meta.json").write_text(json.dumps({"version": "abc123", "base_model": "tiny-random"}))

    st = cli_json("mllmdr-site", "status", "--workspace", enrolled_ws.root)
    assert st["center"]["address"] == "127.0.0.1:9300" and st["center"]["fingerprint"] == fed["center_fingerprint"]
    assert (st["last_round"]["run"], st["last_round"]["round"], st["last_round"]["stage"]) == ("r7", 3, 2)
    assert st["privacy"]["epsilon"] == pytest.approx(eps) and st["privacy"]["rounds"] == 1     # default delta 1e-5
    assert st["adapters"]["in_use"] == "federated" and st["adapters"]["federated"]["version"] == "r7/round-3"
    text = run_cli("mllmdr-site", "status", "--workspace", enrolled_ws.root).stdout
    assert "127.0.0.1:9300" in text and "r7 round 3" in text and "not running" in text
    # session 41 (a site-path review): a damaged ledger or federated checkpoint.json was an internal error
    # (exit 3, no file named) in `status`, `policy show` and every DP round; now said, naming the file
    (enrolled_ws.root / "privacy.json").write_text('{"rounds": [')
    (enrolled_ws.checkpoints_dir / "federated" / "latest" / "checkpoint.json").write_text("[1, 2]")
    damaged = run_cli("mllmdr-site", "status", "--workspace", enrolled_ws.root)
    assert "privacy ledger is unreadable" in damaged.stdout and "privacy.json" in damaged.stdout
    assert "checkpoint.json: unreadable" in damaged.stdout
    with pytest.raises(InputError, match="privacy ledger is unreadable"):
        PrivacyLedger(enrolled_ws.root / "privacy.json").record("r7", 4, 1.0, 1.0, 1e-5)
    for bad in ([1], [{"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": -60}]):   # a refund forged in the file
        (enrolled_ws.root / "privacy.json").write_text(json.dumps({"rounds": bad}))
        with pytest.raises(InputError, match="not a possible mechanism"):
            PrivacyLedger(enrolled_ws.root / "privacy.json").spent(1e-5)


def test_port_clash_names_the_process_holding_it(enrolled_ws, tmp_path, listening):
    _enrolled(enrolled_ws, free_port(), listening)
    bundle = tmp_path / "b.json"        # the port is checked before the bundle is even read
    bundle.write_text("{}")
    proc = run_cli("mllmdr-site", "enroll", "--workspace", enrolled_ws.root, "--accept", bundle, "--supernode-port",
                   str(listening), check=False)
    assert proc.returncode == 2 and f"port {listening}" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert "pytest" in proc.stderr                             # its command line, from /proc
    proc = run_cli("mllmdr-site", "train", "--workspace", enrolled_ws.root, "--federated", "--detach", "--wait", "0",
                   check=False)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr
    assert not (enrolled_ws.root / "federation" / "supernode.pid").exists()


def test_unreachable_center_is_one_line_after_the_wait(enrolled_ws):
    dead = free_port()
    _enrolled(enrolled_ws, dead, free_port())
    t0 = time.monotonic()
    proc = run_cli("mllmdr-site", "train", "--workspace", enrolled_ws.root, "--federated", "--detach", "--wait", "4",
                   check=False)
    took = time.monotonic() - t0
    assert proc.returncode == 2 and f"center unreachable at 127.0.0.1:{dead}" in proc.stderr, proc.stderr
    assert "waiting for the center" in proc.stderr                     # what it waited for, said while waiting
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and 4 <= took < 60


def test_unreachable_center_is_retried_for_the_whole_wait(enrolled_ws):
    """The error says "waited N s": the last try happens at the deadline, not when the next
    back-off step would overrun it (it gave up after 2 of 3 s before)."""
    from fl_client.supernode import start_supernode
    from mllm_dr.processes import ProcessError

    _enrolled(enrolled_ws, free_port(), free_port())
    said = []
    t0 = time.monotonic()
    with pytest.raises(ProcessError, match=r"center unreachable .*\(waited 3 s\)"):
        start_supernode(enrolled_ws, wait=3, say=said.append)
    assert 3 <= time.monotonic() - t0 < 10 and len(said) == 1
