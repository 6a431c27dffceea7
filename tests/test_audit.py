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

