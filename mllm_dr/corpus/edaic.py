"""E-DAIC-WOZ (AVEC 2019 DDS) as distributed.

Quirks handled: ``NNN_Transcript.csv`` ("Transcript", comma-separated ASR output with no
speaker column: every row is the participant), ``PHQ_Score`` the PHQ-8 total (0..24), features
in ``NNN_P/features/``, semicolon-separated openSMILE CSVs, ResNet ``.mat`` files, copies that lack
some sessions.
"""

from __future__ import annotations

from pathlib import Path

from mllm_dr import phq
from mllm_dr.corpus.labels import (LEFT_OUT, UNLISTED, _id_key, check_listed_vs_present, complete_labels,
                                   given_total, labels_agree, note_split, rows_by_participant)
from mllm_dr.corpus.model import PARTICIPANT_SPEAKER, Corpus, Media, Participant, Turn
from mllm_dr.corpus.tables import Problem, add_folder, parse_int, read_label_table, read_table
from mllm_dr.errors import InputError

SPLITS = {"train": "train_split.csv", "dev": "dev_split.csv", "test": "test_split.csv"}
DETAILED = "Detailed_PHQ8_Labels.csv"
TRANSCRIPT_COLUMNS = ("Start_Time", "End_Time", "Text", "Confidence")


def session_folders(root: Path, suffix: str = "_P") -> dict[str, Path]:
    """``NNN_P`` folders at the root or one level below (some copies nest them); two folders of one
    participant are an error naming both (``tables.add_folder``)."""
    found: dict[str, Path] = {}
    for pattern in (f"*{suffix}", f"*/*{suffix}"):
        for d in sorted(root.glob(pattern)):
            pid = d.name[: -len(suffix)]
            if d.is_dir() and pid.isdigit():
                add_folder(found, pid, d, root, f"participant {pid} has two session folders")
    return found


def has_label_files(root: Path) -> bool:
    return (root / DETAILED).is_file() or any((root / n).is_file() for n in SPLITS.values())


def looks_like(root: Path) -> bool:
    return has_label_files(root) or any(
        (d / f"{pid}_Transcript.csv").is_file() for pid, d in session_folders(root).items())


def read(root: Path) -> Corpus:
    problems: list[Problem] = []
    conflicts: set[str] = set()          # participants with label rows that differ
    splits, totals, binaries, sources = _read_splits(root, problems, conflicts)
    before = len(problems)
    items = _read_detailed(root, problems, conflicts)
    damaged = any(pr.path == str(root / DETAILED) for pr in problems[before:])
    folders = session_folders(root)
    check_listed_vs_present(set(splits) | set(items), set(folders), root, problems, has_splits=True)
    if (root / DETAILED).is_file():   # a truncated or partial item file: name every participant it lacks
        # copies without test item rows are normal; a damaged file or one with some test rows is not
        covers_test = damaged or any(splits.get(pid) == "test" for pid in items)
        for pid in sorted(set(folders) - set(items), key=int):
            if splits.get(pid) != "test" or covers_test:
                problems.append(Problem(str(root / DETAILED), f"participant {pid} has no row: item scores unknown"))

    for pid in sorted(set(items) - set(splits), key=_id_key):   # labelled, in no split file: never guessed
        problems.append(Problem(str(root / DETAILED), f"participant {pid} has item scores but is in no split file: "
                                                      f"{LEFT_OUT}"))
        splits[pid] = UNLISTED
    participants = []
    for pid, folder in sorted(folders.items(), key=lambda kv: int(kv[0])):
        item_scores = items.get(pid, {name: None for name in phq.PHQ8_ITEMS})
        agree = labels_agree(pid, item_scores, totals.get(pid), binaries.get(pid), sources.get(pid, root), problems)
        total, binary = complete_labels(item_scores, totals.get(pid), binaries.get(pid))
        participants.append(Participant(
            id=pid, split=splits.get(pid, UNLISTED) if agree and pid not in conflicts else UNLISTED,
            items=item_scores, total=total, binary=binary,
            turns=_read_transcript(folder / f"{pid}_Transcript.csv", problems),
            media=_media(folder, pid), folder=folder))
    return Corpus("edaic", root, phq.PHQ8_ITEMS, participants, problems)


def _read_splits(root: Path, problems: list[Problem], conflicts: set[str]):
    splits: dict[str, str] = {}
    totals: dict[str, int | None] = {}
    binaries: dict[str, int | None] = {}
    sources: dict[str, Path] = {}       # the split file each participant's total comes from
    for split, name in SPLITS.items():
        path = root / name
        rows = read_label_table(path, ",", ("Participant_ID",), problems, "split file is missing")
        for pid, row in rows_by_participant(rows or [], "Participant_ID", path, problems, conflicts).items():
            note_split(splits, pid, split, path, problems)
            # PHQ_Score is the PHQ-8 total (0..24), as in Detailed_PHQ8_Labels.csv; one that cannot be used
            # leaves the participant out, its binary call with it (labels.given_total)
            totals[pid], unusable = given_total(row.get("PHQ_Score"), path, pid, "PHQ_Score", 24, problems, conflicts)
            binaries[pid] = None if unusable else parse_int(row.get("PHQ_Binary"), path,
                                                            f"participant {pid} PHQ_Binary", problems, 0, 1)
            sources[pid] = path
    return splits, totals, binaries, sources


def _read_detailed(root: Path, problems: list[Problem], conflicts: set[str]) -> dict[str, dict[str, int | None]]:
    path = root / DETAILED
    columns = tuple(f"PHQ_8{item}" for item in phq.PHQ8_ITEMS)
    rows = read_label_table(path, ",", ("Participant_ID",) + columns, problems,
                            "item labels are missing: item scores unknown")
    return {pid: {item: parse_int(row[f"PHQ_8{item}"], path, f"participant {pid} {item}", problems, 0, 3)
                  for item in phq.PHQ8_ITEMS}
            for pid, row in rows_by_participant(rows or [], "Participant_ID", path, problems, conflicts).items()}


def _read_transcript(path: Path, problems: list[Problem]) -> list[Turn]:
    if not path.is_file():
        problems.append(Problem(str(path), "transcript is missing"))
        return []
    try:
        rows = read_table(path, ",", ("Text",), problems)
    except InputError as err:
        problems.append(Problem(str(path), err.message))
        return []
    turns = [Turn(PARTICIPANT_SPEAKER, r["Text"], _float(r.get("Start_Time")), _float(r.get("End_Time")))
             for r in rows if r["Text"]]
    if not turns:
        problems.append(Problem(str(path), "transcript is empty"))
    return turns


def _media(folder: Path, pid: str) -> Media:
    feats = folder / "features"

    def existing(*paths: Path) -> list[Path]:
        return [p for p in paths if p.is_file()]

    return Media(
        wav=existing(folder / f"{pid}_AUDIO.wav"),
        audio_features=existing(feats / f"{pid}_OpenSMILE2.3.0_egemaps.csv"),
        openface=[[p] for p in existing(feats / f"{pid}_OpenFace2.1.0_Pose_gaze_AUs.csv")],
        resnet=existing(feats / f"{pid}_CNN_ResNet.mat"),
        video=sorted(p for p in folder.glob("*") if p.suffix.lower() in {".mp4", ".avi", ".mov", ".mkv"}),
    )


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None
