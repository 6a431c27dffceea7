"""Shared label logic: totals, binary call, label files checked against themselves, listed vs present."""

from __future__ import annotations

from pathlib import Path

from mllm_dr import phq
from mllm_dr.corpus.tables import Problem, parse_int

# The split of a participant a corpus with its own split files does not place (labelled, but in no split
# file; listed in two; a session folder no file names), or whose labels contradict themselves: in no
# training or evaluation split. Guessing one (as for CMDC, which ships none) could put a test participant
# into training; training on labels that contradict themselves would learn one of them at random.
UNLISTED = "unlisted"
LEFT_OUT = f"left out of training and evaluation (split {UNLISTED!r})"


def given_total(value: str | None, path: Path, pid: str, column: str, hi: int, problems: list[Problem],
                conflicts: set[str], who: str = "participant") -> tuple[int | None, bool]:
    """A label file's total cell: (the total or None, whether it was given but unusable). Since session 44 a
    non-empty total that is not a whole number in 0..``hi`` (E-DAIC's PHQ_Score 26) puts the participant in
    ``conflicts`` (the caller leaves it out, ``UNLISTED``), named: it was replaced by the item sum, or, with
    no items (a test participant), left its binary call to be evaluated without it. Which figure is right
    cannot be told. An empty cell is no total (DAIC's test totals may be absent)."""
    found: list[Problem] = []
    total = parse_int(value, path, f"{who} {pid} {column}", found, 0, hi)
    for problem in found:
        problems.append(Problem(problem.path, f"{problem.message}: {LEFT_OUT}"))
        conflicts.add(pid)
    return total, bool(found)


def complete_labels(items: dict[str, int | None], total: int | None, binary: int | None) -> tuple[int | None, int | None]:
    """Fill the total from items when all are known, and the binary call from the total.

    A corpus total is kept as given (DAIC has totals whose items are partly empty).
    """
    if total is None and items and all(v is not None for v in items.values()):
        total = sum(v for v in items.values() if v is not None)
    if total is not None:         # the cut-off defines the call: a given one that disagrees is named (labels_agree)
        binary = phq.binary(total)
    return total, binary


def labels_agree(pid: str, items: dict[str, int | None], total: int | None, binary: int | None, path: Path,
                 problems: list[Problem], who: str = "participant") -> bool:
    """Whether a participant's labels agree: a given total is the sum of the items when every item is known
    (DAIC's totals whose items are partly empty are not compared); if not, a problem naming ``path`` (the
    file of the total) and the participant, and the caller leaves the participant out (``UNLISTED``):
    which figure is right cannot be told. A binary call that is not total >= 10 is named too, but the
    total's call is used (``complete_labels``), the participant kept."""
    ok = True
    known = bool(items) and all(v is not None for v in items.values())
    item_sum = sum(v for v in items.values() if v is not None) if known else None
    if total is not None and item_sum is not None and total != item_sum:
        problems.append(Problem(str(path), f"{who} {pid}: the total {total} is not the sum of the item scores "
                                           f"({item_sum}); {LEFT_OUT}"))
        ok = False
    total = total if total is not None else item_sum
    if binary is not None and total is not None and binary != phq.binary(total):
        # the total's call is used (complete_labels): DAIC-WOZ itself ships one such row (409: total 10,
        # binary 0), and leaving that participant out would change the paper's training set
        problems.append(Problem(str(path), f"{who} {pid}: the binary call {binary} does not match the total {total} "
                                           f"(1 when the total is >= {phq.BINARY_CUTOFF}): the total's call is used"))
    return ok


def rows_by_participant(rows: list[dict[str, str]], key: str, path: Path, problems: list[Problem],
                        conflicts: set[str], who: str = "participant") -> dict[str, dict[str, str]]:
    """A label file's rows by participant id (last rows never silently win). Two identical rows are one
    (named); rows that differ are named and their participant is put in ``conflicts``: which row is right
    cannot be told, so the caller leaves that participant out (``UNLISTED``)."""
    out: dict[str, dict[str, str]] = {}
    for row in rows:
        pid = str(row[key]).strip()
        if pid not in out:
            out[pid] = row
        elif row == out[pid]:
            problems.append(Problem(str(path), f"{who} {pid} is listed twice (the same values): one row is used"))
        elif pid not in conflicts:
            problems.append(Problem(str(path), f"{who} {pid} has rows that differ: {LEFT_OUT}"))
            conflicts.add(pid)
    return out


def check_listed_vs_present(listed: set[str], present: set[str], root: Path, problems: list[Problem],
                            has_splits: bool = False) -> None:
    """Report sessions that the label files list but the copy lacks, and the reverse (``has_splits``: a
    layout with split files, where such a folder is ``UNLISTED``)."""
    for pid in sorted(listed - present, key=_id_key):
        problems.append(Problem(str(root), f"participant {pid} is listed in the labels but its folder is absent"))
    for pid in sorted(present - listed, key=_id_key):
        problems.append(Problem(str(root), f"participant {pid} has a folder but is in no label file (unknown "
                                           f"participant){': ' + LEFT_OUT if has_splits else ''}"))


def _id_key(pid: str) -> tuple[int, str]:
    digits = "".join(c for c in pid if c.isdigit())
    return (int(digits) if digits else 0, pid)


def note_split(splits: dict[str, str], pid: str, split: str, path: Path, problems: list[Problem]) -> None:
    """Record ``pid``'s split from a split file (its rows already one per participant: ``rows_by_participant``);
    a participant listed under two splits is placed in none."""
    before = splits.get(pid)
    if before is None:
        splits[pid] = split
    elif before != split:
        problems.append(Problem(str(path), f"participant {pid} is also listed as {before}: {LEFT_OUT}"))
        splits[pid] = UNLISTED


def effective_split(participant_id: str, split: str | None) -> str:
    """The corpus split, or for corpora without split files (CMDC) a stable 80/20 train/test split by id hash."""
    if split is not None:
        return split
    import hashlib

    return "test" if int(hashlib.sha1(participant_id.encode()).hexdigest(), 16) % 5 == 0 else "train"
