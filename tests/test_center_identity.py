"""The center's site identities without a SuperLink: host names validated, one node key per
site, approving twice is idempotent, revocation is recorded and binds re-approval.
(Revocation against a running SuperLink: tests/test_services.py.)"""

from __future__ import annotations

import json
import time

from conftest import cli_json, run_cli
from mllm_dr import audit


def _center(tmp_path):
    from mllm_dr.center import CenterDir

    return CenterDir.init(tmp_path / "center", port=9200).root


def _request(tmp_path, site: str):
    from mllm_dr.enrollment import make_request
    from mllm_dr.workspace import Workspace

    make_request(Workspace.init(tmp_path / site, site), tmp_path / f"{site}.req")
    return tmp_path / f"{site}.req"


def test_init_refuses_what_is_not_a_host_name_or_ip(tmp_path):
    import pytest

    from mllm_dr.center import CenterDir
    from mllm_dr.errors import InputError

    proc = run_cli("mllmdr-center", "init", "--dir", tmp_path / "c", "--host", "not a host!", check=False)
    assert proc.returncode == 2 and "'not a host!' is neither an IP address nor a host name" in proc.stderr
    for host, san in (("10.0.0.256", []), ("-lead.example.org", []), ("a" * 64 + ".org", []),
                      ("center.example.org", ["under_score.org"])):
        with pytest.raises(InputError, match="host name|IP address"):
            CenterDir.init(tmp_path / "c", host, 9200, san)
    assert not (tmp_path / "c" / "center.json").exists()
    ok = cli_json("mllmdr-center", "init", "--dir", tmp_path / "c", "--host", "center-1.hospital.example.org",
                  "--san", "fe80::1", "--san", "10.0.0.5")
    assert {"center-1.hospital.example.org", "fe80::1", "10.0.0.5"} <= set(ok["tls_names"])
    # a center folder that lost center.json: init regenerated the CA and server certificate before failing
    # on the signing key, so every enrolled site's CA no longer matched (session 40); now nothing is written
    import hashlib

    pki = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "c" / "pki").iterdir()}
    (tmp_path / "c" / "center.json").unlink()
    again = run_cli("mllmdr-center", "init", "--dir", tmp_path / "c", check=False)
    assert again.returncode == 2 and "restore center.json from a backup" in again.stderr, again.stderr
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "c" / "pki").iterdir()} == pki
    status = run_cli("mllmdr-center", "sites", "--dir", tmp_path / "c", check=False)   # never sends them to init
    assert status.returncode == 2 and "restore center.json" in status.stderr and "run 'mllmdr-center init" not in status.stderr


def test_one_node_key_one_site_and_approving_twice_is_idempotent(tmp_path):
    center = _center(tmp_path)
    req = _request(tmp_path, "site-a")
    # --out a folder: the site was approved, the bundle write failed naming a temporary file, and the retry
    # said "already approved" and never audited it (session 40); now refused before anything changes
    (tmp_path / "folder").mkdir()
    proc = run_cli("mllmdr-center", "approve", req, "--dir", center, "--out", tmp_path / "folder", check=False)
    assert proc.returncode == 2 and "--out is a folder" in proc.stderr and ".tmp" not in proc.stderr, proc.stderr
    assert not (center / "sites" / "site-a.json").exists()
    first = cli_json("mllmdr-center", "approve", req, "--dir", center, "--out", tmp_path / "a.bundle")
    again = cli_json("mllmdr-center", "approve", req, "--dir", center, "--out", tmp_path / "a2.bundle")
    assert (first["status"], again["status"]) == ("approved", "already approved")
    assert [e["event"] for e in audit.read(center / "audit" / "audit.jsonl")].count("approve") == 1

    # the same node key under another site id is refused
    twin = json.loads(req.read_text()) | {"site_id": "site-b"}
    (tmp_path / "twin.req").write_text(json.dumps(twin))
    proc = run_cli("mllmdr-center", "approve", tmp_path / "twin.req", "--dir", center, "--out", tmp_path / "b.bundle",
                   check=False)
    assert proc.returncode == 2 and "already approved for site 'site-a'" in proc.stderr
    assert not (tmp_path / "b.bundle").exists()
    # the bundle names the center's audit key: the site can check the center's signed heads
    bundle = json.loads((tmp_path / "a.bundle").read_text())
    assert bundle["center_audit_key"] == audit.head(center / "audit" / "audit.jsonl")["key"]


def test_revoke_without_a_superlink_and_the_key_stays_revoked(tmp_path):
    center = _center(tmp_path)
    req = _request(tmp_path, "site-a")
    cli_json("mllmdr-center", "approve", req, "--dir", center, "--out", tmp_path / "a.bundle")
    # a past run saw the site (node id, last aggregated round): 'sites' reads it from the history
    run = center / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "history.json").write_text(json.dumps({"run": "r1", "site_nodes": {"123": "site-a"},
                                                  "rounds": [{"round": 1, "sites": {"site-a": {}}, "time": time.time()}]}))
    listed = cli_json("mllmdr-center", "sites", "--dir", center)
    row = listed["sites"][0]
    assert (row["site_id"], row["node_id"], row["seen_by"]) == ("site-a", "123", "run r1 round 1")
    assert row["node_fingerprint"] == json.loads(req.read_text())["fingerprint"] and row["approved"]

    res = cli_json("mllmdr-center", "revoke", "site-a", "--dir", center)
    assert res["unregistered"] == "at next serve" and res["node_id"] == "123"
    after = cli_json("mllmdr-center", "sites", "--dir", center)
    assert after["sites"] == [] and after["revoked"][0]["site_id"] == "site-a"
    assert not (center / "sites" / "site-a.pub").exists()
    assert audit.read(center / "audit" / "audit.jsonl")[-1]["event"] == "revoke"

    again = run_cli("mllmdr-center", "approve", req, "--dir", center, "--out", tmp_path / "x.bundle", check=False)
    assert again.returncode == 2 and "was revoked" in again.stderr
    missing = run_cli("mllmdr-center", "revoke", "site-a", "--dir", center, check=False)
    assert missing.returncode == 2 and "no approved site 'site-a'" in missing.stderr


def test_center_status_and_sites_answer_damaged_or_older_records_in_one_line(tmp_path):
    """A damaged or older-format history.json or site record ended `status`/`sites` in an internal error
    (exit 3), and `status --run nope` exited 0 with "run": null (session 40, a center-path review)."""
    from mllm_dr.center import CenterDir
    from mllm_dr.run_folder import RunFolder

    c = CenterDir.init(tmp_path / "c")
    folder = RunFolder(c.runs_dir, "old")
    folder.history_path.parent.mkdir(parents=True)
    folder.history_path.write_text(json.dumps({"run": "old", "rounds": [{"round": 1, "sites": {"s1": {}}}]}))
    old = cli_json("mllmdr-center", "status", "--dir", c.root, "--run", "old")   # an older kit's: no stage, no loss
    assert old["run"] == "old" and old["rounds"][0]["stage"] is None and old["rounds"][0]["sites"] == 1
    assert "round" in run_cli("mllmdr-center", "status", "--dir", c.root, "--run", "old").stdout
    nope = run_cli("mllmdr-center", "status", "--dir", c.root, "--run", "nope", "--json", check=False)
    assert nope.returncode == 2 and "--run 'nope': no such run here (runs: old)" in nope.stderr and nope.stdout == ""
    outside = run_cli("mllmdr-center", "status", "--dir", c.root, "--run", "../c", check=False)
    assert outside.returncode == 2 and "run name '../c' is not letters" in outside.stderr
    folder.history_path.write_text("{cut")
    cut = run_cli("mllmdr-center", "status", "--dir", c.root, "--run", "old", check=False)
    assert cut.returncode == 2 and "history.json" in cut.stderr and "not a readable run history" in cut.stderr
    (c.sites_dir / "x.json").write_text("{")
    bad = run_cli("mllmdr-center", "sites", "--dir", c.root, check=False)
    assert bad.returncode == 2 and "x.json" in bad.stderr and "not a readable site record" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_revoked_key_stays_revoked_under_a_comment_and_after_a_second_revocation(tmp_path):
    """Session 42 (a center review): the node-key fingerprint hashed the whole OpenSSH line, so the revoked
    key with " x" appended was a new key to the revoked and one-key-one-site checks; revoking a site id a
    second time overwrote `revoked/<id>.json`, forgetting the first key; a request naming an unknown key type
    or a damaged site record ended `approve` in an internal error. Each is now refused in one line (exit 2)."""
    import pytest

    from mllm_dr.center import CenterDir
    from mllm_dr.enrollment import key_fingerprint, read_request
    from mllm_dr.errors import InputError

    center = CenterDir(_center(tmp_path))
    first = _request(tmp_path, "site-a")
    center.approve(read_request(first))
    center.revoke("site-a", unregistered=True)
    rec = json.loads(first.read_text())
    kind, blob = rec["node_public_key"].split()
    for line in (rec["node_public_key"] + " x", f"{kind}  {blob}", f"{kind}\t{blob}",   # a comment; white space
                 "ssh-foo AAAAB3NzaC1yc2E"):                                          # an unknown type
        first.write_text(json.dumps(rec | {"node_public_key": line, "fingerprint": key_fingerprint(line)}))
        with pytest.raises(InputError, match="node key"):
            read_request(first)
    second = _request(tmp_path / "again", "site-a")         # a new key for the same site id, then revoked too
    center.approve(read_request(second))
    center.revoke("site-a", unregistered=True)
    revoked = {r["fingerprint"] for r in center.revoked_sites()}
    assert revoked == {rec["fingerprint"], json.loads(second.read_text())["fingerprint"]}
    third = _request(tmp_path / "third", "site-a")
    center.approve(read_request(third))
    (center.sites_dir / "site-a.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable site record"):
        center.approve(read_request(third))


def test_serve_names_the_process_holding_the_centers_port_before_starting_anything(tmp_path):
    """Session 42 (a center review): `serve` never checked its port; a clash surfaced as "process exited
    with code N" and the SuperLink's log tail. Now it names the process holding the port, and starts nothing."""
    import os
    import socket

    import pytest

    from fl_server.superlink import start_superlink, superlink_pidfile
    from mllm_dr.center import CenterDir
    from mllm_dr.processes import ProcessError

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        center = CenterDir.init(tmp_path / "c", port=held.getsockname()[1])
        with pytest.raises(ProcessError, match=rf"port {center.config.port} \(the center's port.*in use by pid {os.getpid()}"):
            start_superlink(center)
    assert not superlink_pidfile(center).exists()
