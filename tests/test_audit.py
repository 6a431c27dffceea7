"""Attacks on the signed audit log: edit, delete, reorder, key swap, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil

import pytest

from conftest import run_cli
from mllm_dr import audit
from mllm_dr.workspace import Workspace


@pytest.fixture
def logged(tmp_path):
    ws = Workspace.init(tmp_path / "ws", "site1")
    for i in range(5):
        audit.append(ws.audit_path, "score", actor="dr.x", participant=f"30{i}", adapter_version="abc")
    assert audit.verify(ws.audit_path)[0]
    return ws


def _lines(ws):
    return ws.audit_path.read_text().splitlines()


def _write(ws, lines):
    ws.audit_path.write_text("\n".join(lines) + "\n")


def test_one_edited_byte_is_found(logged):
    lines = _lines(logged)
    lines[2] = lines[2].replace('"participant": "302"', '"participant": "309"')
    _write(logged, lines)
    ok, msg = audit.verify(logged.audit_path)
    assert not ok and msg.startswith("line 3") and "signature" in msg
    proc = run_cli("mllmdr-site", "audit", "verify", "--workspace", logged.root, check=False)
    assert proc.returncode == 2 and "line 3" in proc.stderr


def test_deleted_line_is_found(logged):
    lines = _lines(logged)
    del lines[3]
    _write(logged, lines)
    ok, msg = audit.verify(logged.audit_path)
    assert not ok and msg.startswith("line 4")


def test_reordered_lines_are_found(logged):
    lines = _lines(logged)
    lines[1], lines[2] = lines[2], lines[1]
    _write(logged, lines)
    ok, msg = audit.verify(logged.audit_path)
    assert not ok and msg.startswith("line 2")


def test_rewritten_log_under_a_swapped_key_is_found(logged):
    """An attacker replaces the key pair and re-signs a doctored log from scratch."""
    original_key = json.loads(_lines(logged)[0])["key"]
    entries = audit.read(logged.audit_path)
    keys = logged.root / "keys"
    for f in ("audit.key", "audit.pub"):
        (keys / f).unlink()
    logged.audit_path.unlink()
    for e in entries[:-1]:                        # drop the last score, re-sign everything
        audit.append(logged.audit_path, e["event"], actor=e["actor"],
                     **{k: v for k, v in e.items() if k not in ("seq", "time", "event", "actor", "prev", "key", "sig")})
    assert audit.verify(logged.audit_path)[0]     # self-consistent under the new key...
    ok, msg = audit.verify(logged.audit_path, expected_key=original_key)
    assert not ok and "key" in msg                # ...but not under the key known from elsewhere


def test_swapped_public_key_alone_is_found(logged):
    keys = logged.root / "keys"
    shutil.move(keys / "audit.key", keys / "old.key")
    (keys / "audit.pub").unlink()
    audit._signing_key(logged.audit_path)         # a fresh pair appears
    ok, msg = audit.verify(logged.audit_path)
    assert not ok and msg.startswith("line 1") and "key" in msg


def _writer(path, n, who):
    for i in range(n):
        audit.append(path, "score", actor=who, participant=str(i))


def test_concurrent_writers_keep_the_chain(logged):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(logged.audit_path, 15, f"w{k}")) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    ok, msg = audit.verify(logged.audit_path)
    assert ok, msg
    # the workspace's other JSON-lines files (teacher rationales and rejects) are read the same way
    from mllm_dr.workspace import read_jsonl, write_jsonl

    rows = [{"rationale": "she said\u2028she sleeps badly"}, {"rationale": "b"}]
    write_jsonl(logged.root / "r.jsonl", rows)
    assert read_jsonl(logged.root / "r.jsonl") == rows
    assert len(audit.read(logged.audit_path)) == 5 + 60


def test_export_refuses_a_broken_log(logged, tmp_path):
    run_cli("mllmdr-site", "audit", "export", "--workspace", logged.root, "--out", tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_text().splitlines()[0].startswith("seq,time,event,actor")
    lines = _lines(logged)
    _write(logged, lines[:2] + lines[3:])
    proc = run_cli("mllmdr-site", "audit", "export", "--workspace", logged.root, "--out", tmp_path / "b.csv",
                   check=False)
    assert proc.returncode == 2 and not (tmp_path / "b.csv").exists()


def test_a_write_cut_short_by_a_full_disk_leaves_no_torn_line(logged):
    """The write of an entry failing part-way (a full disk: here a file-size limit, EFBIG) used to leave half a
    line: the next entry was glued onto it and every later read failed as if the log had been edited."""
    import subprocess
    import sys

    log = logged.audit_path
    before = log.read_bytes()
    script = ("import resource, signal, sys; from mllm_dr import audit\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 40}, resource.RLIM_INFINITY))\n"
              "try:\n"
              f"    audit.append({str(log)!r}, 'score', participant='303', note='x' * 400)\n"
              "except OSError as err:\n"
              "    print('refused', err.errno)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("refused"), out.stdout + out.stderr
    assert log.read_bytes() == before and audit.verify(log)[0]
    audit.append(log, "score", participant="304")
    assert audit.verify(log)[0] and audit.read(log)[-1]["participant"] == "304"


def test_a_line_separator_in_a_value_does_not_split_an_entry(logged):
    """JSON written with ensure_ascii=False keeps U+2028 as is, and str.splitlines() splits on it: an actor
    (`--user`) holding one broke the chain for every later read (session 40, a review)."""
    before = len(audit.read(logged.audit_path))
    audit.append(logged.audit_path, "score", actor="dr.\u2028x", participant="300")
    audit.append(logged.audit_path, "score", actor="dr.y", participant="301")
    entries = audit.read(logged.audit_path)
    assert len(entries) == before + 2 and entries[-2]["actor"] == "dr.\u2028x"
    ok, msg = audit.verify(logged.audit_path)
    assert ok, msg
    # the workspace's other JSON-lines files (teacher rationales and rejects) are read the same way
    from mllm_dr.workspace import read_jsonl, write_jsonl

    rows = [{"rationale": "she said\u2028she sleeps badly"}, {"rationale": "b"}]
    write_jsonl(logged.root / "r.jsonl", rows)
    assert read_jsonl(logged.root / "r.jsonl") == rows



def test_a_torn_last_line_is_cut_off_before_the_next_entry(logged):
    """A crash mid-write leaves a last line without its newline: the next entry was glued onto it, so the log
    read as edited from there on. Now the torn tail is cut off (its size and hash recorded in the new entry)."""
    import hashlib

    log = logged.audit_path
    torn = b'{"seq": 6, "time": "2026-'
    with open(log, "ab") as fh:
        fh.write(torn)
    entry = audit.append(log, "score", participant="305")
    ok, msg = audit.verify(log)
    assert ok, msg
    assert entry["seq"] == 6 and entry["torn_tail_dropped"] == {"bytes": len(torn),
                                                                 "sha256": hashlib.sha256(torn).hexdigest()}
    assert audit.read(log)[-1]["participant"] == "305" and log.read_bytes().endswith(b"\n")


@pytest.mark.parametrize("bad, says", [(b"[]", "not a JSON object"), (b'"x"', "not a JSON object"),
                                       (b'{"seq": 6, "caf\xe9": 1}', "not UTF-8"), (None, "signature")])
def test_a_line_of_the_wrong_kind_is_named_not_a_crash(logged, bad, says):
    """A line that is JSON but not an object, a line that is not UTF-8, or a signature that is not a string
    raised AttributeError / UnicodeDecodeError / TypeError: `audit verify` said "internal error" (exit 3) and
    `audit show` and `site status` crashed. Now the line is named and `audit verify` exits 2 (tampered)."""
    log = logged.audit_path
    if bad is None:                                # a signature of the wrong type on the last entry
        lines = _lines(logged)
        lines[-1] = json.dumps(json.loads(lines[-1]) | {"sig": 123})
        _write(logged, lines)
    else:
        with open(log, "ab") as fh:
            fh.write(bad + b"\n")
    ok, msg = audit.verify(log)
    assert not ok and msg.startswith(f"line {5 if bad is None else 6}") and says in msg, msg
    proc = run_cli("mllmdr-site", "audit", "verify", "--workspace", logged.root, check=False)
    assert proc.returncode == 2 and says in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    show = run_cli("mllmdr-site", "audit", "show", "--workspace", logged.root, "--json", check=False)
    assert show.returncode == 0 and "TAMPERED" not in show.stdout, show.stderr
    assert json.loads(show.stdout)[-1]["tampered"] is True
    status = run_cli("mllmdr-site", "status", "--workspace", logged.root, "--json", check=False)
    assert status.returncode == 0, status.stderr
    if bad is not None:                            # what reads the log for a value names the line
        with pytest.raises(audit.InputError, match=f"line 6: {says}"):
            audit.read(log)


def test_audit_show_prints_logged_strings_as_text(logged):
    """`audit show` rendered actor, event and details as rich markup: an actor `[/]` crashed it for good (the
    log is append-only), `[red]...[/red]` faked a mark, and escape sequences reached the terminal."""
    audit.append(logged.audit_path, "score", actor="dr.[/]x", participant="[red]TAMPERED[/red]",
                 note="\x1b]0;owned\x07\x1b[2J")
    proc = run_cli("mllmdr-site", "audit", "show", "--workspace", logged.root, check=False, env={"COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dr.[/]x" in out and "participant=[red]TAMPERED[/red]" in out, out
    assert "\x1b" not in out and "\x07" not in out and "note=\\x1b]0;owned\\x07\\x1b[2J" in out, out


def test_csv_export_defuses_formulas(logged, tmp_path):
    """A logged string starting with = + - @ (or a tab / CR) is a formula in a spreadsheet (CSV injection):
    exported with a leading quote, so it stays text. Numbers stay numbers."""
    import csv

    audit.append(logged.audit_path, "score", actor="=HYPERLINK(\"http://x\")", participant="+1", note="@SUM(A1)",
                 other="-2+3", tab="\tx", cr="\rx", n=-5)
    run_cli("mllmdr-site", "audit", "export", "--workspace", logged.root, "--out", tmp_path / "a.csv")
    rows = list(csv.DictReader((tmp_path / "a.csv").open(newline="")))
    last = rows[-1]
    assert last["actor"] == "'=HYPERLINK(\"http://x\")" and last["participant"] == "'+1"
    assert (last["note"], last["other"], last["tab"], last["cr"], last["n"]) == ("'@SUM(A1)", "'-2+3", "'\tx", "'\rx",
                                                                                 "-5")
    assert rows[0]["participant"] == "300"


def test_only_verified_entries_vouch_for_what_they_name(logged):
    """Session 42 (a clinician-path review): `audit.values` (what `review` and `review stats` check a kept score
    or a review line against) read every line, signed or not: an unsigned entry appended by anyone able to
    write the file vouched for an edited kept score. Now only the verified entries count."""
    audit.append(logged.audit_path, "score", participant="303", kept_score_sha256="a" * 64)
    forged = dict(json.loads(_lines(logged)[-1]), seq=7, kept_score_sha256="b" * 64)
    forged.pop("sig")
    with open(logged.audit_path, "a") as fh:
        fh.write(json.dumps(forged) + "\n")
    assert audit.values(audit.read_checked(logged.audit_path)[0], "score", "kept_score_sha256") == {None, "a" * 64}
