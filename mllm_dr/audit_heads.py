"""Each side keeps the other side's signed audit heads: a log cut or rolled back at one end
is caught against the record at the other (RFC 9162: signed checkpoints held by others).

- A site puts its head (``audit.head``) in every reply to the center; the center checks it
  against the site's audit key from the enrollment request and appends it to
  ``sites/<site>.heads.jsonl`` (``CenterDir.record_site_head``).
- The center puts its head in every message it sends; the site checks it against the
  center's audit key from its bundle and appends it to ``federation/center-heads.jsonl``
  (``record_center_head``).
- A head that goes backwards (fewer entries, or the same count with another last hash) is
  refused when it arrives (at a site, for the rest of the run: ``fl_client/app.py``). Later,
  ``audit verify --against HEADS.jsonl`` checks a whole log against every head the other side
  recorded.
- What arrival cannot show: a log cut back and grown again past the last recorded count on
  another history (a fork). A head carries only its count and last hash, and the hash at an
  earlier count follows from the entries in between, which the other side does not hold (no
  consistency proof, RFC 9162 section 2.1.4). ``audit verify --against`` finds such a fork, since
  the log's entry at each recorded count must hash to the recorded head.

Heads travel in Flower ConfigRecords, whose values the egress guard keeps short:
``to_fields``/``from_fields`` spread one head over keys ``audit-head-*`` of at most 128 chars.
"""

from __future__ import annotations

import fcntl
import json
from datetime import datetime, timezone
from pathlib import Path

from mllm_dr import audit
from mllm_dr.atomic import append_whole, cut_torn_tail
from mllm_dr.audit import HeadError
from mllm_dr.errors import InputError
from mllm_dr.private import open_private, private_dir
from mllm_dr.protocol import AUDIT_HEAD

PREFIX = AUDIT_HEAD
WIRE_FIELDS = ("entries", "last_hash", "time", "key", "public_key", "sig")


def to_fields(head: dict) -> dict[str, int | str]:
    """A head as flat ConfigRecord entries (``audit-head-entries``, ``audit-head-sig``, ...)."""
    return {f"{PREFIX}{k}": v for k, v in wire_head(head).items()}


def wire_head(head: dict) -> dict[str, int | str]:
    """A head as the ``audit_head`` field of the protocol's messages (keys without the prefix)."""
    return {k.replace('_', '-'): head[k] for k in WIRE_FIELDS}


def from_fields(fields) -> dict | None:
    """The head inside a ConfigRecord (or any mapping), or None when the message carries none."""
    keys = {k: f"{PREFIX}{k.replace('_', '-')}" for k in WIRE_FIELDS}
    if not all(v in fields for v in keys.values()):
        return None
    head = {"kind": audit.HEAD_KIND, **{k: str(fields[v]) for k, v in keys.items()}}
    try:
        head["entries"] = int(fields[keys["entries"]])
    except (TypeError, ValueError):
        raise audit.HeadError(f"the head's entry count {str(fields[keys['entries']])[:40]!r} is not a number") from None
    return head


def from_wire(fields: dict) -> dict | None:
    """The head in a message's ``audit_head`` field (see ``wire_head``), or None when empty."""
    return from_fields({f"{PREFIX}{k}": v for k, v in fields.items()})


def load(path: Path) -> list[dict]:
    """Heads in a file: JSONL as recorded here, or one JSON head (``audit head --json``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read audit heads: {err.strerror}", path) from None
    rows = []
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if n == 1:                       # a pretty-printed single head
                    try:
                        return [_plain(json.loads(text), path, 1)]
                    except json.JSONDecodeError:
                        pass
                raise InputError(f"line {n} is not JSON", path) from None
    return [_plain(r, path, n) for n, r in enumerate(rows, start=1)]


def _plain(row, path: Path, n: int) -> dict:
    head = row.get("head", row) if isinstance(row, dict) else None
    if not isinstance(head, dict) or "entries" not in head or "last_hash" not in head:
        raise InputError(f"entry {n} is not an audit head (entries, last_hash)", path)
    return head


def check_log(log: Path, heads_file: Path, expected_key: str | None = None) -> tuple[bool, str]:
    """Verify ``log`` against every head another party recorded in ``heads_file``.

    Each head's signature must verify with the log's audit key (``expected_key``, else the
    folder's own key), so a forged record cannot make an intact log look cut.
    """
    from mllm_dr.signing import fingerprint, load_public

    heads = load(heads_file)
    pub_path = audit.key_path(log).with_suffix(".pub")
    key = expected_key or (fingerprint(load_public(pub_path.read_bytes(), pub_path)) if pub_path.is_file() else None)
    for n, h in enumerate(heads, start=1):
        try:
            audit.verify_head(h, key)
        except HeadError as err:
            return False, f"{heads_file}: head {n}: {err}"
    return audit.verify(log, expected_key, heads)


def goes_backwards(head: dict, last: dict) -> bool:
    """Is ``head`` behind ``last`` of the same key: fewer entries, or as many with another last hash (a log cut or
    rolled back)? Heads of another key (a new enrollment) start a new sequence."""
    return last["key"] == head.get("key") and (head["entries"] < last["entries"] or (
        head["entries"] == last["entries"] and head["last_hash"] != last["last_hash"]))


def record(path: Path, head: dict, expected_key: str | None = None, **context) -> dict:
    """Verify ``head``, refuse it if it goes backwards, append it to the heads file ``path``.

    ``expected_key``: the log's audit key fingerprint known from enrollment; without one the
    key of the first recorded head is trusted from then on. Heads are compared with the last one
    by the same key (a new enrollment, with another key, starts a new sequence). Returns the row.
    """
    path = Path(path)
    private_dir(path.parent)
    with open_private(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            # a write cut short (a crash, a full disk) is taken back, else every later head of this party would fail
            last = _last_recorded(cut_torn_tail(fh.fileno())[0], path)
            audit.verify_head(head, expected_key or (last["key"] if last else None))
            if last and goes_backwards(head, last):
                raise HeadError(f"audit head goes backwards: {head['entries']} entries (last hash "
                                f"{head['last_hash'][:12]}...) after {last['entries']} entries (last hash "
                                f"{last['last_hash'][:12]}...) recorded at {last['time']}: the log was cut or rolled back")
            row = {"received": datetime.now(timezone.utc).isoformat(timespec="seconds"), **context,
                   "head": {k: head[k] for k in ("kind", *WIRE_FIELDS) if k in head}}
            fh.flush()
            append_whole(fh.fileno(), (json.dumps(row, sort_keys=True) + "\n").encode())   # nothing half-written stays
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return row


def _last_recorded(data: bytes, path: Path) -> dict | None:
    """The last head recorded in a heads file's whole lines (None when there is none); InputError naming
    the file and the line when one is damaged: a bare JSONDecodeError escaped ``keep_reply_head`` and
    failed the run (a review, session 44)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text: a damaged record of audit heads; restore it from a backup", path) from None
    last = None
    for n, line in enumerate(text.split("\n"), start=1):    # as jsonl_lines: not splitlines
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        last = row.get("head") if isinstance(row, dict) else None
        if not _is_recorded_head(last):
            raise InputError(f"line {n} is not a recorded audit head (received, head: key, entries, last_hash, "
                             "time): a damaged record; restore it from a backup or remove that line", path)
    return last


def _is_recorded_head(head) -> bool:
    """Has ``head`` the fields ``record`` compares (the signature was checked when it was recorded)?"""
    return (isinstance(head, dict) and isinstance(head.get("entries"), int)
            and all(isinstance(head.get(k), str) for k in ("key", "last_hash", "time")))


def latest(path: Path) -> dict | None:
    """The last head recorded in ``path`` (None when there is none yet)."""
    rows = load(path) if Path(path).is_file() and Path(path).stat().st_size else []
    return rows[-1] if rows else None


# ----------------------------------------------------------------------------- site side
def center_heads_path(ws) -> Path:
    return ws.root / "federation" / "center-heads.jsonl"


def behind_own_run(ws, head: dict, run: str) -> bool:
    """Did the center's log go backwards within ``run``: ``head`` verifies with the center's key and is behind
    the last head this site recorded from a message of the same run (fewer entries, or as many with another
    last hash)? Only that refusal binds for the run (``fl_client/app.py::_keep_center_head``). A head that is
    merely older than another run's (two runs at one center interleave their messages) or does not verify
    (anyone who reaches the center's port can send one) is refused for its message alone (a second read,
    session 45: binding on those made a site quit a run because another run overlapped it)."""
    from mllm_dr.enrollment import federation_settings

    path = center_heads_path(ws)
    try:
        audit.verify_head(head, federation_settings(ws).center_audit_key or None)
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()] \
            if path.is_file() else []
    except (HeadError, InputError, OSError, ValueError):
        return False
    mine = [r["head"] for r in rows if isinstance(r, dict) and r.get("run") == run and _is_recorded_head(r.get("head"))]
    return bool(mine) and goes_backwards(head, mine[-1])


def record_center_head(ws, head: dict, **context) -> dict:
    """At a site: keep the center's head from a message (checked against the bundle's key)."""
    from mllm_dr.enrollment import federation_settings

    fed = federation_settings(ws)
    return record(center_heads_path(ws), head, fed.center_audit_key or None, **context)
