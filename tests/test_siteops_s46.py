"""Session 46 (a review of the site's operations): the SuperNode refuses a PATH that does not find the kit's
ClientApp shim (a ':' in the workspace path, a noexec mount); a second `train --federated` never attaches to,
audits or stops a SuperNode it did not start; `status` names the adapters `--adapters auto` takes (a swap cut
short); `enroll --accept` refuses an address that is not host:port, an expired CA, a bundle of another center
(without --replace-center) or while the SuperNode runs, and checks the node key itself, not node.pub; each start
keeps the last SuperNode's log; the node config reaches Flower exactly; status says "connected at start".
No SuperLink or SuperNode is started: a `sleep` child stands for a running SuperNode."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest

from conftest import enrolled_with_test_center, run_cli
from mllm_dr import audit
from mllm_dr.errors import InputError
from mllm_dr.processes import ProcessError


@pytest.fixture
def sleeper(enrolled_ws):
    """A `sleep` child recorded in the workspace's SuperNode pid file: "a SuperNode is running"."""
    from fl_client.supernode import pidfile
    from mllm_dr.processes import record_pid

    proc = subprocess.Popen(["sleep", "120"])
    record_pid(pidfile(enrolled_ws), proc.pid)
    yield proc
    proc.kill()          # by its own pid only
    proc.wait(timeout=10)


# 1: the shim must be what PATH finds ---------------------------------------------------------------------
def test_a_workspace_path_with_the_path_separator_is_refused(tmp_path):
    import fl_client.supernode as sn
    from mllm_dr.workspace import Workspace

    ws = enrolled_with_test_center(Workspace.init(tmp_path / "a:b", "site1"), tmp_path)
    try:
        env = sn.supernode_env(ws)
    except InputError as err:
        assert "must not contain ':'" in str(err) and len(str(err).splitlines()) == 1
        return
    # the old code: the PATH entry splits and Flower's own flwr-clientapp (the venv's) is found instead
    assert shutil.which("flwr-clientapp", path=env["PATH"]) == str(sn.shim_dir(ws) / "flwr-clientapp")


def test_a_noexec_workspace_is_refused_before_anything_starts(enrolled_ws, monkeypatch):
    import fl_client.supernode as sn

    real = os.statvfs
    monkeypatch.setattr(os, "ST_NOEXEC", getattr(os, "ST_NOEXEC", 8), raising=False)
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_flag=real(p).f_flag | os.ST_NOEXEC))
    spawned = []
    monkeypatch.setattr(sn, "spawn", lambda *a, **k: spawned.append(a))
    monkeypatch.setattr(sn, "reachable", lambda address: True)
    with pytest.raises(InputError, match="noexec"):
        sn.supernode_env(enrolled_ws)
    with pytest.raises(InputError, match="noexec"):
        sn.start_supernode(enrolled_ws, wait=0)
    assert not spawned
    monkeypatch.setattr(os, "statvfs", real)
    env = sn.supernode_env(enrolled_ws)               # an ordinary mount: the shim is what PATH finds
    assert shutil.which("flwr-clientapp", path=env["PATH"]) == str(sn.shim_dir(enrolled_ws) / "flwr-clientapp")


# 2: a running SuperNode is never attached to -------------------------------------------------------------
def test_a_second_train_federated_refuses_and_leaves_the_running_supernode_alone(enrolled_ws, sleeper):
    from cli.site_federation import train_federated
    from fl_client.supernode import stop_supernode
    from mllm_dr.processes import alive

    starts = lambda: [e for e in audit.read(enrolled_ws.audit_path) if e["event"] == "supernode_start"]  # noqa: E731
    for detach in (True, False):
        with pytest.raises(ProcessError, match=rf"a SuperNode is already running \(pid {sleeper.pid}\); "
                                               "'mllmdr-site stop' first"):
            train_federated(enrolled_ws.root, "other-model", 4, detach, False, wait=0)
    assert alive(sleeper.pid) and not starts()
    # --detach alone while one runs: already done (a site whose SuperNode rode out a center restart is started
    # again by the same command), reported as such, nothing audited, nothing stopped
    train_federated(enrolled_ws.root, None, None, True, False, wait=0)
    assert alive(sleeper.pid) and not starts()
    assert stop_supernode(enrolled_ws, only=sleeper.pid + 1) is False and alive(sleeper.pid)
    proc = run_cli("mllmdr-site", "train", "--workspace", enrolled_ws.root, "--federated", "--wait", "0",
                   check=False)
    assert proc.returncode == 2 and "already running" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert alive(sleeper.pid) and not starts()


# 3: status names the adapters auto takes -------------------------------------------------------------------
def test_status_names_the_federated_adapters_a_swap_cut_short_left_aside(enrolled_ws, tmp_path):
    import torch

    from cli.site_model import Adapters, adapter_choice
    from mllm_dr.signing import load_private, write_checkpoint
    from mllm_dr.site_status import adapters_in_use, auto_adapters

    aside = enrolled_ws.checkpoints_dir / "federated" / "latest.old"
    write_checkpoint(aside, load_private(tmp_path / "center.key"), {"lq.w": torch.zeros(2)}, {"round": 2, "run": "r1"})
    assert adapter_choice(enrolled_ws, Adapters.auto) == ("federated", aside)     # what score takes
    got = adapters_in_use(enrolled_ws)
    assert got["in_use"] == "federated" and got["federated"]["version"] == "r1/round-2"
    assert got["federated"]["path"] == str(aside) and auto_adapters(enrolled_ws) == ("federated", aside)


# 4, 5, 8: enroll --accept ---------------------------------------------------------------------------------
def _ca_pem(days_from: float = -1, days_to: float = 3650) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mllm_dr.pki import _name

    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("ca")).issuer_name(_name("ca")).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now + dt.timedelta(days=days_from))
            .not_valid_after(now + dt.timedelta(days=days_to))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA384()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def first_ca(settings) -> str:
    return Path(settings.ca_certificate_path).read_text()


@pytest.fixture
def site(tmp_path):
    """A workspace with its node key and request, and a bundle writer: (ws, request, bundle(name, **fields))."""
    from mllm_dr.enrollment import make_request, write_bundle
    from mllm_dr.signing import load_private, new_signing_key
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    req = make_request(ws, tmp_path / "site1.req")
    ca = _ca_pem()

    def bundle(name: str, center: str = "c1", address: str = "127.0.0.1:9092", ca_pem: str = ca, request=req):
        if not (tmp_path / f"{center}.pub").is_file():
            new_signing_key(tmp_path / f"{center}.key")
        write_bundle(tmp_path / name, request, address, ca_pem, (tmp_path / f"{center}.pub").read_text(),
                     signing_key=load_private(tmp_path / f"{center}.key"))
        return tmp_path / name

    return ws, req, bundle


def test_an_address_that_is_not_host_port_and_an_expired_ca_are_refused(site):
    from cli.site_federation import _ca_expiry_warning
    from mllm_dr.enrollment import install_bundle
    from mllm_dr.pki import check_address

    ws, _, bundle = site
    for ok in ("center.example.org:9092", "10.0.0.1:1", "[2001:db8::1]:65535", "[::1]:9092"):
        assert check_address(ok) == ok
    for bad in ("https://center.example.org", "center.example.org", "center.example.org:0", "host:65536",
                "::1:9092", "[::1]", "[10.0.0.1]:9092", "a b:1", ":9092", "host:x"):
        with pytest.raises(ValueError, match="superlink_address"):
            check_address(bad)
    with pytest.raises(InputError, match="not host:port"):
        install_bundle(ws, bundle("https.json", address="https://center.example.org"))
    with pytest.raises(InputError, match="CA certificate expired on"):
        install_bundle(ws, bundle("expired.json", ca_pem=_ca_pem(-400, -1)))
    with pytest.raises(InputError, match="not valid before"):
        install_bundle(ws, bundle("future.json", ca_pem=_ca_pem(5, 400)))
    assert not (ws.root / "keys" / "ca.crt").exists() and not (ws.root / "federation.json").exists()
    install_bundle(ws, bundle("soon.json", ca_pem=_ca_pem(-1, 10)))                   # installed, with a warning
    assert "expires on" in _ca_expiry_warning(ws.root / "keys" / "ca.crt")
    install_bundle(ws, bundle("good.json"))
    assert _ca_expiry_warning(ws.root / "keys" / "ca.crt") is None


def test_a_bundle_of_another_center_needs_replace_center_and_nothing_installs_under_a_running_supernode(
        site, tmp_path):
    from cli.site_federation import enroll
    from fl_client.supernode import pidfile
    from mllm_dr.enrollment import federation_settings, install_bundle
    from mllm_dr.processes import record_pid

    ws, _, bundle = site
    first = install_bundle(ws, bundle("c1.json"))
    with pytest.raises(InputError, match="another center .*--replace-center"):
        install_bundle(ws, bundle("c2.json", center="c2", address="127.0.0.1:9999"))
    assert federation_settings(ws) == first and (ws.root / "keys" / "ca.crt").read_text() == first_ca(first)
    proc = run_cli("mllmdr-site", "enroll", "--workspace", ws.root, "--accept", tmp_path / "c2.json",
                   "--replace-center", "--json")
    assert json.loads(proc.stdout)["replaced_center"] == first.center_fingerprint
    assert federation_settings(ws).superlink_address == "127.0.0.1:9999"
    assert [e for e in audit.read(ws.audit_path) if e["event"] == "enroll_accept"][-1]["replaced_center"] \
        == first.center_fingerprint

    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        record_pid(pidfile(ws), sleeper.pid)
        with pytest.raises(InputError, match=f"SuperNode is running \\(pid {sleeper.pid}\\); stop it first"):
            enroll(workspace=ws.root, out=None, accept=tmp_path / "c1.json", supernode_port=None,
                   replace_center=True, json_out=True)
        assert federation_settings(ws).superlink_address == "127.0.0.1:9999" and sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)


def test_accept_checks_the_bundle_against_the_private_node_key_not_node_pub(site, tmp_path):
    from mllm_dr.enrollment import install_bundle, make_request
    from mllm_dr.workspace import Workspace

    ws, req, bundle = site
    (ws.root / "keys" / "node.pub").unlink()
    install_bundle(ws, bundle("ok.json"))                         # node.pub missing: the private key decides
    other = Workspace.init(tmp_path / "other", "site1")          # another key, written over node.pub
    other_req = make_request(other, tmp_path / "other.req")
    (ws.root / "keys" / "node.pub").write_text((other.root / "keys" / "node.pub").read_text())
    with pytest.raises(InputError, match="bundle approves a different node key"):
        install_bundle(ws, bundle("theirs.json", request=other_req))
    assert (ws.root / "keys" / "node.pub").read_text().strip() == req.node_public_key   # repaired from the key


# 6: the last SuperNode's log is kept ------------------------------------------------------------------------
def test_each_start_keeps_the_last_supernodes_log_once_not_per_retry(enrolled_ws, monkeypatch):
    import fl_client.supernode as sn

    log = sn.logfile(enrolled_ws)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("the reason the last SuperNode exited\n")
    tries = []

    def spawn(cmd, log, pidfile, env, cwd):
        tries.append(cmd)
        Path(log).write_text(f"try {len(tries)}: Connection attempt failed\n")
        raise ProcessError("exited with code 305")

    monkeypatch.setattr(sn, "spawn", spawn)
    monkeypatch.setattr(sn, "reachable", lambda address: True)
    monkeypatch.setattr(sn, "check_port", lambda *a, **k: None)
    with pytest.raises(ProcessError, match="center unreachable"):
        sn.start_supernode(enrolled_ws, wait=0.6)
    kept = log.with_name("supernode.log.1")
    assert len(tries) >= 2 and kept.read_text() == "the reason the last SuperNode exited\n"
    assert oct(kept.stat().st_mode & 0o777) == "0o600" and log.read_text().startswith(f"try {len(tries)}")


# 7: the node config reaches Flower exactly --------------------------------------------------------------
def test_the_node_config_carries_a_path_with_quotes_and_backslashes_exactly(tmp_path):
    from flwr.common.config import parse_config_args

    from fl_client.supernode import supernode_command
    from mllm_dr.workspace import Workspace

    ws = enrolled_with_test_center(Workspace.init(tmp_path / 'a"b\\c d=1', "site1"), tmp_path)
    cmd = supernode_command(ws, base_model='m"\\x', lora_rank=8)
    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert parsed == {"workspace": str(ws.root.resolve()), "base-model": 'm"\\x', "lora-rank": 8}


# 9: "connected at start" ------------------------------------------------------------------------------------
def test_status_says_connected_at_start(enrolled_ws, capsys, monkeypatch):
    import mllm_dr.site_status as st
    from cli.site_federation import status
    from fl_client.supernode import connected_marker

    monkeypatch.setattr(st, "stale_rationales_or_why_not", lambda ws: (0, None))
    connected_marker(enrolled_ws).parent.mkdir(parents=True, exist_ok=True)
    connected_marker(enrolled_ws).touch()
    status(workspace=enrolled_ws.root, json_out=True)
    sn = json.loads(capsys.readouterr().out)["supernode"]
    assert sn["started_connected"] and sn["last_connected"] == sn["started_connected"]
    status(workspace=enrolled_ws.root, json_out=False)
    text = capsys.readouterr().out
    assert "connected at start" in text and "last connected" not in text
