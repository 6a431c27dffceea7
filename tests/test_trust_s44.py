"""The center's and the sites' trust material after a review of session 44 (repros: review_pki t1-t7):
approvals and revocations audited before they are written, keys and certificates replaced whole, the
SuperLink's certificate renewable (and an expired one refused by 'serve'), a bundle's CA certificate
checked, damaged heads records and checkpoint metadata named, workspace folders private. No SuperLink
or SuperNode is started here."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_json, resign_bundle, run_cli
from mllm_dr import audit
from mllm_dr.errors import InputError


@pytest.fixture(autouse=True)
def open_umask():
    old = os.umask(0o022)                  # what a default account has: files 0644 unless made private
    yield
    os.umask(old)


def _mode(p: Path) -> str:
    return oct(p.stat().st_mode & 0o777)


def _site_and_center(tmp_path, site: str = "site-a"):
    from mllm_dr.center import CenterDir
    from mllm_dr.enrollment import make_request
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / site, site)
    req = make_request(ws, tmp_path / f"{site}.req")
    return ws, req, CenterDir.init(tmp_path / "center", port=9310)


def _enrolled(tmp_path):
    """A site approved by the center, its bundle (tmp_path/bundle.json) installed: (workspace, request, center)."""
    from mllm_dr.enrollment import install_bundle, write_bundle
    from mllm_dr.signing import fingerprint, load_private

    ws, req, c = _site_and_center(tmp_path)
    c.approve(req)
    cak = fingerprint(load_private(audit.key_path(c.audit_path)).public_key())
    write_bundle(tmp_path / "bundle.json", req, c.config.address, (c.pki / "ca.crt").read_text(),
                 c.signing_pub.read_text(), cak, signing_key=load_private(c.signing_key))
    install_bundle(ws, tmp_path / "bundle.json")
    return ws, req, c


def _events(c, event: str) -> int:
    return [e["event"] for e in audit.read(c.audit_path)].count(event)


def _full_disk_for(event: str, monkeypatch):
    """audit.append fails with ENOSPC for ``event`` (the other entries are written)."""
    real = audit.append

    def failing(path, name, *a, **k):
        if name == event:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, name, *a, **k)

    monkeypatch.setattr(audit, "append", failing)


# 1 ------------------------------------------------------------------------------------------------
def test_approve_and_revoke_are_audited_before_they_are_written(tmp_path, monkeypatch, capsys):
    """The site records were written before the audit entry: a full disk at the audit log left a site
    approved with no entry, and the retry said "already approved" and wrote none (review t6)."""
    import cli.center_sites as cs

    ws, req, c = _site_and_center(tmp_path)
    _full_disk_for("approve", monkeypatch)
    with pytest.raises(OSError):
        cs.approve(tmp_path / "site-a.req", c.root, tmp_path / "b1.json", True)
    assert c.approved_sites() == [] and not (c.sites_dir / "site-a.pub").exists()    # nothing approved unaudited
    monkeypatch.undo()
    cs.approve(tmp_path / "site-a.req", c.root, tmp_path / "b2.json", True)
    cs.approve(tmp_path / "site-a.req", c.root, tmp_path / "b3.json", True)           # the same request again
    assert [s["site_id"] for s in c.approved_sites()] == ["site-a"] and _events(c, "approve") == 1

    # revoke: nothing changes when its entry cannot be written; the retry revokes, audited once
    _full_disk_for("revoke", monkeypatch)
    with pytest.raises(OSError):
        cs.revoke("site-a", c.root, True)
    assert [s["site_id"] for s in c.approved_sites()] == ["site-a"]
    monkeypatch.undo()
    cs.revoke("site-a", c.root, True)
    assert c.approved_sites() == [] and _events(c, "revoke") == 1
    assert audit.read(c.audit_path)[-1]["event"] == "revoke" and audit.verify(c.audit_path)[0]
    capsys.readouterr()


def test_an_approval_left_unaudited_gets_its_entry_at_the_next_approve(tmp_path, capsys):
    """A center where the old order already lost an entry: the next approve of that request adds it, once."""
    import cli.center_sites as cs

    ws, req, c = _site_and_center(tmp_path)
    assert c.approve(req) == "approved" and _events(c, "approve") == 0
    cs.approve(tmp_path / "site-a.req", c.root, tmp_path / "b.json", True)
    cs.approve(tmp_path / "site-a.req", c.root, tmp_path / "b.json", True)
    out = [json.loads(block) for block in capsys.readouterr().out.replace("}\n{", "}\0{").split("\0")]
    assert [o["status"] for o in out] == ["already approved", "already approved"] and _events(c, "approve") == 1


# 2 ------------------------------------------------------------------------------------------------
def test_node_key_file_is_written_first_and_repaired_by_already_approved(tmp_path, monkeypatch):
    """sites/<id>.json was written before sites/<id>.pub: a full disk at the .pub left an empty key file
    and every retry said "already approved" (review t5 A)."""
    from mllm_dr import center as center_mod

    ws, req, c = _site_and_center(tmp_path)
    pub, want = c.sites_dir / "site-a.pub", req.node_public_key + "\n"
    real = center_mod.write_private

    def full(path, data, exclusive=False):
        if str(path).endswith(".pub"):
            Path(path).write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, exclusive)

    monkeypatch.setattr(center_mod, "write_private", full)
    with pytest.raises(OSError):
        c.approve(req)
    monkeypatch.undo()
    assert c.approve(req) == "approved" and pub.read_text() == want
    for damage in (b"", b"ecdsa-sha2-nistp384 AAAAother\n"):       # cut, or another key: written again
        pub.write_bytes(damage)
        assert c.approve(req) == "already approved" and pub.read_text() == want and _mode(pub) == "0o600"
    pub.unlink()
    assert c.approve(req) == "already approved" and pub.read_text() == want


def test_keys_and_certificates_are_replaced_whole_under_a_full_disk(tmp_path):
    """write_private truncated and wrote in place: a re-install whose write hit a full disk left ca.crt cut
    at 200 bytes while federation.json still pointed at it (review t5 B)."""
    from mllm_dr.private import write_private

    ws, req, c = _enrolled(tmp_path)
    keys = ws.root / "keys"
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    script = ("import resource, signal, sys\nsys.path.insert(0, sys.argv[1])\n"
              "from mllm_dr.workspace import Workspace\nfrom mllm_dr.enrollment import install_bundle\n"
              "ws = Workspace(sys.argv[2])\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))   # the disk fills\n"
              "try:\n    install_bundle(ws, sys.argv[3])\nexcept OSError as err:\n    print('failed', err.errno)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT), str(ws.root), str(tmp_path / "bundle.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == f"failed {errno.EFBIG}", proc.stdout + proc.stderr
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before      # ca.crt whole, no temporary file left

    # mode 0600 from creation whatever the umask; exclusive keeps the file there
    os.umask(0)
    write_private(tmp_path / "k", "new")
    assert _mode(tmp_path / "k") == "0o600"
    with pytest.raises(FileExistsError):
        write_private(tmp_path / "k", "other", exclusive=True)
    assert (tmp_path / "k").read_text() == "new" and sorted(p.name for p in tmp_path.glob(".k.*")) == []
    with pytest.MonkeyPatch.context() as mp:                   # a file system without hard links (vfat)
        mp.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no hard links")))
        write_private(tmp_path / "k2", "made", exclusive=True)
        with pytest.raises(FileExistsError):
            write_private(tmp_path / "k2", "other", exclusive=True)
    assert (tmp_path / "k2").read_text() == "made" and _mode(tmp_path / "k2") == "0o600"
    assert sorted(p.name for p in tmp_path.glob(".k2.*")) == []


# 3 ------------------------------------------------------------------------------------------------
def _expired_server_cert(c, days_ago: int = 900, valid_days: int = 825):
    from mllm_dr.pki import make_server_cert

    make_server_cert(c.pki, c.config.san_hosts, valid_days,
                     now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago))


def test_renew_cert_keeps_the_ca_and_extends_an_expired_certificate(tmp_path):
    """The 825-day SuperLink certificate had no renewal: `renew-cert` issues it again with the same CA."""
    from cryptography import x509

    from mllm_dr.center import CenterDir
    from mllm_dr.pki import cert_expiry, cert_sans

    c = CenterDir.init(tmp_path / "center", port=9311)
    _expired_server_cert(c)
    ca = (c.pki / "ca.crt").read_bytes()
    assert cert_expiry(c.server_cert_path) < dt.datetime.now(dt.timezone.utc)
    res = cli_json("mllmdr-center", "renew-cert", "--dir", c.root, "--san", "center2.hospital.example.org")
    assert (c.pki / "ca.crt").read_bytes() == ca                              # enrolled sites keep trusting it
    expires = cert_expiry(c.server_cert_path)
    assert expires > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=800)
    assert res["expires"] == expires.isoformat() and res["restart_needed"] is False
    cert = x509.load_pem_x509_certificate(c.server_cert_path.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    assert "center2.hospital.example.org" in cert_sans(c.server_cert_path)
    assert "center2.hospital.example.org" in CenterDir(c.root).config.san_hosts   # kept for the next renewal
    assert _mode(c.server_cert_path) == "0o600" and CenterDir(c.root).server_cert_warning() is None
    last = audit.read(c.audit_path)[-1]
    assert last["event"] == "renew_cert" and last["expires"] == res["expires"]

    bad = run_cli("mllmdr-center", "renew-cert", "--dir", c.root, "--san", "not a host!", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not a host!" in bad.stderr
    from cli.center_sites import renew_cert

    assert "Example: mllmdr-center renew-cert --dir" in renew_cert.__doc__


def test_serve_refuses_an_expired_certificate_and_warns_before(tmp_path, monkeypatch):
    from cli import center_service
    from fl_server import superlink
    from mllm_dr.center import CenterDir

    c = CenterDir.init(tmp_path / "center", port=9312)
    _expired_server_cert(c)
    with pytest.raises(InputError) as err:
        c.server_cert_warning()
    msg = str(err.value)
    assert msg.startswith(f"{c.server_cert_path}: ") and "expired on " in msg and "renew-cert --dir" in msg
    assert "\n" not in msg

    def must_not_start(center, *a, **k):
        raise AssertionError("the SuperLink was started with an expired certificate")

    monkeypatch.setattr(superlink, "start_superlink", must_not_start)
    with pytest.raises(InputError, match="expired on"):
        center_service.serve(c.root, True, True)
    _expired_server_cert(c, days_ago=815)                      # 10 days left: a warning, not a refusal
    assert "expires on" in c.server_cert_warning() and "renew-cert" in c.server_cert_warning()


# 4 ------------------------------------------------------------------------------------------------
def test_a_bundle_whose_ca_is_not_a_ca_certificate_is_refused(tmp_path):
    """`enroll --accept` installed any text as keys/ca.crt, over a working one (review t3 b)."""
    from mllm_dr.enrollment import install_bundle

    ws, req, c = _enrolled(tmp_path)
    ca = (ws.root / "keys" / "ca.crt").read_bytes()
    bundle = json.loads((tmp_path / "bundle.json").read_text())
    bad = bundle | {"ca_certificate": "-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    resign_bundle(tmp_path / "bad.json", c.signing_key)
    proc = run_cli("mllmdr-site", "enroll", "--workspace", ws.root, "--accept", tmp_path / "bad.json", check=False)
    assert proc.returncode == 2 and "bad.json" in proc.stderr and "not a PEM certificate" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and (ws.root / "keys" / "ca.crt").read_bytes() == ca
    leaf = bundle | {"ca_certificate": c.server_cert_path.read_text()}      # a certificate, but no CA
    (tmp_path / "leaf.json").write_text(json.dumps(leaf))
    resign_bundle(tmp_path / "leaf.json", c.signing_key)
    with pytest.raises(InputError, match="not a CA certificate"):
        install_bundle(ws, tmp_path / "leaf.json")
    assert (ws.root / "keys" / "ca.crt").read_bytes() == ca


# 5 ------------------------------------------------------------------------------------------------
def test_a_damaged_heads_record_is_named_not_a_bare_json_error(tmp_path):
    """A damaged line in sites/<id>.heads.jsonl raised JSONDecodeError out of keep_reply_head (review t7)."""
    from mllm_dr import audit_heads

    ws, req, c = _site_and_center(tmp_path)
    c.approve(req)
    audit.append(ws.audit_path, "x")
    fields = audit_heads.to_fields(audit.head(ws.audit_path))
    assert c.keep_reply_head("site-a", fields, run="r", round=1) is None
    path = c.site_heads_path("site-a")
    for damage in ("{damaged\n", '{"head": {"entries": "x"}}\n', "[1]\n"):
        kept = path.read_text().splitlines(keepends=True)[:1]
        path.write_text("".join(kept) + damage)
        why = c.keep_reply_head("site-a", fields, run="r", round=2)
        assert why == f"{path}: line 2 is not a recorded audit head (received, head: key, entries, last_hash, " \
                      "time): a damaged record; restore it from a backup or remove that line"
    with pytest.raises(InputError, match="line 2"):
        audit_heads.record(path, audit.head(ws.audit_path))


# 6 ------------------------------------------------------------------------------------------------
def test_checkpoint_metadata_of_another_shape_is_a_signature_error(tmp_path):
    """checkpoint.json of valid JSON but another shape raised TypeError/AttributeError (exit 3), review t4."""
    import torch

    from mllm_dr.signing import SignatureError, load_private, new_signing_key, read_checkpoint, write_checkpoint

    pub = new_signing_key(tmp_path / "k" / "signing.key")
    ctx = {"round": 1, "stage": 1, "base_model": "x", "base_sha256": "ab", "run": "r", "model": {}, "dims": {},
           "feature_recipe": ""}
    write_checkpoint(tmp_path / "ck", load_private(tmp_path / "k" / "signing.key"), {"a": torch.ones(2)}, ctx)
    meta_path = tmp_path / "ck" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    assert read_checkpoint(tmp_path / "ck", pub)[1]["round"] == 1
    for bad in (meta | {"signature": None}, meta | {"signature": 5}, [meta], "x"):
        meta_path.write_text(json.dumps(bad))
        with pytest.raises(SignatureError, match="refusing to load"):
            read_checkpoint(tmp_path / "ck", pub)


# 7 ------------------------------------------------------------------------------------------------
def test_a_workspace_folder_made_beforehand_becomes_private(tmp_path):
    """A folder made by IT (0755) stayed 0755; federation/ and the SuperNode's log were 0755/0644 (review t2)."""
    from mllm_dr.processes import spawn
    from mllm_dr.workspace import Workspace

    (tmp_path / "ws").mkdir()
    assert _mode(tmp_path / "ws") == "0o755"
    ws = Workspace.init(tmp_path / "ws", "site-a")
    assert _mode(ws.root) == "0o700" and _mode(ws.root / "federation") == "0o700"
    log = ws.root / "federation" / "supernode.log"
    log.write_text("an older kit's log\n")                     # 0644 under this umask
    spawn(["true"], log).wait(timeout=30)
    assert _mode(log) == "0o600" and log.read_text() == "an older kit's log\n"
    fresh = tmp_path / "state" / "superlink.log"
    spawn(["true"], fresh).wait(timeout=30)
    assert _mode(fresh) == "0o600"


def test_a_revoke_cut_short_between_its_two_writes_approves_nothing(tmp_path):
    """`revoke` writes the revoked record, then deletes the approved one: cut short in between (a crash, a full
    disk), the site was both, and every `serve` registered its key again (`register_all` read the approved
    records). Since session 44 a record whose key is on the revoked list approves nothing: not listed, not a
    site a reply can speak for, not "already approved" for the same request, never registered."""
    import shutil

    from fl_server.superlink import register_all

    _, req, c = _site_and_center(tmp_path)
    c.approve(req)
    kept = tmp_path / "kept"
    kept.mkdir()
    for suffix in (".json", ".pub"):
        shutil.copy(c.sites_dir / f"{req.site_id}{suffix}", kept)
    c.revoke(req.site_id, unregistered=False)
    for suffix in (".json", ".pub"):                  # the approved files as a revoke cut short left them
        shutil.copy(kept / f"{req.site_id}{suffix}", c.sites_dir)
    assert c.approved_sites() == []
    with pytest.raises(InputError, match="no approved site"):
        c.site(req.site_id)
    with pytest.raises(InputError, match="was revoked"):
        c.approve(req)
    assert register_all(c) == {}                      # nothing to register: no flwr call is made


def test_a_lost_or_edited_node_pub_is_made_again_from_the_node_key(tmp_path):
    """`enroll --out` read keys/node.pub as the site's key: missing, the request failed ("does not exist");
    edited, another key went out in the request. The public key now comes from the private key, and node.pub
    is written again from it; an unreadable private key is named (a review, session 44)."""
    from mllm_dr.enrollment import make_request
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site-a")
    first = make_request(ws, tmp_path / "a.req")
    pub = ws.root / "keys" / "node.pub"
    pub.unlink()
    again = make_request(ws, tmp_path / "b.req")
    assert again.node_public_key == first.node_public_key and pub.read_text().strip() == first.node_public_key
    pub.write_text(_site_and_center(tmp_path / "other")[1].node_public_key + "\n")     # another site's key
    assert make_request(ws, tmp_path / "c.req").fingerprint == first.fingerprint
    assert pub.read_text().strip() == first.node_public_key
    (ws.root / "keys" / "node").write_text("not a key")
    with pytest.raises(InputError, match="node key cannot be read"):
        make_request(ws, tmp_path / "d.req")
