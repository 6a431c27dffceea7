"""Shared label logic: totals, binary call and the listed-vs-present check."""

from __future__ import annotations

from pathlib import Path

from mllm_dr import phq
from mllm_dr.corpus.tables import Problem


def complete_labels(items: dict[str, int | None], total: int | None, binary: int | None) -> tuple[int | None, int | None]:
    """Fill the total from items when all are known, and the binary call from the total.

    A corpus total is kept as given (DAIC has totals whose items are partly empty).
    """
    if total is None and items and all(v is not None for v in items.values()):
        total = sum(v for v in items.values() if v is not None)
    if binary is None and total is not None:
        binary = phq.binary(total)
    return total, binary


def check_listed_vs_present(listed: set[str], present: set[str], root: Path, problems: list[Problem]) -> None:
    """Report sessions that the label files list but the copy lacks, and the reverse."""
    for pid in sorted(listed - present, key=_id_key):
        problems.append(Problem(str(root), f"participant {pid} is listed in the labels but its folder is absent"))
    for pid in sorted(present - listed, key=_id_key):
        problems.append(Problem(str(root), f"participant {pid} has a folder but is in no label file (unknown participant)"))


def _id_key(pid: str) -> tuple[int, str]:
    digits = "".join(c for c in pid if c.isdigit())
    return (int(digits) if digits else 0, pid)


# The split of a participant a corpus with its own split files does not place (labelled, but in no split
# file; or listed in two): in no training or evaluation split. Guessing one (as for CMDC, which ships none)
# could put a test participant into training.
UNLISTED = "unlisted"


def note_split(splits: dict[str, str], pid: str, split: str, path: Path, problems: list[Problem]) -> None:
    """Record ``pid``'s split from a split file; a participant listed under two splits is placed in none."""
    before = splits.get(pid)
    if before is None:
        splits[pid] = split
    elif before != split:
        problems.append(Problem(str(path), f"participant {pid} is also listed as {before}: left out of training "
                                           f"and evaluation (split {UNLISTED!r})"))
        splits[pid] = UNLISTED
    else:
        problems.append(Problem(str(path), f"participant {pid} is listed twice: the later row is used"))


def effective_split(participant_id: str, split: str | None) -> str:
    """The corpus split, or for corpora without one (CMDC) a stable 80/20 train/test split by id hash."""
    if split is not None:
        return split
    import hashlib

    return "test" if int(hashlib.sha1(participant_id.encode()).hexdigest(), 16) % 5 == 0 else "train"
