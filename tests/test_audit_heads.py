"""Signed audit heads kept by the other side: truncation and rollback are caught (RFC 9162
style); heads that go backwards are refused on arrival; the CLI's audit commands."""

from __future__ import annotations

import json

import pytest

from conftest import cli_json, run_cli
from mllm_dr import audit, audit_heads
from mllm_dr.audit import HeadError
from mllm_dr.workspace import Workspace


def _spec(h: dict) -> str:
    return f"{h['entries']}:{h['last_hash']}"


def _lines(ws):
    return ws.audit_path.read_text().splitlines()


def test_deleting_the_last_entry_is_caught_by_a_head_held_elsewhere(logged):
    h = audit.head(logged.audit_path)
    assert h["entries"] == 5 and audit.verify_head(h, h["key"])
    assert audit.verify(logged.audit_path, expect_head=h)[0]
    logged.audit_path.write_text("\n".join(_lines(logged)[:-1]) + "\n")
    assert audit.verify(logged.audit_path)[0]             # the chain alone cannot see it
    ok, msg = audit.verify(logged.audit_path, expect_head=h)
    assert not ok and "truncated" in msg and "entries 5..5" in msg
    proc = run_cli("mllmdr-site", "audit", "verify", "--workspace", logged.root, "--expect-head", _spec(h), check=False)
    assert proc.returncode == 2 and "truncated" in proc.stderr


def test_rollback_then_regrowth_is_caught(logged):
    """Cut back to 3 entries, then write 4 new ones: the log is longer than the head, but entry 5 differs."""
    h = audit.head(logged.audit_path)
    logged.audit_path.write_text("\n".join(_lines(logged)[:3]) + "\n")
    for i in range(4):
        audit.append(logged.audit_path, "score", actor="dr.y", participant=f"40{i}")
    assert audit.verify(logged.audit_path)[0] and len(audit.read(logged.audit_path)) == 7
    ok, msg = audit.verify(logged.audit_path, expect_head=h)
    assert not ok and "rolled back" in msg and "seq 5" in msg


def test_heads_file_refuses_backwards_and_forged_heads(logged, tmp_path):
    heads = tmp_path / "center" / "sites" / "site1.heads.jsonl"
    key = audit.head(logged.audit_path)["key"]
    audit_heads.record(heads, audit.head(logged.audit_path), key, run="r", round=1)
    audit.append(logged.audit_path, "federated_round", run="r", round=2)
    audit_heads.record(heads, audit.head(logged.audit_path), key, run="r", round=2)
    assert [r["head"]["entries"] for r in map(json.loads, heads.read_text().splitlines())] == [5, 6]
    assert oct(heads.stat().st_mode & 0o777) == "0o600"

    logged.audit_path.write_text("\n".join(_lines(logged)[:-1]) + "\n")      # the site cuts its log
    with pytest.raises(HeadError, match="goes backwards"):
        audit_heads.record(heads, audit.head(logged.audit_path), key)
    forged = audit.head(logged.audit_path) | {"entries": 9}
    with pytest.raises(HeadError, match="signature does not verify"):
        audit_heads.record(heads, forged, key)
    with pytest.raises(HeadError, match="expected audit key"):
        audit_heads.record(heads, audit.head(logged.audit_path), "0" * 16)
    assert len(heads.read_text().splitlines()) == 2                         # nothing refused was kept

    # the site's log checked against what the center recorded: both the CLI and the library
    ok, msg = audit_heads.check_log(logged.audit_path, heads)
    assert not ok and "truncated" in msg
    proc = run_cli("mllmdr-site", "audit", "verify", "--workspace", logged.root, "--against", heads, check=False)
    assert proc.returncode == 2 and "truncated" in proc.stderr


def test_a_forged_record_cannot_make_an_intact_log_look_cut(logged, tmp_path):
    other = Workspace.init(tmp_path / "other", "site2")
    fake = tmp_path / "fake.heads.jsonl"
    fake.write_text(json.dumps(audit.head(other.audit_path) | {"entries": 50}) + "\n")
    ok, msg = audit_heads.check_log(logged.audit_path, fake)
    assert not ok and "head 1" in msg and "key" in msg                       # named as a bad record, not a cut log


def test_head_travels_in_short_config_fields(logged):
    h = audit.head(logged.audit_path)
    fields = audit_heads.to_fields(h)
    assert all(k.startswith("audit-head-") and len(str(v)) <= 128 for k, v in fields.items())
    back = audit_heads.from_fields({**fields, "site-id": "site1"})
    assert audit.verify_head(back, h["key"]) and back["entries"] == h["entries"]
    assert audit_heads.from_fields({"site-id": "site1"}) is None


def test_center_records_site_heads_against_the_enrollment_key(tmp_path, logged):
    from mllm_dr.center import CenterDir
    from mllm_dr.enrollment import make_request, read_request

    c = CenterDir.init(tmp_path / "center")
    make_request(logged, tmp_path / "req.json")
    req = read_request(tmp_path / "req.json")
    # a request naming no audit key (an older kit's) was approved, and then the first head to arrive, whoever
    # signed it, became the site's anchor: refused, the site makes a new request
    from mllm_dr.errors import InputError

    with pytest.raises(InputError, match="names no audit-log key"):
        c.approve(req.model_copy(update={"audit_key": ""}))
    assert c.approved_sites() == []
    assert c.approve(req) == "approved"
    c.record_site_head("site1", audit.head(logged.audit_path), run="r", round=1)
    assert audit_heads.latest(c.site_heads_path("site1"))["entries"] == len(audit.read(logged.audit_path))
    impostor = Workspace.init(tmp_path / "impostor", "site1")                 # another audit key, same site id
    with pytest.raises(HeadError, match="expected audit key"):
        c.record_site_head("site1", audit.head(impostor.audit_path))
    events = [e["event"] for e in audit.read(c.audit_path)]
    assert events[-2:] == ["site_audit_head", "site_audit_head_refused"]
    assert audit.verify(c.audit_path)[0]


def test_site_records_center_heads_and_refuses_a_center_rollback(enrolled_ws, tmp_path):
    center_log = tmp_path / "c" / "audit" / "audit.jsonl"
    audit.append(center_log, "center_init")
    audit.append(center_log, "approve", site="site1")
    audit_heads.record_center_head(enrolled_ws, audit.head(center_log), run="r")
    center_log.write_text(center_log.read_text().splitlines()[0] + "\n")
    with pytest.raises(HeadError, match="goes backwards"):
        audit_heads.record_center_head(enrolled_ws, audit.head(center_log))
    ok, msg = audit_heads.check_log(center_log, audit_heads.center_heads_path(enrolled_ws))
    assert not ok and "truncated" in msg


def test_show_rejects_bad_dates_and_marks_tampered_entries(logged):
    for bad in ("2026-13-45", "yesterday"):
        proc = run_cli("mllmdr-site", "audit", "show", "--workspace", logged.root, "--since", bad, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and bad in proc.stderr
    assert run_cli("mllmdr-site", "audit", "show", "--workspace", logged.root, "--since", "2000-01-01").returncode == 0
    lines = _lines(logged)
    lines[2] = lines[2].replace('"participant": "302"', '"participant": "399"')
    logged.audit_path.write_text("\n".join(lines) + "\n")
    proc = run_cli("mllmdr-site", "audit", "show", "--workspace", logged.root, "--json")
    shown = json.loads(proc.stdout)
    assert "warning" in proc.stderr and "line 3" in proc.stderr
    assert [bool(e.get("tampered")) for e in shown] == [False, False, True, True, True]


def test_export_needs_csv_or_jsonl(logged, tmp_path):
    proc = run_cli("mllmdr-site", "audit", "export", "--workspace", logged.root, "--out", tmp_path / "a.txt",
                   check=False)
    assert proc.returncode == 2 and not (tmp_path / "a.txt").exists() and ".csv or .jsonl" in proc.stderr
    out = cli_json("mllmdr-site", "audit", "export", "--workspace", logged.root, "--out", tmp_path / "a.jsonl")
    assert out["verified"] and out["entries"] == 5 == len((tmp_path / "a.jsonl").read_text().splitlines())
    # export verified only against the folder's own key: a log re-signed under a swapped key pair exported as
    # "verified". It takes the same anchors as 'audit verify' now (the key known from enrollment, heads)
    key = audit.head(logged.audit_path)["key"]
    other = Workspace.init(tmp_path / "other", "site9")
    wrong = audit.head(other.audit_path)["key"]
    bad = run_cli("mllmdr-site", "audit", "export", "--workspace", logged.root, "--out", tmp_path / "b.jsonl",
                  "--expect-key", wrong, check=False)
    assert bad.returncode == 2 and not (tmp_path / "b.jsonl").exists() and "not exporting" in bad.stderr
    out = cli_json("mllmdr-site", "audit", "export", "--workspace", logged.root, "--out", tmp_path / "b.jsonl",
                   "--expect-key", key)
    assert out["entries"] == 5


def test_audit_head_cli(logged):
    h = json.loads(run_cli("mllmdr-site", "audit", "head", "--workspace", logged.root, "--json").stdout)
    assert audit.verify_head(h) and h["entries"] == 5
    ok = run_cli("mllmdr-site", "audit", "verify", "--workspace", logged.root, "--expect-head", _spec(h))
    assert "matches 1 head" in ok.stdout
    bad = run_cli("mllmdr-site", "audit", "verify", "--workspace", logged.root, "--expect-head", "5:xyz", check=False)
    assert bad.returncode == 2 and "ENTRIES:SHA256" in bad.stderr


def test_a_new_enrollment_key_starts_a_new_sequence(logged, tmp_path):
    heads = tmp_path / "heads.jsonl"
    audit_heads.record(heads, audit.head(logged.audit_path))                 # 5 entries, first key (trusted)
    fresh = Workspace.init(tmp_path / "fresh", "site1")                       # re-enrolled: new audit key
    audit.append(fresh.audit_path, "init")
    new = audit.head(fresh.audit_path)
    with pytest.raises(HeadError, match="expected audit key"):               # no new key named: refused
        audit_heads.record(heads, new)
    assert audit_heads.record(heads, new, new["key"])["head"]["entries"] == 1   # named at enrollment: accepted


def test_a_heads_record_cut_short_is_repaired_not_fatal(logged, tmp_path):
    """A crash or a full disk mid-line left a partial row at the end of a heads file; every later head of that
    party then failed to record (JSONDecodeError), so no head was kept again. The torn row is taken back."""
    path = tmp_path / "heads" / "site1.heads.jsonl"
    audit_heads.record(path, audit.head(logged.audit_path), run="r", round=1)
    with open(path, "a") as fh:
        fh.write('{"head": {"entries": 9, "la')                       # the cut-short row
    audit.append(logged.audit_path, "score", actor="dr.x", participant="305")
    audit_heads.record(path, audit.head(logged.audit_path), run="r", round=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["head"]["entries"] == len(audit.read(logged.audit_path))
