"""Readers for E-DAIC-WOZ, DAIC-WOZ and CMDC, exactly as distributed."""

from __future__ import annotations

from pathlib import Path

from mllm_dr.corpus import cmdc, daic, edaic
from mllm_dr.corpus.model import FORMATS, Corpus, Media, Participant, Turn
from mllm_dr.errors import NotACorpusError

_READERS = {"edaic": edaic, "daic": daic, "cmdc": cmdc}

__all__ = ["Corpus", "Media", "Participant", "Turn", "FORMATS", "detect_format", "read_corpus"]


def _check_folder(root: Path) -> None:
    """A missing path, a file, or a folder that holds corpora rather than being one: say which."""
    if not root.exists():
        raise NotACorpusError("does not exist", root)
    if not root.is_dir():
        raise NotACorpusError("is a file; a corpus is a folder", root)
    if any(r.has_label_files(root) for r in _READERS.values()):
        return
    inside = sorted(d.name for d in root.iterdir() if d.is_dir() and any(r.has_label_files(d) for r in _READERS.values()))
    if inside:
        raise NotACorpusError(f"is not itself a corpus; corpora found in it ({len(inside)}): {', '.join(inside[:10])}"
                              f"{' ...' if len(inside) > 10 else ''}; name one of them", root)


def detect_format(root: Path) -> str:
    """Which corpus layout ROOT holds. DAIC is tested before E-DAIC (both use ``NNN_P``)."""
    root = Path(root)
    _check_folder(root)
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
    else:
        _check_folder(root)
    if not _READERS[fmt].looks_like(root):
        raise NotACorpusError(f"does not look like a {fmt} corpus", root)
    return _READERS[fmt].read(root)
