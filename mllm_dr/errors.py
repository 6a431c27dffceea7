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
