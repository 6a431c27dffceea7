"""Files only their owner may read: audit logs, keys, reviews, reports, error logs.

Created mode 0600 in folders of mode 0700, whatever the umask: a hospital server is shared
by several accounts, and these files name participants, clinicians or secrets.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import IO

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def write_private(path: Path, data: bytes | str, exclusive: bool = False) -> Path:
    """Write a whole file, mode 0600 from its creation, atomically: a temporary file in the same folder,
    fsync'ed, then renamed over ``path``. Keys and certificates were truncated and rewritten in place, so a
    full disk or a crash mid-write left half a CA certificate or node key where the working one had been
    (a review, session 44); now the old file stays until the new one is whole. ``exclusive``: fail with
    FileExistsError if ``path`` exists (the finished file is hard-linked in, so that name, too, appears
    whole or not at all)."""
    path = Path(path)
    if path.is_dir():       # else the rename fails naming the temporary file, not the one asked for
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _whole_temp_file(path, data.encode() if isinstance(data, str) else data)
    try:
        if exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)     # renamed already, or linked (the name stays), or the step failed
    return path


def _whole_temp_file(path: Path, data: bytes) -> Path:
    """``data`` in a new 0600 file beside ``path`` (mkstemp: created 0600, never readable by others),
    flushed to the disk; removed again when any step fails."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _link_new(tmp: Path, path: Path) -> None:
    """Give the finished ``tmp`` the name ``path`` unless that exists (FileExistsError). A file system
    without hard links (vfat, some network shares): the name is taken with O_EXCL, then replaced whole."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        os.replace(tmp, path)


def open_private(path: Path, mode: str = "a+") -> IO[str]:
    """Open a text file for appending (``a`` / ``a+``), creating it 0600."""
    path = Path(path)
    flags = os.O_CREAT | os.O_APPEND | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    fd = os.open(path, flags, FILE_MODE)
    return os.fdopen(fd, mode, encoding="utf-8")


def make_private(path: Path) -> None:
    """Restrict a file another library wrote (a matplotlib PNG) to its owner."""
    os.chmod(path, FILE_MODE)
