"""CMDC (Chinese Multimodal Depression Corpus) as distributed.

Quirks handled: subject folders ``HC01``/``MDD01`` possibly nested (``part1/HC01``),
per-question files ``Q1.wav`` (48 kHz stereo), ``Q1.txt`` (UTF-8 Chinese), ``Q1.pkl``,
``Q1.npy``, ``Q1.csv`` (OpenFace), subjects without video, ``SubjectInfo.csv`` or
``.xlsx`` with the ``VideoAvailabe`` spelling and ``PHQ-1`` ... ``PHQ-9`` columns.
CMDC has no official split: ``split`` is null.
"""

from __future__ import annotations

import re
from pathlib import Path

from mllm_dr import phq
from mllm_dr.corpus.labels import (UNLISTED, check_listed_vs_present, complete_labels, given_total, labels_agree,
                                   rows_by_participant)
from mllm_dr.corpus.model import PARTICIPANT_SPEAKER, Corpus, Media, Participant, Turn
from mllm_dr.corpus.tables import Problem, add_folder, parse_int, read_label_table, read_text
from mllm_dr.errors import InputError

SUBJECT_RE = re.compile(r"^(HC|MDD)\d+$")
QUESTION_RE = re.compile(r"^Q(\d+)$")
INFO_NAMES = ("SubjectInfo.csv", "SubjectInfo.xlsx")


def subject_folders(root: Path) -> dict[str, Path]:
    """Subject folders at the root or one level below; one subject in two folders is an error naming both."""
    found: dict[str, Path] = {}
    for pattern in ("*", "*/*"):
        for d in sorted(root.glob(pattern)):
            if d.is_dir() and SUBJECT_RE.match(d.name):
                add_folder(found, d.name, d, root, f"subject {d.name} has two folders")
    return found


def has_label_files(root: Path) -> bool:
    return any((root / n).is_file() for n in INFO_NAMES)


def looks_like(root: Path) -> bool:
    return has_label_files(root) or bool(subject_folders(root))


def read(root: Path) -> Corpus:
    problems: list[Problem] = []
    conflicts: set[str] = set()          # subjects with rows that differ
    labels, info = _read_info(root, problems, conflicts)
    folders = subject_folders(root)
    check_listed_vs_present(set(labels), set(folders), root, problems)
    participants = []
    for sid, folder in sorted(folders.items(), key=lambda kv: (kv[0].rstrip("0123456789"), _num(kv[0]))):
        items, given = labels.get(sid, ({i: None for i in phq.PHQ9_ITEMS}, None))
        # no split files: the split stays None (hashed, labels.effective_split) unless the labels contradict
        split = None if labels_agree(sid, items, given, None, info, problems, "subject") and sid not in conflicts \
            else UNLISTED
        total, binary = complete_labels(items, given, None)
        turns, media = _read_questions(folder, problems)
        participants.append(Participant(sid, split, items, total, binary, turns, media, folder))
    return Corpus("cmdc", root, phq.PHQ9_ITEMS, participants, problems)


def _read_info(root: Path, problems: list[Problem],
               conflicts: set[str]) -> tuple[dict[str, tuple[dict, int | None]], Path]:
    path = next((root / n for n in INFO_NAMES if (root / n).is_file()), root / "SubjectInfo.csv")
    cols = ("ID",) + tuple(f"PHQ-{k}" for k in range(1, 10))
    if path.suffix == ".xlsx":
        try:
            rows = _read_xlsx(path, cols)
        except InputError as err:
            problems.append(Problem(str(path), f"{err.message}; the file is not used"))
            rows = None
    else:
        rows = read_label_table(path, ",", cols, problems, "subject info (labels) is missing")
    out = {}
    for sid, row in rows_by_participant(rows or [], "ID", path, problems, conflicts, "subject").items():
        items = {item: parse_int(str(row[f"PHQ-{k}"]), path, f"subject {sid} PHQ-{k}", problems, 0, 3)
                 for k, item in enumerate(phq.PHQ9_ITEMS, start=1)}
        total = given_total(str(row.get("PHQtotal", "")), path, sid, "PHQtotal", 27, problems, conflicts, "subject")[0]
        out[sid] = (items, total)
    return out, path


def _read_xlsx(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    import openpyxl  # only CMDC copies that ship .xlsx need it

    try:
        sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).active
    except Exception as err:  # openpyxl raises many types for a broken workbook
        raise InputError(f"cannot read workbook: {err}", path) from None
    rows = list(sheet.iter_rows(values_only=True)) if sheet is not None else []
    if not rows:
        raise InputError("the workbook's sheet is empty (no header row)", path)
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)}", path)
    return [{h: ("" if v is None else str(v)) for h, v in zip(header, r)} for r in rows[1:] if any(v is not None for v in r)]


def _read_questions(folder: Path, problems: list[Problem]) -> tuple[list[Turn], Media]:
    questions = sorted({m.group(0) for p in folder.iterdir() if (m := QUESTION_RE.match(p.stem))}, key=_num)
    turns: list[Turn] = []
    media = Media()
    for q in questions:
        txt = folder / f"{q}.txt"
        if txt.is_file():
            try:
                text, note = read_text(txt, fallback_encodings=("gb18030",))
                if note:
                    problems.append(Problem(str(txt), note))
                if text.strip():
                    # Q01.txt answers the question map's Q1: the number names the question, not its spelling
                    turns.append(Turn(PARTICIPANT_SPEAKER, text.strip(), question=f"Q{int(q[1:])}"))
                else:
                    problems.append(Problem(str(txt), "transcript is empty"))
            except InputError as err:
                problems.append(Problem(str(txt), err.message))
        for attr, name in (("wav", f"{q}.wav"), ("audio_features", f"{q}.pkl")):
            if (folder / name).is_file():
                getattr(media, attr).append(folder / name)
        if (folder / f"{q}.csv").is_file():
            media.openface.append([folder / f"{q}.csv"])
    if not questions:
        problems.append(Problem(str(folder), "no question files (Q1.txt, Q1.wav, ...)"))
    return turns, media


def _num(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0
