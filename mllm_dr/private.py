"""Files only their owner may read: audit logs, keys, reviews, reports, error logs.

Created mode 0600 in folders of mode 0700, whatever the umask: a hospital server is shared
by several accounts, and these files name participants, clinicians or secrets.
"""

from __future__ import annotations

import os
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
    """Write a whole file, mode 0600 (``exclusive``: fail with FileExistsError if it exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return path


def open_private(path: Path, mode: str = "a+") -> IO[str]:
    """Open a text file for appending (``a`` / ``a+``), creating it 0600."""
    path = Path(path)
    flags = os.O_CREAT | os.O_APPEND | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    fd = os.open(path, flags, FILE_MODE)
    return os.fdopen(fd, mode, encoding="utf-8")


def make_private(path: Path) -> None:
    """Restrict a file another library wrote (a matplotlib PNG) to its owner."""
    os.chmod(path, FILE_MODE)
