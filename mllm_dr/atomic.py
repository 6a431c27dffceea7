"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    if path.is_dir():       # else os.replace fails naming the temporary file, not the one asked for
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fsynced_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsynced_temp(path: Path, data: bytes) -> str:
    """A temporary file beside ``path`` holding ``data``, written whole and fsynced (removed if that fails)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_create_new(names: Iterator[Path], data: bytes) -> Path:
    """Write ``data`` whole (fsynced) under the first of ``names`` (one folder) that does not exist yet and
    return it: linked in place, so never over another file and never half-written (an archive that must
    not replace an older one). FileExistsError when every name is taken."""
    names = iter(names)
    first = Path(next(names))
    tmp = _fsynced_temp(first, data)
    try:
        for name in (first, *names):
            try:
                os.link(tmp, name)
            except FileExistsError:
                continue
            return Path(name)
        raise FileExistsError(errno.EEXIST, "every name is taken", str(first))
    finally:
        Path(tmp).unlink(missing_ok=True)


def jsonl_lines(text: str) -> list[str]:
    """The non-blank lines of a JSON-lines file's text, split on newlines only: records written with
    ``ensure_ascii=False`` keep U+2028 and its kin as they are, and ``str.splitlines`` splits on them."""
    return [ln for ln in text.split("\n") if ln.strip()]


def append_whole(fd: int, data: bytes) -> int:
    """Append ``data`` (one whole record) to the open file ``fd``, unbuffered, and fsync; a write that
    fails part-way (a full disk) is taken back, so the file never ends in half a record. The caller
    holds the file's lock. Returns the offset the record starts at."""
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    except OSError:
        os.ftruncate(fd, end)
        raise
    return end


def cut_torn_tail(fd: int) -> tuple[bytes, bytes]:
    """(the whole lines of the JSON-lines file ``fd``, the torn tail cut off it): a last line without its
    newline (a crash mid-write) is cut off, never glued to the next record. The caller holds the file's lock."""
    chunks, at = [], 0
    while chunk := os.pread(fd, 1 << 20, at):
        chunks.append(chunk)
        at += len(chunk)
    data = b"".join(chunks)
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        os.ftruncate(fd, keep)
    return data[:keep], data[keep:]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (fcntl; released when the block ends or the process dies):
    the read-modify-write of a file that several processes update (two runs at one site) goes one at a
    time, so neither rewrite drops the other's change."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Busy(Exception):
    """``held_or_busy``: another process holds the lock; ``holder``: what it wrote in the lock file."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextmanager
def held_or_busy(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock_path`` itself for the block, or raise ``Busy`` at once when
    another process holds it (fcntl; released when the block ends or the process dies, however it dies).
    The holder's pid is written in the file for the refusal to name. ``file_lock`` waits instead."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(os.pread(fd, 200, 0).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def json_text(obj, **kw) -> str:
    """JSON that every parser reads: a NaN or infinite float (a metric of no participant, an item figure
    without item labels) becomes null; ``json.dumps`` alone writes bare NaN, which strict parsers refuse."""
    import json
    import math
    import numbers

    def clean(x):
        if isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral):   # float, numpy floats
            return float(x) if math.isfinite(x) else None
        if getattr(x, "ndim", None) == 0 and hasattr(x, "item"):                # a 0-d tensor or array
            return clean(x.item())
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kw)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Fill ``folder.partial``, then swap it in: the old folder is renamed aside (``folder.old``), the new one
    renamed in, then the old one deleted. A crash leaves the old folder or the new one; one between the two
    renames leaves the old one aside, which the next call for ``folder`` puts back before it writes."""
    folder = Path(folder)
    tmp, aside = (folder.with_name(folder.name + suffix) for suffix in (".partial", ".old"))
    _put_back(folder, aside)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        folder.rename(aside)
    try:
        tmp.rename(folder)
    except BaseException:
        _put_back(folder, aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def settled(folder: Path) -> Path:
    """The folder as a reader should take it: ``folder``, or, while a swap by ``atomic_folder`` is under way
    or was cut short between its two renames, the old one set aside (a consistent earlier version; readers
    never rename, so a writer mid-swap is not disturbed)."""
    folder = Path(folder)
    aside = folder.with_name(folder.name + ".old")
    return aside if not folder.is_dir() and aside.is_dir() else folder


def _put_back(folder: Path, aside: Path) -> None:
    """An old folder left aside by a swap cut short: back in place when the new one never came, else deleted."""
    if aside.is_dir():
        if folder.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(folder)
