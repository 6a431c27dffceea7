"""Append-only, hash-chained, signed audit log (JSONL) of what a site or the center did.

Each entry carries the SHA-256 of the previous line (an edited, deleted or reordered line
breaks the chain) and an Ed25519 signature by the folder's audit key (``keys/audit.key``
beside ``audit/``), with that key's fingerprint. Rewriting the whole log needs the private
key; swapping the key pair for a new one is caught because the entries name (and were
signed by) the old one. Writers take an exclusive file lock, so concurrent commands append
safely. Entries hold no clinical content: ids, counts, versions, hashes.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature

GENESIS = "0" * 64


def _line_hash(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def _canonical(entry: dict) -> bytes:
    return json.dumps({k: v for k, v in entry.items() if k != "sig"}, sort_keys=True, ensure_ascii=False).encode()


def key_path(log: Path) -> Path:
    """``<root>/audit/audit.jsonl`` is signed by ``<root>/keys/audit.key``."""
    return Path(log).parent.parent / "keys" / "audit.key"


def _signing_key(log: Path):
    from mllm_dr.signing import load_private, new_signing_key

    path = key_path(log)
    if not path.is_file():
        try:
            new_signing_key(path)
        except FileExistsError:   # another writer created it first
            pass
    return load_private(path)


def append(path: Path, event: str, actor: str | None = None, **details) -> dict:
    from mllm_dr.signing import fingerprint

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _signing_key(path)
    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0)
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
            prev = _line_hash(lines[-1]) if lines else GENESIS
            entry = {"seq": len(lines) + 1, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "event": event, "actor": actor or os.environ.get("USER", "unknown"), "prev": prev,
                     "key": fingerprint(key.public_key()), **details}
            entry["sig"] = key.sign(_canonical(entry)).hex()
            fh.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return entry


def verify(path: Path, expected_key: str | None = None) -> tuple[bool, str]:
    """(intact, message). The message names the first bad entry.

    ``expected_key``: a fingerprint known from elsewhere (the enrollment request, a printout);
    by default the folder's current ``keys/audit.pub``.
    """
    from mllm_dr.signing import fingerprint, load_public

    path = Path(path)
    if not path.is_file():
        return True, "no audit log yet"
    pub_path = key_path(path).with_suffix(".pub")
    pub = load_public(pub_path.read_bytes(), pub_path) if pub_path.is_file() else None
    want = expected_key or (fingerprint(pub) if pub else None)
    prev = GENESIS
    lines = path.read_text(encoding="utf-8").splitlines()
    n_entries = 0
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        n_entries += 1
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return False, f"line {n}: not JSON (edited)"
        if entry.get("seq") != n_entries:
            return False, f"line {n} (seq {entry.get('seq')}): out of order or an entry before it was deleted"
        if entry.get("prev") != prev:
            return False, f"line {n} (seq {entry.get('seq')}): chain broken (the entry before it was edited)"
        if pub is None or entry.get("key") != want or fingerprint(pub) != want:
            return False, (f"line {n} (seq {entry.get('seq')}): signed by key {entry.get('key')}, the expected "
                           f"audit key is {want} (key swapped or missing)")
        try:
            pub.verify(bytes.fromhex(entry.get("sig", "")), _canonical(entry))
        except (InvalidSignature, ValueError):
            return False, f"line {n} (seq {entry.get('seq')}): signature does not verify (entry edited)"
        prev = _line_hash(line)
    return True, f"{n_entries} entries intact, signed by {want}"


def read(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def export_csv(entries: list[dict]) -> str:
    cols = ["seq", "time", "event", "actor"]
    extra = sorted({k for e in entries for k in e} - set(cols) - {"sig", "prev", "key"})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + extra)
    for e in entries:
        w.writerow([e.get(c, "") for c in cols] +
                   [json.dumps(e[c]) if isinstance(e.get(c), (dict, list)) else e.get(c, "") for c in extra])
    return buf.getvalue()
