"""Append-only, hash-chained audit log (JSONL) of what a site did.

Each entry carries the SHA-256 of the previous line, so an edited, deleted or reordered
line breaks the chain. Writers take an exclusive file lock, so concurrent commands
append safely. Entries hold no clinical content: ids, counts, versions, hashes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

GENESIS = "0" * 64


def _line_hash(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def append(path: Path, event: str, actor: str | None = None, **details) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0)
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
            prev = _line_hash(lines[-1]) if lines else GENESIS
            entry = {"seq": len(lines) + 1, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "event": event, "actor": actor or os.environ.get("USER", "unknown"), "prev": prev, **details}
            fh.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return entry


def verify(path: Path) -> tuple[bool, str]:
    """(intact, message). The message names the first bad entry."""
    if not path.is_file():
        return True, "no audit log yet"
    prev = GENESIS
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for n, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return False, f"line {n}: not JSON"
        if entry.get("prev") != prev or entry.get("seq") != n:
            return False, f"line {n} (seq {entry.get('seq')}): chain broken (edited, deleted or reordered entry before it)"
        prev = _line_hash(line)
    return True, f"{len(lines)} entries intact"
