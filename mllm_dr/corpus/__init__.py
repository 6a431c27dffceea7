"""Readers for E-DAIC-WOZ, DAIC-WOZ and CMDC, exactly as distributed."""

from __future__ import annotations

from pathlib import Path

from mllm_dr.corpus import cmdc, daic, edaic
from mllm_dr.corpus.model import FORMATS, Corpus, Media, Participant, Turn
from mllm_dr.errors import NotACorpusError

_READERS = {"edaic": edaic, "daic": daic, "cmdc": cmdc}

__all__ = ["Corpus", "Media", "Participant", "Turn", "FORMATS", "detect_format", "read_corpus"]


def detect_format(root: Path) -> str:
    """Which corpus layout ROOT holds. DAIC is tested before E-DAIC (both use ``NNN_P``)."""
    root = Path(root)
    if not root.is_dir():
        raise NotACorpusError("is not a directory", root)
    for name in ("daic", "edaic", "cmdc"):
        if _READERS[name].looks_like(root):
            return name
    raise NotACorpusError("is not an E-DAIC-WOZ, DAIC-WOZ or CMDC corpus (no split/label files, "
                          "no NNN_P session folders, no HC/MDD subject folders)", root)


def read_corpus(root: str | Path, fmt: str = "auto") -> Corpus:
    """Read a corpus; problems are collected on the returned Corpus, not raised."""
    root = Path(root)
    if fmt == "auto":
        fmt = detect_format(root)
    elif fmt not in _READERS:
        raise NotACorpusError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", root)
    elif not root.is_dir():
        raise NotACorpusError("is not a directory", root)
    elif not _READERS[fmt].looks_like(root):
        raise NotACorpusError(f"does not look like a {fmt} corpus", root)
    return _READERS[fmt].read(root)
