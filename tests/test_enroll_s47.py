"""Session 47 (enrollment trust, the center's operator output): a site pins the center it expects with
`enroll --accept BUNDLE --center-fingerprint FP` (the bundle travels by e-mail or USB: a swapped one made a site
trust another center), and the center signs its bundles so that the pin covers the CA certificate, audit key and
address too; `mllmdr-center init | fingerprint` print the fingerprints to read out; `init` and `approve` print
aligned lines, not Python-style key=value (their --json unchanged); `--replace-center` retires the old center's
records (its signed audit heads, the run policies pinned for its runs) to a dated folder, audited.
Real keys, CA certificates and bundles throughout; no SuperLink or SuperNode is started."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import cli_json, run_cli
from mllm_dr import audit
from mllm_dr.errors import InputError

INIT_JSON_KEYS = ["dir", "address", "tls_names", "signing_key", "feature_recipe"]      # as before session 47
APPROVE_JSON_KEYS = ["site_id", "status", "node_fingerprint", "bundle", "registered"]


def _center(tmp_path, name: str = "center", port: int = 9200):
    from mllm_dr.center import CenterDir

    return CenterDir.init(tmp_path / name, port=port)


def _signing_fp(c) -> str:
    from mllm_dr.signing import fingerprint, load_private

    return fingerprint(load_private(c.signing_key).public_key())


@pytest.fixture
def site(tmp_path):
    """A site workspace with its node key and request: (workspace, request file)."""
    from mllm_dr.enrollment import make_request
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "site-a", "site-a")
    make_request(ws, tmp_path / "site-a.req")
    return ws, tmp_path / "site-a.req"


def _approve(c, req: Path, out: Path) -> Path:
    cli_json("mllmdr-center", "approve", req, "--dir", c.root, "--out", out)
    return out


def _accept(ws, bundle: Path, *args, check: bool = True):
    return run_cli("mllmdr-site", "enroll", "--workspace", ws.root, "--accept", bundle, *args, check=check)


def _events(ws, name: str) -> list[dict]:
    return [e for e in audit.read(ws.audit_path) if e["event"] == name]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# 1: a matching pin is accepted, in the formats the center prints ---------------------------------------------
def test_a_matching_pin_is_accepted_and_audited_as_pinned(site, tmp_path):
    ws, req = site
    c = _center(tmp_path)
    fp = _signing_fp(c)
    bundle = _approve(c, req, tmp_path / "a.bundle")
    assert json.loads(bundle.read_text())["signature"]                 # the center signs every bundle it writes

    grouped = " ".join(fp[i:i + 4] for i in range(0, 16, 4)).upper()   # read out in groups, typed in capitals
    proc = _accept(ws, bundle, "--center-fingerprint", grouped, "--json")
    out = json.loads(proc.stdout)
    assert out["center"] == fp and out["center_pinned"] is True and out["bundle_signed"] is True
    assert "compare it" not in proc.stderr                              # no advice to compare: it was compared
    entry = _events(ws, "enroll_accept")[-1]
    assert entry["center"] == fp and entry["center_pinned"] is True and entry["bundle_signed"] is True
    assert json.loads((ws.root / "federation.json").read_text())["center_fingerprint"] == fp

    # without a pin: accepted, with one line that names the fingerprint to compare out of band; audited unpinned
    again = _accept(ws, bundle)
    note = [line for line in again.stderr.splitlines() if fp in line]
    assert len(note) == 1 and "compare it" in note[0] and "--center-fingerprint" in note[0]
    assert "key=" not in again.stdout and re.search(r"\bcenter key\s+" + fp, again.stdout), again.stdout
    assert _events(ws, "enroll_accept")[-1]["center_pinned"] is False


def test_the_fingerprint_formats(tmp_path):
    """16 hex digits as `init` / `fingerprint` print them; case, ':' and blanks do not matter; anything else is
    refused in one line (the CA certificate's 64-digit SHA-256 is named as such)."""
    from mllm_dr.enrollment import pinned_fingerprint

    fp = "0bc76642adc2c70b"
    for typed in (fp, fp.upper(), "0bc7 6642 adc2 c70b", "0B:C7:66:42:AD:C2:C7:0B", "0bc7:6642:adc2:c70b",
                  f"  {fp}\n", "0BC7 6642\tADC2 C70B"):
        assert pinned_fingerprint(typed) == fp, typed
    for bad in ("", fp[:-1], fp + "0", "0bc76642adc2c70g", "signing_key=" + fp, "0bc7-6642-adc2-c70b"):
        with pytest.raises(InputError, match="not a center key fingerprint: 16 hex digits"):
            pinned_fingerprint(bad)
    with pytest.raises(InputError, match="CA certificate's SHA-256"):
        pinned_fingerprint(":".join(["AB"] * 32))

    # what the center prints: `fingerprint` (human and --json) agrees with init's key and with OpenSSL's CA digest
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    c = _center(tmp_path)
    ident = cli_json("mllmdr-center", "fingerprint", "--dir", c.root)
    assert ident["signing_key"] == _signing_fp(c) and pinned_fingerprint(ident["signing_key"]) == ident["signing_key"]
    der = x509.load_pem_x509_certificate((c.pki / "ca.crt").read_bytes()).public_bytes(serialization.Encoding.DER)
    assert ident["ca_sha256"] == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    from mllm_dr.signing import fingerprint, load_private

    assert ident["audit_key"] == fingerprint(load_private(audit.key_path(c.audit_path)).public_key())
    text = run_cli("mllmdr-center", "fingerprint", "--dir", c.root).stdout
    assert re.search(r"signing key fingerprint\s+" + ident["signing_key"], text)
    assert ident["ca_sha256"] in text and "key=" not in text


# 2: a wrong pin is refused, nothing written -------------------------------------------------------------------
def test_a_wrong_pin_is_refused_in_one_line_and_nothing_is_written(site, tmp_path):
    ws, req = site
    c = _center(tmp_path)
    fp = _signing_fp(c)
    bundle = _approve(c, req, tmp_path / "a.bundle")
    wrong = ("f" if fp[0] != "f" else "e") + fp[1:]
    before = _snapshot(ws.root)
    proc = _accept(ws, bundle, "--center-fingerprint", wrong, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(bundle) in proc.stderr and fp in proc.stderr and wrong in proc.stderr and "nothing" in proc.stderr
    assert _snapshot(ws.root) == before                      # no federation.json, no ca.crt, no audit entry
    assert not (ws.root / "federation.json").exists() and not _events(ws, "enroll_accept")

    # a malformed pin: refused before the bundle is read
    bad = _accept(ws, bundle, "--center-fingerprint", "not-a-fingerprint", check=False)
    assert bad.returncode == 2 and "16 hex digits" in bad.stderr and _snapshot(ws.root) == before

    # the right key, but a field changed after the center signed (another address, CA or audit key): refused,
    # pinned or not; an unsigned bundle (an older center kit) is refused under a pin, which could not cover it
    fields = json.loads(bundle.read_text())
    (tmp_path / "edited.bundle").write_text(json.dumps(fields | {"superlink_address": "10.6.6.6:9092"}))
    (tmp_path / "unsigned.bundle").write_text(json.dumps({k: v for k, v in fields.items() if k != "signature"}))
    stripped = {k: v for k, v in fields.items() if k != "signature"} | {"superlink_address": "10.6.6.6:9092"}
    (tmp_path / "stripped.bundle").write_text(json.dumps(stripped))     # signature deleted, address edited
    for name, args, says in (("edited.bundle", ("--center-fingerprint", fp), "signature does not verify"),
                             ("edited.bundle", (), "signature does not verify"),
                             ("unsigned.bundle", ("--center-fingerprint", fp), "not signed"),
                             ("stripped.bundle", (), "--allow-unsigned-bundle")):     # the second read's F1
        refused = _accept(ws, tmp_path / name, *args, check=False)
        assert refused.returncode == 2 and says in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert _snapshot(ws.root) == before, name
    # an older center kit's unsigned bundle only when the operator says so, audited
    proc = _accept(ws, tmp_path / "unsigned.bundle", "--allow-unsigned-bundle", "--json")
    taken = json.loads(proc.stdout)
    assert taken["bundle_signed"] is False and _events(ws, "enroll_accept")[-1]["unsigned_allowed"] is True
    # its check line does not send the operator to the key fingerprint alone (it matches a swapped CA's bundle)
    assert "does not cover its CA certificate" in proc.stderr and taken["ca_sha256"] in proc.stderr
    # enrolled with that center now: an unsigned bundle of its key is refused even with the flag (implicit pin)
    enrolled_now = _snapshot(ws.root)
    refused = _accept(ws, tmp_path / "stripped.bundle", "--allow-unsigned-bundle", check=False)
    assert refused.returncode == 2 and "enrolled with its center" in refused.stderr
    assert _snapshot(ws.root) == enrolled_now

    # a wrong pin on a bundle of another center, with --replace-center: the enrolled center stays, nothing retired
    _accept(ws, bundle, "--center-fingerprint", fp)
    enrolled_now = _snapshot(ws.root)       # enrolled pinned and signed: the stripped copy still refused, flag or not
    for args in ((), ("--allow-unsigned-bundle",)):
        refused = _accept(ws, tmp_path / "stripped.bundle", *args, check=False)
        assert refused.returncode == 2 and "enrolled with its center" in refused.stderr
        assert _snapshot(ws.root) == enrolled_now
    other = _center(tmp_path, "other", 9300)
    other_bundle = _approve(other, req, tmp_path / "other.bundle")
    enrolled = _snapshot(ws.root)
    proc = _accept(ws, other_bundle, "--replace-center", "--center-fingerprint", fp, check=False)
    assert proc.returncode == 2 and _signing_fp(other) in proc.stderr and fp in proc.stderr
    assert _snapshot(ws.root) == enrolled and not (ws.root / "federation" / "retired").exists()


# 3: the center's operator output --------------------------------------------------------------------------------
def test_init_and_approve_print_aligned_lines_and_their_json_is_unchanged(site, tmp_path):
    ws, req = site
    human = run_cli("mllmdr-center", "init", "--dir", tmp_path / "c1", "--port", "9201").stdout
    assert not re.search(r"\w=\S", human), human                  # no Python-style key=value
    fp = cli_json("mllmdr-center", "fingerprint", "--dir", tmp_path / "c1")["signing_key"]
    assert re.search(r"^\s+signing key fingerprint\s+" + fp + r"$", human, re.M), human
    assert re.search(r"^\s+address\s+127\.0\.0\.1:9201$", human, re.M) and "CA certificate SHA-256" in human
    assert f"--center-fingerprint {fp}" in human                   # what the site types, ready to read out

    out = cli_json("mllmdr-center", "init", "--dir", tmp_path / "c2", "--port", "9202")
    assert list(out) == INIT_JSON_KEYS and re.fullmatch(r"[0-9a-f]{16}", out["signing_key"])
    assert out["address"] == "127.0.0.1:9202" and out["feature_recipe"] is None and "127.0.0.1" in out["tls_names"]

    human = run_cli("mllmdr-center", "approve", req, "--dir", tmp_path / "c1", "--out", tmp_path / "a.bundle").stdout
    assert not re.search(r"\w=\S", human), human
    assert re.search(r"^site site-a: approved$", human, re.M)
    assert re.search(r"^\s+center key\s+" + fp + "$", human, re.M)
    again = cli_json("mllmdr-center", "approve", req, "--dir", tmp_path / "c1", "--out", tmp_path / "b.bundle")
    assert list(again) == APPROVE_JSON_KEYS and again["status"] == "already approved"
    assert again["bundle"] == str(tmp_path / "b.bundle") and again["registered"] == "at next serve"


# 4: --replace-center retires the old center's records -----------------------------------------------------------
def test_replace_center_retires_the_old_centers_heads_audited(site, tmp_path):
    from mllm_dr import audit_heads
    from mllm_dr.enrollment import federation_settings

    _, req = site
    ws, old, new, new_bundle, _ = _enrolled_with_old_center(site, tmp_path)
    audit.append(old.audit_path, "round", run="r1")
    audit_heads.record_center_head(ws, audit.head(old.audit_path), run="r1")
    heads = audit_heads.center_heads_path(ws)
    kept_heads, old_ca = heads.read_bytes(), (ws.root / "keys" / "ca.crt").read_bytes()
    old_settings = (ws.root / "federation.json").read_bytes()
    pins = ws.root / "federation" / "run_policies.json"
    pins.write_text(json.dumps({"r1": "0" * 64}))

    refused = _accept(ws, new_bundle, check=False)                 # no --replace-center: nothing moves
    assert refused.returncode == 2 and heads.read_bytes() == kept_heads
    assert not (ws.root / "federation" / "retired").exists()

    out = json.loads(_accept(ws, new_bundle, "--replace-center", "--json").stdout)
    assert out["replaced_center"] == _signing_fp(old)
    retired = ws.root / out["retired_center_records"]
    assert retired.parent == ws.root / "federation" / "retired"
    assert re.fullmatch(r"\d{8}T\d{6}Z-center-" + _signing_fp(old), retired.name), retired.name
    assert oct(retired.stat().st_mode & 0o777) == "0o700"
    assert (retired / "center-heads.jsonl").read_bytes() == kept_heads and not heads.exists()
    assert json.loads((retired / "run_policies.json").read_text()) == {"r1": "0" * 64} and not pins.exists()
    assert (retired / "federation.json").read_bytes() == old_settings and (retired / "ca.crt").read_bytes() == old_ca
    assert federation_settings(ws).center_fingerprint == _signing_fp(new)

    # audited before the move, and named by the enrollment's own entry
    events = [e["event"] for e in audit.read(ws.audit_path)]
    assert events[-2:] == ["center_records_retired", "enroll_accept"]
    entry = _events(ws, "center_records_retired")[-1]
    assert entry["center"] == _signing_fp(old) and entry["new_center"] == _signing_fp(new)
    assert entry["folder"] == out["retired_center_records"]
    assert entry["moved"] == ["federation/center-heads.jsonl", "federation/run_policies.json"]
    accept = _events(ws, "enroll_accept")[-1]
    assert accept["retired_center_records"] == out["retired_center_records"]
    assert audit.verify(ws.audit_path)[0]

    # the new center's heads start a record of their own; the retired one still checks the old center's log
    audit_heads.record_center_head(ws, audit.head(new.audit_path), run="r1")
    assert len(heads.read_text().splitlines()) == 1
    assert audit_heads.check_log(old.audit_path, retired / "center-heads.jsonl")[0]

    # the same center again (a new bundle, same key) retires nothing
    _accept(ws, _approve(new, req, tmp_path / "new2.bundle"))
    assert len(list((ws.root / "federation" / "retired").iterdir())) == 1 and heads.is_file()


def test_a_fingerprint_with_ab_and_cd_prints_literally(capsys):
    """rich turned ":AB:" and ":CD:" of an OpenSSL-style SHA-256 into emoji (about 11% of CA fingerprints printed
    wrong, in the very comparison an operator makes with openssl; the second read of session 47)."""
    from cli.field_lines import print_fields

    digest = "7B:AB:66:94:CD:5C"
    print_fields("center", [("CA certificate SHA-256", digest)])
    assert digest in capsys.readouterr().out


def _enrolled_with_old_center(site, tmp_path):
    """A site enrolled with an "old" center that signed one audit head for it, and a "new" center's bundle:
    (workspace, old center, new center, the new bundle, the bytes of its federation.json, CA and heads)."""
    from mllm_dr import audit_heads

    ws, req = site
    old, new = _center(tmp_path, "old", 9200), _center(tmp_path, "new", 9300)
    _accept(ws, _approve(old, req, tmp_path / "old.bundle"))
    audit.append(old.audit_path, "run_start", run="r1")
    audit_heads.record_center_head(ws, audit.head(old.audit_path), run="r1")
    heads = audit_heads.center_heads_path(ws)
    kept = {p: (ws.root / p).read_bytes() for p in ("federation.json", "keys/ca.crt", heads.relative_to(ws.root))}
    return ws, old, new, _approve(new, req, tmp_path / "new.bundle"), kept


def _unmatched_retirements(ws) -> int:
    """Retirements the log does not say were undone."""
    return len(_events(ws, "center_records_retired")) - len(_events(ws, "center_records_retired_failed"))


def test_a_replace_center_that_cannot_write_the_new_ca_leaves_the_old_center_whole(site, tmp_path, monkeypatch):
    """A full disk at the new keys/ca.crt (the reviewer's reproducer, the second read's F8): the old center's heads
    had been moved away first, and putting them back rewrote ca.crt on the same full disk, so no
    center_records_retired_failed entry said so. The new files are now written before anything is retired."""
    from mllm_dr import enrollment

    ws, _, _, new_bundle, kept = _enrolled_with_old_center(site, tmp_path)
    real = enrollment.write_private

    def full_disk(path, data, *args, **kwargs):
        if Path(path).parent.name == "keys" and "ca.crt" in Path(path).name:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data, *args, **kwargs)

    monkeypatch.setattr(enrollment, "write_private", full_disk)
    with pytest.raises(OSError):
        enrollment.accept_bundle(ws, new_bundle, replace_center=True)
    assert {p: (ws.root / p).read_bytes() for p in kept} == kept        # old center, its CA and its heads in place
    assert _unmatched_retirements(ws) == 0
    assert not [p.name for p in ws.root.rglob(".*.new")]                 # no staged file left behind


def test_a_replace_center_that_fails_at_the_last_rename_puts_the_old_center_back(site, tmp_path, monkeypatch):
    """The new CA certificate already in place, federation.json cannot be replaced: the old center's heads and its
    CA certificate go back, audited."""
    import os

    from mllm_dr import enrollment

    ws, _, _, new_bundle, kept = _enrolled_with_old_center(site, tmp_path)
    real = os.replace

    def refuse(src, dst, *args, **kwargs):
        if Path(dst) == ws.root / enrollment.FEDERATION_FILE:
            raise OSError(5, "Input/output error", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        enrollment.accept_bundle(ws, new_bundle, replace_center=True)
    monkeypatch.setattr(os, "replace", real)
    assert {p: (ws.root / p).read_bytes() for p in kept} == kept
    failed = _events(ws, "center_records_retired_failed")[-1]
    assert set(failed["restored"]) >= {"federation/center-heads.jsonl"} and "not_restored" not in failed
    assert _unmatched_retirements(ws) == 0 and audit.verify(ws.audit_path)[0]
    assert not [p.name for p in ws.root.rglob(".*.new")]


def test_a_failed_replace_center_puts_the_old_centers_records_back(site, tmp_path, monkeypatch):
    """The old center's heads were moved away before the new settings were written: a failure in between (a full
    disk) left the site enrolled with the old center without its heads record (the second read's F8)."""
    from mllm_dr import enrollment

    ws, _, _, new_bundle, kept = _enrolled_with_old_center(site, tmp_path)
    real = enrollment.atomic_write_text

    def full_disk(path, text):
        if enrollment.FEDERATION_FILE in Path(path).name:       # the settings, or their staged copy
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(enrollment, "atomic_write_text", full_disk)
    with pytest.raises(OSError):
        enrollment.accept_bundle(ws, new_bundle, replace_center=True)
    assert {p: (ws.root / p).read_bytes() for p in kept} == kept        # old center, its CA and its heads in place
    assert _unmatched_retirements(ws) == 0         # nothing retired, or put back and audited
