"""Session 42, the data path (a read-only review): real DAIC CLNF headers under the feature recipe, label
cross-checks, quotes in DAIC transcripts, constant feature columns, CMDC pickles of two widths, stray
session folders, empty label files and truncated feature tables."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, run_cli
from mllm_dr.corpus import read_corpus
from mllm_dr.corpus.labels import UNLISTED, effective_split
from mllm_dr.errors import InputError
from mllm_dr.features.extract import extract_workspace
from mllm_dr.features.recipe import RECIPES
from mllm_dr.features.store import FeatureStore
from mllm_dr.workspace import Workspace

RECIPE = "egemaps-openface"


def _copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _problems(corpus, path: Path | None = None) -> list[str]:
    return [p.message for p in corpus.problems if path is None or p.path == str(path)]


def _write_real_clnf(folder: Path, pid: str, frames: int = 12) -> None:
    """CLNF files with the headers DAIC-WOZ ships (OpenFace before 2.0): every column holds its own value."""
    meta = ["frame", "timestamp", "confidence", "success"]
    aus = [f"AU{a}_r" for a in ("01", "02", "04", "05", "06", "09", "10", "12", "14", "15", "17", "20", "25", "26")]
    aus += [f"AU{a}_c" for a in ("04", "12", "15", "23", "28", "45")]
    gaze = ["x_0", "y_0", "z_0", "x_1", "y_1", "z_1", "x_h0", "y_h0", "z_h0", "x_h1", "y_h1", "z_h1"]
    pose = ["Tx", "Ty", "Tz", "Rx", "Ry", "Rz"]
    for kind, cols in (("AUs", aus), ("gaze", gaze), ("pose", pose)):
        lines = [", ".join(meta + cols)]
        for f in range(1, frames + 1):
            values = [0.01 * (k + 1) + (600.0 if c == "Tz" else 0.0) + (9.0 if "_h" in c else 0.0)
                      for k, c in enumerate(cols)]
            lines.append(", ".join([str(f), f"{(f - 1) / 30:.4f}", "0.95", "1"] + [f"{v:g}" for v in values]))
        (folder / f"{pid}_CLNF_{kind}.txt").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- 1. DAIC's CLNF names under the recipe

def test_real_daic_clnf_headers_give_the_recipes_visual_features(tmp_path):
    """DAIC's CLNF files name gaze x_0 .. z_1 and pose Tx .. Rz; the recipe asked for OpenFace 2's
    gaze_0_x .. pose_Rz, so every real DAIC participant was stored without visual features (exit 0)."""
    root = _copy(tmp_path, "daic")
    _write_real_clnf(root / "320_P", "320")
    ws = Workspace.init(tmp_path / "ws", "d")
    extract_workspace(ws, root, recipe=RECIPE)                       # strict
    f = FeatureStore(ws.features_dir).get("320")
    want = RECIPES[RECIPE].visual_columns
    assert f.visual is not None, f.notes
    assert f.visual.shape[1] == len(want) == 26 and set(f.visual_names) == set(want)
    col = {n: f.visual[:, i] for i, n in enumerate(f.visual_names)}
    assert torch.allclose(col["pose_Tz"], torch.tensor(600.03))      # Tz, the 3rd pose column
    assert torch.allclose(col["gaze_0_x"], torch.tensor(0.01))       # x_0, never the head-space x_h0 (9.07)
    assert torch.allclose(col["gaze_1_z"], torch.tensor(0.06))       # z_1


def test_a_recipe_gap_at_every_participant_is_one_warning_for_the_site(tmp_path):
    """A recipe gap that hits every participant with visual data is the site's files, not one participant's:
    the site still joins with visual missing (zero padding, issue 12 section 2), in strict mode too, but the
    report now warns once for the site naming the missing columns, where only per-participant notes said it
    (real DAIC CLNF headers dropped every participant's visual features this way unnoticed)."""
    root = _copy(tmp_path, "daic")          # 320's CLNF files hold AU01_r, AU02_r and x_0, y_0, z_0 only
    ws = Workspace.init(tmp_path / "ws", "d")
    summary = extract_workspace(ws, root, recipe=RECIPE)                       # strict (the default)
    assert len(summary["warnings"]) == 1 and "AU04_r" in summary["warnings"][0]
    assert "visual modality is missing for every participant" in summary["warnings"][0]
    f = FeatureStore(ws.features_dir).get("320")
    assert f.visual is None and any("AU04_r" in n for n in f.notes)


# ---------------------------------------------------------------- 2. label cross-checks

def test_label_files_that_contradict_themselves_leave_the_participant_out_named(tmp_path):
    """Duplicate rows silently overwrote (last wins); a total was never compared with its items, nor the
    binary call with total >= 10; E-DAIC's PHQ-8 score was accepted up to 27. Each is now a problem naming
    the file and participant, and a participant whose labels contradict themselves is left out of training
    and evaluation (split 'unlisted'), as one listed under two splits already was."""
    edaic = _copy(tmp_path, "edaic")
    detailed, train, test = edaic / "Detailed_PHQ8_Labels.csv", edaic / "train_split.csv", edaic / "test_split.csv"
    detailed.write_text(detailed.read_text() + "301,3,3,1,2,1,2,1,1,14\n"       # 301 again, other items
                        + "300,0,0,1,1,0,0,0,0,2\n")                             # 300 again, the same row
    train.write_text(train.read_text() + "303,male,1,9,0,20\n")                 # binary 1 with a total of 9
    test.write_text(test.read_text().replace("302,male,1,15", "302,male,1,26"))  # PHQ-8: at most 24
    for pid in ("301", "303"):
        (edaic / f"{pid}_P").mkdir()
        shutil.copy(edaic / "300_P" / "300_Transcript.csv", edaic / f"{pid}_P" / f"{pid}_Transcript.csv")
    c = read_corpus(edaic)
    assert any("301" in m and "differ" in m for m in _problems(c, detailed))
    assert any("300" in m and "twice" in m for m in _problems(c, detailed))
    assert any("303" in m and "binary" in m and "the total's call is used" in m for m in _problems(c, train))
    assert any("302" in m and "outside 0..24" in m for m in _problems(c, test))
    split = {p.id: p.split for p in c.participants}
    # a binary call against its total is named, and the total's call used (DAIC-WOZ's own 409 is such a row)
    assert split["301"] == UNLISTED and split["300"] == split["303"] == "train" and c.get("303").binary == 0

    train.write_text(train.read_text().replace("300,male,0,2", "300,male,0,3"))    # items of 300 sum to 2
    c = read_corpus(edaic)
    assert any("300" in m and "sum" in m for m in _problems(c, train))
    assert c.get("300").split == UNLISTED

    daic = _copy(tmp_path, "daic")
    dev, full = daic / "dev_split_Depression_AVEC2017.csv", daic / "full_test_split.csv"
    dev.write_text(dev.read_text() + "320,0,5,0,0,1,1,1,0,0,1,1\n")               # 320 again, other labels
    full.write_text(full.read_text() + "400,1,12,1\n")                           # 400 again, another total
    trn = daic / "train_split_Depression_AVEC2017.csv"
    trn.write_text(trn.read_text().replace("319,1,13", "319,0,13"))              # binary 0 with 13
    c = read_corpus(daic, "daic")
    assert any("320" in m and "differ" in m for m in _problems(c, dev))
    assert any("400" in m and "differ" in m for m in _problems(c, full))
    assert any("319" in m and "binary" in m for m in _problems(c, trn))
    assert {p.id: p.split for p in c.participants} == {"319": "train", "320": UNLISTED, "400": UNLISTED}
    assert c.get("319").binary == 1                                               # the total's call

    cmdc = _copy(tmp_path, "cmdc")
    info = cmdc / "SubjectInfo.csv"
    info.write_text(info.read_text().replace("3,3,2,3,2,3,2,2,1,21", "3,3,2,3,2,3,2,2,1,20")   # items sum to 21
                    + "HC01,0,1,25,1,0,0,1,0,0,0,0,0,1,2,0\n")                   # HC01 again, other items
    c = read_corpus(cmdc)
    assert any("HC01" in m and "differ" in m for m in _problems(c, info))
    assert any("MDD01" in m and "sum" in m for m in _problems(c, info))
    assert all(effective_split(p.id, p.split) == UNLISTED for p in c.participants)


# ---------------------------------------------------------------- 3. quotes in DAIC transcripts

def test_a_daic_turn_starting_with_a_quote_keeps_every_turn_and_speaker(tmp_path):
    """DAIC transcripts are plain tab-separated text; read with csv quoting, a turn starting with '"'
    swallowed the rest of the transcript (the interviewer's turns too) into one Participant turn."""
    root = _copy(tmp_path, "daic")
    rows = [("Ellie", "how are you"), ("Participant", '"um i don\'t know'), ("Ellie", "okay"),
            ("Participant", 'she said "fine" to me'), ("Ellie", "thanks")]
    (root / "320_P" / "320_TRANSCRIPT.csv").write_text(
        "start_time\tstop_time\tspeaker\tvalue\n"
        + "".join(f"{i}.0\t{i}.5\t{s}\t{t}\n" for i, (s, t) in enumerate(rows)))
    turns = read_corpus(root, "daic").get("320").turns
    assert [(t.speaker, t.text) for t in turns] == rows


# ---------------------------------------------------------------- 4. constant feature columns

def test_a_feature_column_constant_in_training_does_not_blow_up_at_scoring():
    """A column constant over the training frames had its std clamped to 1e-4: a scoring frame differing by
    1 became 1e4. A (near-)constant column now keeps its mean and has std 1; other columns are as before."""
    from mllm_dr.processor import norms_from_moments

    x = torch.tensor([[1.0, 5.0, 0.0], [2.0, 5.0, 1e-3], [3.0, 5.0, 2e-3]], dtype=torch.float64)
    mean, std = norms_from_moments([{"audio": (3, x.sum(0), (x * x).sum(0))}])["audio"]
    frame = torch.tensor([2.0, 6.0, 1e-3])
    z = (frame - mean) / std
    assert abs(float(z[1])) <= 1.0 + 1e-6                 # was 1e4
    assert float(mean[1]) == 5.0 and float(std[0]) == pytest.approx(1.0) and float(std[2]) == pytest.approx(1e-3)
    # the center's federated norms come from the same function: two sites, the column constant at both
    a, b = x[:2], x[2:]
    pooled = norms_from_moments([{"audio": (len(p), p.sum(0), (p * p).sum(0))} for p in (a, b)])["audio"]
    assert torch.allclose(pooled[1], std)


# ---------------------------------------------------------------- 5. CMDC pickles of two widths

def test_cmdc_pickles_of_two_widths_are_named_not_an_internal_error(tmp_path):
    """A participant's VGGish .pkl segments of different widths crashed np.concatenate (exit 3), even with
    --no-strict. Strict: an error naming the odd file; --no-strict: that participant's audio missing, noted."""
    root = _copy(tmp_path, "cmdc")
    hc = root / "part1" / "HC01"
    for q, width in (("Q2", 128), ("Q4", 64)):
        with open(hc / f"{q}.pkl", "wb") as fh:
            pickle.dump(np.ones((3, width), dtype=np.float32), fh)
    ws = Workspace.init(tmp_path / "ws", "c")
    with pytest.raises(InputError, match="64") as err:
        extract_workspace(ws, root)
    assert "Q4.pkl" in str(err.value) and "Q2.pkl" in str(err.value) and "--no-strict" in str(err.value)
    extract_workspace(ws, root, strict=False)
    f = FeatureStore(ws.features_dir).get("HC01")
    assert f.audio is None and any("Q4.pkl" in n and "audio missing" in n for n in f.notes)


# ---------------------------------------------------------------- 6. stray session folders

def test_a_session_folder_no_file_lists_is_unlisted_not_hashed_into_training(tmp_path):
    """A DAIC/E-DAIC folder listed in no split or label file got a hash split (as CMDC's do) and then blocked
    training, with advice to take it out of split files that never named it. It is now unlisted."""
    from mllm_dr.dataset import labelled_training_instances

    root = _copy(tmp_path, "daic")
    (root / "501_P").mkdir()                                     # empty; its id hashes into 'train'
    (root / "502_P").mkdir()                                     # a transcript only; hashes into 'train'
    shutil.copy(root / "319_P" / "319_TRANSCRIPT.csv", root / "502_P" / "502_TRANSCRIPT.csv")
    ws = Workspace.init(tmp_path / "ws", "d")
    ws.config.corpus_path, ws.config.corpus_format = str(root), "daic"
    ws.save()
    assert {i.participant for i in labelled_training_instances(ws)} == {"319", "320"}
    c = read_corpus(root, "daic")
    assert c.get("501").split == c.get("502").split == UNLISTED
    assert any("501" in m and "no label file" in m and UNLISTED in m for m in _problems(c))
    cmdc = read_corpus(FIXTURES / "cmdc")                      # no split files: CMDC's split stays the hash
    assert all(p.split is None for p in cmdc.participants)


# ---------------------------------------------------------------- 7. empty split and label files

def test_an_empty_split_file_or_one_without_an_item_column_is_a_listed_problem(tmp_path):
    """A 0-byte split file, or a label file without an item column, made `data check` exit 2 with no report,
    while a missing file is a listed problem (exit 1, --json complete). Now both are listed problems."""
    root = _copy(tmp_path, "daic")
    test_split = root / "test_split_Depression_AVEC2017.csv"
    test_split.write_bytes(b"")
    dev = root / "dev_split_Depression_AVEC2017.csv"
    dev.write_text(dev.read_text().replace(",PHQ8_Sleep", ",Sleep"))
    proc = run_cli("mllmdr-site", "data", "check", root, "--json", check=False)
    assert proc.returncode == 1, proc.stderr
    problems = json.loads(proc.stdout)["problems"]
    assert any(p["path"] == str(test_split) and "empty" in p["message"] for p in problems)
    assert any(p["path"] == str(dev) and "PHQ8_Sleep" in p["message"] for p in problems)
    edaic = _copy(tmp_path, "edaic")
    (edaic / "Detailed_PHQ8_Labels.csv").write_bytes(b"")
    (edaic / "train_split.csv").write_text("Gender,PHQ_Score\nmale,2\n")
    c = read_corpus(edaic)
    assert any("empty" in m for m in _problems(c, edaic / "Detailed_PHQ8_Labels.csv"))
    assert any("Participant_ID" in m for m in _problems(c, edaic / "train_split.csv"))
    cmdc = _copy(tmp_path, "cmdc")
    (cmdc / "SubjectInfo.csv").write_bytes(b"")
    assert any("empty" in m for m in _problems(read_corpus(cmdc), cmdc / "SubjectInfo.csv"))


# ---------------------------------------------------------------- 8. truncated feature tables

def test_a_feature_table_cut_mid_row_is_a_media_problem(tmp_path):
    """A feature CSV cut mid-row passed `data check` and strict extract with only a note in the manifest.
    Now `data check` lists it and strict extract stops naming the file (exit 2 at the CLI)."""
    from mllm_dr.features.schema import checked_corpus

    root = _copy(tmp_path, "edaic")
    of = root / "300_P" / "features" / "300_OpenFace2.1.0_Pose_gaze_AUs.csv"
    of.write_text(of.read_text() + "3, 0, 0.066, 0.9")                            # the copy stopped here
    corpus, check = checked_corpus(root)
    assert any(p.path == str(of) and "truncated" in p.message for p in check.problems)
    assert any(p.path == str(root / "300_P") and "visual missing" in p.message for p in check.problems)
    ws = Workspace.init(tmp_path / "ws", "e")
    with pytest.raises(InputError, match="truncated") as err:
        extract_workspace(ws, root)
    assert str(of) in str(err.value)
    assert not FeatureStore(ws.features_dir).participants                      # stopped before writing


def test_a_malformed_row_inside_a_feature_table_stops_strict_extract(tmp_path):
    """A malformed row inside a feature table (not at its end: `data check` reads headers and tails) was
    dropped with a note, even under strict extract. Strict now stops naming the file; --no-strict drops it."""
    root = _copy(tmp_path, "edaic")
    bad = root / "300_P" / "features" / "300_OpenSMILE2.3.0_egemaps.csv"
    bad.write_text(bad.read_text().replace("unknown;0.01;0.6;21.0", "unknown;0.01;0.6") + "unknown;0.02;0.7;22.0\n")
    ws = Workspace.init(tmp_path / "ws", "e")
    with pytest.raises(InputError, match="malformed row") as err:
        extract_workspace(ws, root)
    assert str(bad) in str(err.value) and "--no-strict" in str(err.value)
    extract_workspace(ws, root, strict=False)
    f = FeatureStore(ws.features_dir).get("300")
    assert f.audio is not None and any("malformed row dropped" in n for n in f.notes)
