"""Errors that name the file and what is wrong with it.

The CLI turns these into one-line messages; a bare traceback never reaches a user.
"""

from __future__ import annotations

from pathlib import Path


class MllmDrError(Exception):
    """Base class for every error the CLI reports as a clean one-line message."""


class InputError(MllmDrError):
    """Bad input: the message names the file (when there is one) and the problem."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class NotACorpusError(InputError):
    """PATH is none of the three supported corpora."""


class ModelMismatchError(MllmDrError):
    """Adapters were trained on another base model than the one loaded."""


class FederationError(MllmDrError):
    """A federated run cannot go on (too few sites, a refused resume, ...): the reason names the sites."""


class WorkspaceBusyError(InputError):
    """Another command holds the workspace lock."""


_OS_ADVICE = {
    "EACCES": "permission denied; give this user access (owner/mode) or choose another location",
    "EPERM": "operation not permitted; give this user access (owner/mode) or choose another location",
    "EROFS": "the file system is read-only; choose a writable location",
    "ENOSPC": "no space left on the device; free some space or choose another location",
    "EDQUOT": "disk quota exceeded; free some space or choose another location",
    "ENOENT": "does not exist",
    "ENOTDIR": "a part of this path is a file, not a folder",
    "EISDIR": "is a folder; a file was expected",
    "EEXIST": "already exists",
}


def operator_os_error(err: OSError, path: str | Path | None = None) -> InputError | None:
    """An OSError an operator can act on (permissions, read-only or full disk, missing path),
    as a one-line InputError naming the path; None for any other OSError (a bug to report)."""
    import errno

    name = errno.errorcode.get(err.errno or -1)
    if name not in _OS_ADVICE:
        return None
    where = path if path is not None else (err.filename2 if name == "EEXIST" and err.filename2 else err.filename)
    if name == "ENOSPC" and where is None:
        where = "the disk being written"
    return InputError(_OS_ADVICE[name], where)


def read_model(path, model, what: str):
    """A pydantic model from a JSON file, or one InputError naming the file and the first bad field."""
    from pydantic import ValidationError

    try:
        return model.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"cannot read {what}: {err.strerror}", path) from None
    except (ValidationError, ValueError) as err:
        why = first_problem(err) if isinstance(err, ValidationError) else str(err)
        raise InputError(f"not a valid {what}: {why}", path) from None


def first_problem(err) -> str:
    """A pydantic ValidationError's first problem in one line, 'dp.enable: Extra inputs are not permitted': its
    location, left out where it is empty (the whole document: 'Invalid JSON: ...', once ': : Invalid JSON' and
    'bundle:  Invalid JSON'), then pydantic's message without the 'Value error, ' / 'Assertion failed, ' it puts
    before a validator's own words (session 46). The one wording of read_model, policies and run plans."""
    import re

    e = err.errors()[0]
    where = ".".join(map(str, e["loc"]))
    msg = re.sub(r"^(Value error|Assertion failed), ", "", str(e["msg"]))
    return f"{where}: {msg}" if where else msg
