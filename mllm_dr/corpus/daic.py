"""DAIC-WOZ (AVEC 2016/2017) as distributed.

Quirks handled: TAB-separated ``NNN_TRANSCRIPT.csv`` with Ellie / Participant turns and
annotations (``<laughter>``), plain text without csv quoting (a turn may start with ``"``),
empty item cells (the total is known, the item is not), the test split's lower-case
``participant_ID`` with no labels, ``full_test_split.csv`` holding test totals only, CLNF files
with ``, `` separators and their own gaze/pose column names (``features.visual.CLNF_NAMES``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from mllm_dr import phq
from mllm_dr.corpus.edaic import _float, session_folders
from mllm_dr.corpus.labels import (UNLISTED, check_listed_vs_present, complete_labels, given_total, labels_agree,
                                   note_split, rows_by_participant)
from mllm_dr.corpus.model import Corpus, Media, Participant, Turn
from mllm_dr.corpus.tables import Problem, parse_int, read_label_table, read_table
from mllm_dr.errors import InputError

LABELED_SPLITS = {"train": "train_split_Depression_AVEC2017.csv", "dev": "dev_split_Depression_AVEC2017.csv"}
TEST_SPLIT = "test_split_Depression_AVEC2017.csv"
FULL_TEST = "full_test_split.csv"


def has_label_files(root: Path) -> bool:
    return any((root / n).is_file() for n in (*LABELED_SPLITS.values(), TEST_SPLIT))


def looks_like(root: Path) -> bool:
    return has_label_files(root) or any(
        (d / f"{pid}_TRANSCRIPT.csv").is_file() for pid, d in session_folders(root).items())


def read(root: Path) -> Corpus:
    problems: list[Problem] = []
    # pid -> (split, items, total, binary, the file of the total)
    labels: dict[str, tuple[str, dict, int | None, int | None, Path]] = {}
    splits: dict[str, str] = {}          # a participant listed under two splits is placed in none
    conflicts: set[str] = set()          # participants with rows that differ: placed in none either
    item_cols = tuple(f"PHQ8_{i}" for i in phq.PHQ8_ITEMS)
    for split, name in LABELED_SPLITS.items():
        path = root / name
        rows = read_label_table(path, ",", ("Participant_ID", "PHQ8_Binary", "PHQ8_Score") + item_cols, problems,
                                "split file is missing")
        for pid, row in rows_by_participant(rows or [], "Participant_ID", path, problems, conflicts).items():
            note_split(splits, pid, split, path, problems)
            items = {i: parse_int(row[f"PHQ8_{i}"], path, f"participant {pid} {i}", problems, 0, 3) for i in phq.PHQ8_ITEMS}
            total, unusable = given_total(row["PHQ8_Score"], path, pid, "PHQ8_Score", 24, problems, conflicts)
            labels[pid] = (split, items, total, None if unusable else
                           parse_int(row["PHQ8_Binary"], path, f"participant {pid} PHQ8_Binary", problems, 0, 1), path)
    test_totals = _read_full_test(root, problems, conflicts)
    test_path = root / TEST_SPLIT
    rows = read_label_table(test_path, ",", ("participant_ID",), problems, "split file is missing")
    for pid in rows_by_participant(rows or [], "participant_ID", test_path, problems, conflicts):
        note_split(splits, pid, "test", test_path, problems)
        total, binary = test_totals.get(pid, (None, None))
        labels[pid] = ("test", {i: None for i in phq.PHQ8_ITEMS}, total, binary, root / FULL_TEST)

    folders = session_folders(root)
    check_listed_vs_present(set(labels), set(folders), root, problems, has_splits=True)
    participants = []
    for pid, folder in sorted(folders.items(), key=lambda kv: int(kv[0])):
        split, items, total, binary, where = labels.get(pid, (UNLISTED, {i: None for i in phq.PHQ8_ITEMS}, None,
                                                              None, root))
        agree = labels_agree(pid, items, total, binary, where, problems)
        total, binary = complete_labels(items, total, binary)
        split = splits.get(pid, split) if agree and pid not in conflicts else UNLISTED
        participants.append(Participant(pid, split, items, total, binary,
                                        _read_transcript(folder / f"{pid}_TRANSCRIPT.csv", problems),
                                        _media(folder, pid), folder))
    return Corpus("daic", root, phq.PHQ8_ITEMS, participants, problems)


def _read_full_test(root: Path, problems: list[Problem],
                    conflicts: set[str]) -> dict[str, tuple[int | None, int | None]]:
    path = root / FULL_TEST                # optional: copies without test totals are normal
    rows = read_label_table(path, ",", ("Participant_ID", "PHQ_Score", "PHQ_Binary"), problems, None)
    out = {}
    for pid, r in rows_by_participant(rows or [], "Participant_ID", path, problems, conflicts).items():
        total, unusable = given_total(r["PHQ_Score"], path, pid, "PHQ_Score", 24, problems, conflicts)
        out[pid] = (total, None if unusable else
                    parse_int(r["PHQ_Binary"], path, f"participant {pid} PHQ_Binary", problems, 0, 1))
    return out


def _read_transcript(path: Path, problems: list[Problem]) -> list[Turn]:
    if not path.is_file():
        problems.append(Problem(str(path), "transcript is missing"))
        return []
    try:
        rows = read_table(path, "\t", ("start_time", "stop_time", "speaker", "value"), problems,
                          quoting=csv.QUOTE_NONE)        # plain text: a turn may start with '"'
    except InputError as err:
        problems.append(Problem(str(path), err.message))
        return []
    turns = [Turn(r["speaker"], r["value"], _float(r["start_time"]), _float(r["stop_time"]))
             for r in rows if r["value"]]
    if not any(t.speaker == "Participant" for t in turns):
        problems.append(Problem(str(path), "transcript has no Participant turns"))
    return turns


def _media(folder: Path, pid: str) -> Media:
    clnf = [folder / f"{pid}_CLNF_{k}.txt" for k in ("AUs", "gaze", "pose")]
    return Media(
        wav=[p for p in [folder / f"{pid}_AUDIO.wav"] if p.is_file()],
        audio_features=[p for p in [folder / f"{pid}_COVAREP.csv"] if p.is_file()],
        openface=[[p for p in clnf if p.is_file()]] if any(p.is_file() for p in clnf) else [],
        video=sorted(p for p in folder.glob("*") if p.suffix.lower() in {".mp4", ".avi", ".mov", ".mkv"}),
    )
