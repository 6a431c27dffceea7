"""Append-only, hash-chained, signed audit log (JSONL) of what a site or the center did.

Each entry carries the SHA-256 of the previous line (an edited, deleted or reordered line
breaks the chain) and an Ed25519 signature by the folder's audit key (``keys/audit.key``
beside ``audit/``), with that key's fingerprint. Rewriting the whole log needs the private
key; swapping the key pair for a new one is caught because the entries name (and were
signed by) the old one. Writers take an exclusive file lock, so concurrent commands append
safely. Entries hold no clinical content: ids, counts, versions, hashes.

A chain alone cannot show that its last entries were deleted (or the whole log rolled back
to an earlier state). So the log also has a signed *head* (RFC 9162 style: entry count,
hash of the last line, time, signed by the audit key) that the other side of the
federation keeps; ``verify(..., expect_head=...)`` checks the log against such heads.
The log and its key are readable by their owner only (0600 in 0700 folders).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import pwd
import re
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from mllm_dr.atomic import append_whole, cut_torn_tail, jsonl_lines
from mllm_dr.errors import InputError, MllmDrError
from mllm_dr.private import FILE_MODE, open_private, private_dir

GENESIS = "0" * 64
HEAD_KIND = "mllmdr-audit-head"


class HeadError(MllmDrError):
    """A signed head that does not verify, or that goes backwards against one recorded before."""


def login_name() -> str:
    """The OS account running this command (not $USER, which cron and systemd leave unset)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid-{os.getuid()}"


def _line_hash(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8", "surrogateescape")).hexdigest()


def _text(data: bytes) -> str:
    """The log's text; a byte that is not UTF-8 (a damaged or edited line) stays a lone surrogate, so a read
    never crashes and ``_line_hash`` still hashes the line's bytes (``_parse`` names that line)."""
    return data.decode("utf-8", "surrogateescape")


def _parse(line: str) -> dict | str:
    """The entry on a line, or what is wrong with the line."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8 text"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return "not JSON"
    return entry if isinstance(entry, dict) else "not a JSON object"


def _numbered(path: Path) -> list[tuple[int, str]]:
    """(line number in the file, line) for each non-blank line."""
    return _numbered_text(path.read_bytes())


def _numbered_text(data: bytes) -> list[tuple[int, str]]:
    """``_numbered`` of a log's bytes as already read."""
    return [(n, ln) for n, ln in enumerate(_text(data).split("\n"), start=1) if ln.strip()]


def _canonical(entry: dict) -> bytes:
    return json.dumps({k: v for k, v in entry.items() if k != "sig"}, sort_keys=True, ensure_ascii=False).encode()


def key_path(log: Path) -> Path:
    """``<root>/audit/audit.jsonl`` is signed by ``<root>/keys/audit.key``."""
    return Path(log).parent.parent / "keys" / "audit.key"


def public_key(log: Path):
    """The log's audit public key (``keys/audit.pub`` beside its private key), or None when there is none."""
    from mllm_dr.signing import load_public

    pub_path = key_path(log).with_suffix(".pub")
    return load_public(pub_path.read_bytes(), pub_path) if pub_path.is_file() else None


def signed_by(entry: dict, pub) -> bool:
    """Whether ``entry`` names ``pub``'s fingerprint and its signature verifies under it: one entry's check, not
    the chain's (``verify`` checks the log)."""
    from mllm_dr.signing import fingerprint

    if pub is None or entry.get("key") != fingerprint(pub):
        return False
    try:
        pub.verify(bytes.fromhex(entry.get("sig", "")), _canonical(entry))
    except (InvalidSignature, ValueError, TypeError):     # TypeError: a signature that is no string
        return False
    return True


def _signing_key(log: Path):
    from mllm_dr.signing import load_private, new_signing_key

    path = key_path(log)
    if not path.is_file():
        private_dir(path.parent)
        try:
            new_signing_key(path)
        except FileExistsError:   # another writer created it first
            pass
    return load_private(path)


def append(path: Path, event: str, actor: str | None = None, **details) -> dict:
    from mllm_dr.signing import fingerprint

    path = Path(path)
    private_dir(path.parent)
    key = _signing_key(path)
    with open_private(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            os.fchmod(fh.fileno(), FILE_MODE)           # logs written by older versions were 0644
            whole, torn = cut_torn_tail(fh.fileno())     # a crash mid-write: its half line is never glued to this one
            if torn:
                details["torn_tail_dropped"] = {"bytes": len(torn), "sha256": hashlib.sha256(torn).hexdigest()}
            lines = jsonl_lines(_text(whole))
            prev = _line_hash(lines[-1]) if lines else GENESIS
            entry = {"seq": len(lines) + 1, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "event": event, "actor": actor or login_name(), "prev": prev,
                     "key": fingerprint(key.public_key()), **details}
            entry["sig"] = key.sign(_canonical(entry)).hex()
            # a full disk mid-line: the torn line is taken back (else every later read fails)
            append_whole(fh.fileno(), (json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return entry


def verify(path: Path, expected_key: str | None = None, expect_head: dict | list[dict] | None = None
           ) -> tuple[bool, str]:
    """(intact, message). The message names the first bad entry.

    ``expected_key``: a fingerprint known from elsewhere (the enrollment request, a printout);
    by default the folder's current ``keys/audit.pub``. ``expect_head``: one or more heads
    recorded elsewhere ({entries, last_hash}, as ``head`` makes them): a log shorter than a
    head was truncated; a log whose entry at that seq hashes differently was rolled back.
    """
    ok, msg, _ = _check(Path(path), expected_key, expect_head)
    return ok, msg


def _check(path: Path, expected_key: str | None, expect_head, numbered: list[tuple[int, str]] | None = None
           ) -> tuple[bool, str, int | None]:
    """(intact, message, first bad seq or None). Chain and signatures first, then the heads. ``numbered``: the
    lines (``_numbered``) as the caller read them, verified as they are (``read_checked``); else read here."""
    from mllm_dr.signing import fingerprint

    heads = [expect_head] if isinstance(expect_head, dict) else list(expect_head or [])
    if not numbered and not path.is_file():
        return (True, "no audit log yet", None) if not any(h["entries"] for h in heads) else \
            (False, f"no audit log, but a head recorded elsewhere says {max(h['entries'] for h in heads)} entries", 1)
    pub = public_key(path)
    want = expected_key or (fingerprint(pub) if pub else None)
    hashes: list[str] = []
    for n, line in _numbered(path) if numbered is None else numbered:       # n: the file's line number
        seq = len(hashes) + 1
        entry = _parse(line)
        if isinstance(entry, str):
            return False, f"line {n}: {entry} (edited)", seq
        if entry.get("seq") != seq:
            return False, f"line {n} (seq {entry.get('seq')}): out of order or an entry before it was deleted", seq
        if entry.get("prev") != (hashes[-1] if hashes else GENESIS):
            return False, f"line {n} (seq {entry.get('seq')}): chain broken (the entry before it was edited)", seq
        if pub is None or entry.get("key") != want or fingerprint(pub) != want:
            return False, (f"line {n} (seq {entry.get('seq')}): signed by key {entry.get('key')}, the expected "
                           f"audit key is {want} (key swapped or missing)"), seq
        try:
            pub.verify(bytes.fromhex(entry.get("sig", "")), _canonical(entry))
        except (InvalidSignature, ValueError, TypeError):     # TypeError: a signature that is no string
            return False, f"line {n} (seq {entry.get('seq')}): signature does not verify (entry edited)", seq
        hashes.append(_line_hash(line))
    for h in heads:
        n, when = int(h["entries"]), f" ({h['time']})" if h.get("time") else ""
        if n > len(hashes):
            return False, (f"the log has {len(hashes)} entries, a head recorded elsewhere{when} says {n}: "
                           f"entries {len(hashes) + 1}..{n} were deleted (truncated or rolled back)"), None
        if n and hashes[n - 1] != h["last_hash"]:
            return False, (f"entry seq {n} is not the one a head recorded elsewhere{when} names: the log was rolled "
                           f"back and rewritten (at seq {n} or before)"), n
    against = f"; matches {len(heads)} head(s) recorded elsewhere" if heads else ""
    return True, f"{len(hashes)} entries intact, signed by {want}{against}", None


def read(path: Path) -> list[dict]:
    """Every entry; a line that is not one is a one-line InputError naming it (``audit verify`` says more)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for n, line in _numbered(path):
        entry = _parse(line)
        if isinstance(entry, str):
            raise InputError(f"line {n}: {entry}: a damaged audit log ('audit verify' checks it)", path)
        out.append(entry)
    return out


def values(entries: list[dict], event: str, field: str) -> set:
    """The values ``field`` takes in the ``event`` entries of ``entries`` (``read_checked``'s: the log read and
    verified once by the caller), of the verified entries only: anyone able to write the file, without the
    key, could append an unsigned entry naming an edited kept score, which `review` then accepted (a review,
    session 42)."""
    return {e.get(field) for e in entries if e.get("event") == event and not e.get("tampered")}


def count_events(path: Path, events: tuple[str, ...], field: str) -> dict[tuple[str, object], int]:
    """How many entries of each of ``events`` the log holds, by the value of their ``field``: {(event, value):
    count}. Cheap (no signature check; ``verify`` and the signed heads held elsewhere vouch for the log): only
    the lines naming one of the events are parsed, so a long log costs one read. A line that is not an
    entry is skipped here (``read`` and ``audit verify`` name it)."""
    out: dict[tuple[str, object], int] = {}
    for entry in event_entries(path, events):
        key = (entry["event"], entry.get(field))
        out[key] = out.get(key, 0) + 1
    return out


def event_entries(path: Path, events: tuple[str, ...]) -> list[dict]:
    """The entries of ``events``, in log order, found as ``count_events`` finds them (one read under a shared
    lock, only the lines naming an event parsed, no signature check)."""
    path = Path(path)
    if not path.is_file():
        return []
    marks = tuple(json.dumps({"event": e})[1:-1].encode() for e in events)    # '"event": "dp_round"'
    with open(path, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            data = fh.read()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    found: list[tuple[int, dict]] = []
    for mark in marks:
        at = data.find(mark)
        while at >= 0:
            start, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
            entry = _parse(_text(data[start:] if end < 0 else data[start:end]))
            if isinstance(entry, dict) and entry.get("event") in events:
                found.append((start, entry))
            at = data.find(mark, len(data) if end < 0 else end)
    return [entry for _, entry in sorted(found, key=lambda f: f[0])]


def snapshot(path: Path) -> tuple[list[dict], dict | None]:
    """The entries as one read sees them, and their head spec ({entries, last_hash}; None when empty):
    ``verify(path, key, spec)`` then vouches for exactly these entries (``audit export``)."""
    lines = _lines(Path(path))
    entries = [_parse(ln) for ln in lines]
    if bad := next((e for e in entries if isinstance(e, str)), None):
        raise InputError(f"an entry is {bad}", path)
    return entries, ({"entries": len(lines), "last_hash": _line_hash(lines[-1])} if lines else None)


# what an entry always has (``append``), filled in for a line lacking it: it is shown, marked, never a crash
_SHOWN_KEYS = {"seq": None, "time": "", "event": "(no event)", "actor": None}


def _read_locked(path: Path) -> list[tuple[int, str]]:
    """``_numbered`` of the log as one read under a shared lock sees it (never half an appended entry); []
    when there is no log."""
    try:
        fh = open(path, "rb") if path.is_file() else None
    except FileNotFoundError:                  # deleted in between
        fh = None
    if fh is None:
        return []
    with fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            return _numbered_text(fh.read())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_checked(path: Path, expected_key: str | None = None) -> tuple[list[dict], bool, str]:
    """Every entry, verified: entries from the first bad one on carry ``tampered: True``.

    The log is read once (under a shared lock) and those very lines are verified and returned: it was
    verified, then read again, so a line appended in between came back unmarked and vouched for a kept
    score (a review, session 44). A line that is not an entry is shown as event ``(not JSON)``, ``(not
    UTF-8 text)`` or ``(not a JSON object)``; one lacking seq, time, event or actor gets them empty
    (event ``(no event)``, session 44: `audit show` crashed on it), never a crash.
    """
    path = Path(path)
    numbered = _read_locked(path)
    ok, msg, bad = _check(path, expected_key, None, numbered)
    out = []
    for i, (_, line) in enumerate(numbered, start=1):
        entry = _parse(line)
        if isinstance(entry, str):
            entry = _SHOWN_KEYS | {"event": f"({entry})"}
        for key, empty in _SHOWN_KEYS.items():
            entry.setdefault(key, empty)
        if bad is not None and i >= bad:
            entry["tampered"] = True
        out.append(entry)
    return out, ok, msg


# ----------------------------------------------------------------------------- signed heads
def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)          # never a head of a half-written entry
        try:
            return jsonl_lines(_text(fh.read()))
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def head(path: Path) -> dict:
    """The log's signed head: {entries, last_hash, time, key, public_key, sig}.

    Whoever keeps it can later show that the log was cut or rolled back (``verify(...,
    expect_head=...)``); the public key travels with it, the holder checks its fingerprint.
    """
    from cryptography.hazmat.primitives import serialization

    from mllm_dr.signing import fingerprint

    path = Path(path)
    key = _signing_key(path)
    lines = _lines(path)
    pub = key.public_key()
    out = {"kind": HEAD_KIND, "entries": len(lines), "last_hash": _line_hash(lines[-1]) if lines else GENESIS,
           "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "key": fingerprint(pub),
           "public_key": pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()}
    out["sig"] = key.sign(_canonical(out)).hex()
    return out


def verify_head(h: dict, expected_key: str | None = None) -> dict:
    """Check a head's signature (and, when given, that it is by ``expected_key``); returns it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from mllm_dr.signing import fingerprint

    try:
        entries, last, fp = int(h["entries"]), str(h["last_hash"]), str(h["key"])
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(h["public_key"])))
        sig = bytes.fromhex(str(h["sig"]))
    except (KeyError, TypeError, ValueError):
        raise HeadError("not a signed audit head (fields entries, last_hash, key, public_key, sig)") from None
    if entries < 0 or not re.fullmatch(r"[0-9a-f]{64}", last):
        raise HeadError(f"audit head: bad entry count {entries} or last hash {last[:20]!r}")
    if fingerprint(pub) != fp:
        raise HeadError(f"audit head: its public key has fingerprint {fingerprint(pub)}, not the {fp} it names")
    if expected_key and fp != expected_key:
        raise HeadError(f"audit head signed by key {fp}, the expected audit key is {expected_key}")
    try:
        pub.verify(sig, _canonical(h))
    except InvalidSignature:
        raise HeadError(f"audit head ({entries} entries) signature does not verify with key {fp}") from None
    return h


def parse_head_spec(text: str) -> dict:
    """``N:HASH`` (as ``audit head`` prints it) -> {entries, last_hash}."""
    m = re.fullmatch(r"\s*(\d+):([0-9a-fA-F]{64})\s*", text or "")
    if not m:
        raise InputError(f"--expect-head {text!r} is not ENTRIES:SHA256 (e.g. 42:3f9a...; see 'audit head')")
    return {"entries": int(m.group(1)), "last_hash": m.group(2).lower()}


def export_csv(entries: list[dict]) -> str:
    """The entries as CSV; a text cell a spreadsheet would run as a formula (= + - @, tab, CR first) starts
    with a quote (CSV injection), so it stays text."""
    def cell(value):
        text = json.dumps(value) if isinstance(value, (dict, list)) else value
        return "'" + text if isinstance(text, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r") else text

    cols = ["seq", "time", "event", "actor"]
    extra = sorted({k for e in entries for k in e} - set(cols) - {"sig", "prev", "key"})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + extra)
    for e in entries:
        w.writerow([cell(e.get(c, "")) for c in cols + extra])
    return buf.getvalue()
