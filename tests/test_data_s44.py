"""Session 44, the data-in path (a review's findings): files left out by --no-strict known in full, totals that
cannot be used, extract's options checked before it writes, CLNF files that lost rows, label files cut after a
delimiter, a CMDC pickle of one number, damaged feature tables at `data check`, non-finite values counted
before pooling."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, run_cli
from mllm_dr.corpus import read_corpus
from mllm_dr.corpus.labels import UNLISTED
from mllm_dr.corpus.tables import DroppedRow
from mllm_dr.errors import InputError
from mllm_dr.features.extract import extract_workspace
from mllm_dr.features.store import FeatureStore
from mllm_dr.workspace import Workspace

CLNF_COLUMNS = {"AUs": ["AU01_r", "AU02_r", "AU04_r"], "gaze": ["x_0", "y_0", "z_0"], "pose": ["Tx", "Ty", "Tz"]}


def _copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _write_clnf(folder: Path, pid: str, frames: int = 12) -> dict[str, Path]:
    """DAIC CLNF files (AUs, gaze, pose) of ``frames`` frames each, ', '-separated as DAIC ships them."""
    files = {}
    for kind, cols in CLNF_COLUMNS.items():
        lines = [", ".join(["frame", "timestamp", "confidence", "success", *cols])]
        lines += [", ".join([str(f), f"{(f - 1) / 30:.4f}", "0.95", "1", *(f"{0.1 * k + f:g}" for k in range(len(cols)))])
                  for f in range(1, frames + 1)]
        files[kind] = folder / f"{pid}_CLNF_{kind}.txt"
        files[kind].write_text("\n".join(lines) + "\n")
    return files


def _workspace(tmp_path: Path) -> Workspace:
    return Workspace.init(tmp_path / "ws", "s44")


class _Instance:
    """What ``dataset.examples`` reads of an aspect instance (building real ones runs the sentence encoder)."""

    def __init__(self, participant: str, item: str = "Sleep"):
        self.participant, self.item, self.label = participant, item, 1


def _messages(corpus, path: Path | None = None) -> list[str]:
    return [p.message for p in corpus.problems if path is None or p.path == str(path)]


# ---------------------------------------------------------------- 1. every file --no-strict left out is known

def test_files_left_out_by_no_strict_extract_are_known_so_the_participant_trains_with_visual_missing(tmp_path):
    """After `extract --no-strict` only problem paths that were plain files were recorded: DAIC's CLNF files
    were named together in one string (the other two unrecorded), and CMDC's one bad Q3.csv cleared every
    Q*.csv naming only Q3.csv. `dataset.examples` then said the participant's files "came since its features
    were extracted", for good. Every file the media check leaves out is recorded now."""
    from mllm_dr.dataset import examples

    daic = _copy(tmp_path, "daic")
    files = _write_clnf(daic / "320_P", "320")
    files["AUs"].write_text(files["AUs"].read_text() + "13, 0.4, 0.9")          # cut mid-row
    ws = _workspace(tmp_path)
    extract_workspace(ws, daic, strict=False)
    got = examples(ws, [_Instance("320")], 2, with_answers=False)                # raised InputError
    assert got[0].features["visual"] is None
    sources = FeatureStore(ws.features_dir).manifest["participants"]["320"]["sources"]
    assert {f"320_P/{f.name}" for f in files.values()} <= set(sources)

    cmdc = _copy(tmp_path, "cmdc")
    hc = cmdc / "part1" / "HC01"
    (hc / "Q3.csv").write_text((hc / "Q2.csv").read_text() + "3, 0, 0.066")      # cut mid-row
    (hc / "Q3.txt").write_text("我睡不好。\n")
    ws = Workspace.init(tmp_path / "ws_cmdc", "s44c")
    extract_workspace(ws, cmdc, strict=False)
    assert examples(ws, [_Instance("HC01")], 2, with_answers=False)[0].features["visual"] is None
    sources = FeatureStore(ws.features_dir).manifest["participants"]["HC01"]["sources"]
    assert {"part1/HC01/Q2.csv", "part1/HC01/Q3.csv"} <= set(sources)


# ---------------------------------------------------------------- 2. a total that cannot be used

def test_a_total_out_of_range_or_not_a_number_leaves_the_participant_out(tmp_path):
    """A total cell the reader rejects (PHQ-8 26, 'x') was replaced by the item sum and the participant kept
    training; a test participant without items kept its binary call, evaluated without its total. Such a
    participant is now left out of training and evaluation (split 'unlisted'), named."""
    edaic = _copy(tmp_path, "edaic")
    train, test = edaic / "train_split.csv", edaic / "test_split.csv"
    train.write_text(train.read_text().replace("300,male,0,2,", "300,male,0,26,"))
    test.write_text(test.read_text().replace("302,male,1,15,", "302,male,1,26,"))
    c = read_corpus(edaic)
    assert c.get("300").split == UNLISTED and c.get("300").total == 2            # was: the item sum, training
    assert any("300" in m and "outside 0..24" in m and UNLISTED in m for m in _messages(c, train))
    assert c.get("302").split == UNLISTED and c.get("302").binary is None        # no binary left without total
    assert any("302" in m and "outside 0..24" in m for m in _messages(c, test))

    daic = _copy(tmp_path, "daic")
    trn, full = daic / "train_split_Depression_AVEC2017.csv", daic / "full_test_split.csv"
    trn.write_text(trn.read_text().replace("319,1,13,", "319,1,x,"))
    full.write_text(full.read_text().replace("400,1,11,", "400,1,99,"))
    c = read_corpus(daic, "daic")
    assert c.get("319").split == UNLISTED and any("319" in m and "not a number" in m for m in _messages(c, trn))
    assert c.get("400").split == UNLISTED and c.get("400").binary is None
    assert c.get("320").split == "dev"

    cmdc = _copy(tmp_path, "cmdc")
    info = cmdc / "SubjectInfo.csv"
    info.write_text(info.read_text().replace("HC01,0,1,25,1,0,0,1,0,0,0,0,0,0,1,0", "HC01,0,1,25,1,0,0,1,0,0,0,0,0,0,30,0"))
    c = read_corpus(cmdc)
    assert c.get("HC01").split == UNLISTED and any("HC01" in m and "PHQtotal" in m for m in _messages(c, info))
    assert read_corpus(FIXTURES / "cmdc").get("HC01").split is None                # the shipped fixture: hashed


# ---------------------------------------------------------------- 3. extract checks its options first

def test_a_folder_that_is_no_hubert_checkpoint_leaves_workspace_json_unchanged(tmp_path):
    """A folder that is no HuBERT checkpoint was saved into workspace.json (never loaded when the corpus had no
    wav; else failing after the save). --hubert is now checked before extract writes anything."""
    daic = _copy(tmp_path, "daic")
    ws = _workspace(tmp_path)
    extract_workspace(ws, daic)
    config = (ws.root / "workspace.json").read_bytes()
    empty = tmp_path / "not_hubert"
    empty.mkdir()
    with pytest.raises(InputError, match="no config.json") as err:
        extract_workspace(ws, daic, hubert=empty)
    assert str(empty) in str(err.value)
    assert (ws.root / "workspace.json").read_bytes() == config
    (empty / "config.json").write_text('{"model_type": "wav2vec2"}')
    with pytest.raises(InputError, match="model_type 'wav2vec2'"):
        extract_workspace(ws, daic, hubert=empty)
    assert (ws.root / "workspace.json").read_bytes() == config


def test_conflicting_extract_options_leave_store_rationales_and_adapters_untouched(tmp_path):
    """--recipe fixing the audio features with --hubert was refused only after --replace-corpus had emptied
    the store, set the rationales aside, marked the adapters stale and audited it."""
    ws = _workspace(tmp_path)
    extract_workspace(ws, _copy(tmp_path, "daic"))
    config = (ws.root / "workspace.json").read_bytes()
    ws.rationales_path.parent.mkdir(parents=True, exist_ok=True)
    ws.rationales_path.write_text('{"participant": "319"}\n')
    adapter = ws.checkpoints_dir / "local" / "stage2"
    adapter.mkdir(parents=True)
    manifest = FeatureStore(ws.features_dir).manifest_path.read_bytes()
    with pytest.raises(InputError, match="conflicts with the feature recipe"):
        extract_workspace(ws, _copy(tmp_path, "cmdc"), hubert=tmp_path, recipe="egemaps-openface",
                          replace_corpus=True)
    store = FeatureStore(ws.features_dir)
    assert store.participants and store.manifest_path.read_bytes() == manifest
    assert ws.rationales_path.is_file() and not list(adapter.iterdir())             # no STALE.json
    assert (ws.root / "workspace.json").read_bytes() == config
    assert "replace-corpus" not in ws.audit_path.read_text()


# ---------------------------------------------------------------- 4. CLNF files of one segment that lost rows

def test_a_clnf_file_that_lost_rows_fails_data_check_and_stops_strict_extract(tmp_path):
    """DAIC CLNF files of different lengths (pose.txt lost rows) passed `data check` and strict extract with a
    note (the frames joined on those all held). `data check` now compares their row counts and names the
    short file; extraction reads it as a dropped row, so strict extraction stops."""
    from mllm_dr.features.visual import read_openface

    daic = _copy(tmp_path, "daic")
    files = _write_clnf(daic / "320_P", "320")
    pose = files["pose"]
    lines = pose.read_text().splitlines()
    pose.write_text("\n".join(lines[:5] + lines[7:]) + "\n")                     # frames 5 and 6 lost, not cut
    proc = run_cli("mllmdr-site", "data", "check", daic, "--json", check=False)
    assert proc.returncode == 1, proc.stderr
    named = [p["message"] for p in json.loads(proc.stdout)["problems"] if p["path"] == str(pose)]
    assert named and "10 rows" in named[0] and "320_CLNF_AUs.txt" in named[0]
    with pytest.raises(InputError) as err:
        extract_workspace(_workspace(tmp_path), daic)
    assert str(pose) in str(err.value)
    notes: list = []
    read_openface([files["AUs"], files["gaze"], pose], notes)                    # the extraction's own backstop
    assert any(isinstance(n, DroppedRow) and n.path == str(pose) for n in notes)


# ---------------------------------------------------------------- 5. a label file cut just after a delimiter

def test_a_label_file_cut_just_after_its_last_comma_names_the_participant(tmp_path):
    """A label file cut right after a comma read as complete (the last field empty, e.g. DAIC's PHQ8_Moving).
    When the text ends without a newline in an empty field, the row is dropped as cut, naming the participant."""
    daic = _copy(tmp_path, "daic")
    trn = daic / "train_split_Depression_AVEC2017.csv"
    text = trn.read_text().rstrip("\n")
    trn.write_text(text[: text.rindex(",") + 1])                                  # '319,...,2,' and no newline
    c = read_corpus(daic, "daic")
    cut = [p for p in c.problems if p.path == str(trn) and "319" in p.message]
    assert cut and isinstance(cut[0], DroppedRow) and "cut" in cut[0].message
    assert c.get("319").split == UNLISTED
    trn.write_text(text[: text.rindex(",") + 1] + "\n")                           # a final empty field, whole
    assert read_corpus(daic, "daic").get("319").split == "train"


# ---------------------------------------------------------------- 6. a CMDC pickle of one number

def test_a_cmdc_pickle_of_one_number_is_named_not_an_internal_error(tmp_path):
    """A CMDC .pkl holding one number raised IndexError (internal error, exit 3); now an InputError naming it."""
    cmdc = _copy(tmp_path, "cmdc")
    pkl = cmdc / "part1" / "HC01" / "Q1.pkl"
    with open(pkl, "wb") as fh:
        pickle.dump(3.0, fh)
    with pytest.raises(InputError, match="holds a single value, not frames") as err:
        extract_workspace(_workspace(tmp_path), cmdc)
    assert str(pkl) in str(err.value)


# ---------------------------------------------------------------- 7. damaged feature tables at data check

def test_damaged_feature_tables_that_strict_extract_refuses_fail_data_check(tmp_path):
    """`data check` passed a feature table with a header but no rows, a last row ending in an empty field,
    and a NUL byte mid-file, all of which strict extract refuses. Each is now a problem naming the file."""
    from mllm_dr.features.schema import checked_corpus

    daic = _copy(tmp_path, "daic")
    for f in (daic / "320_P").glob("*_CLNF_*.txt"):
        f.write_text(f.read_text().splitlines()[0] + "\n")                       # header only
    proc = run_cli("mllmdr-site", "data", "check", daic, "--json", check=False)
    assert proc.returncode == 1, proc.stderr
    assert any(p["path"].endswith("320_CLNF_AUs.txt") and "header but no rows" in p["message"]
               for p in json.loads(proc.stdout)["problems"])

    edaic = _copy(tmp_path, "edaic")
    of = edaic / "300_P" / "features" / "300_OpenFace2.1.0_Pose_gaze_AUs.csv"
    sm = edaic / "300_P" / "features" / "300_OpenSMILE2.3.0_egemaps.csv"
    of.write_text(of.read_text().rstrip("\n").rsplit(",", 1)[0] + ",\n")         # last field empty
    raw = sm.read_bytes().splitlines(keepends=True)
    sm.write_bytes(raw[0] + raw[1][:8] + b"\0" + raw[1][8:] + b"".join(raw[2:]))  # a NUL byte mid-file
    problems = {p.path: p.message for p in checked_corpus(edaic)[1].problems}
    assert "empty field" in problems[str(of)] and "NUL byte on line 2" in problems[str(sm)]


# ---------------------------------------------------------------- 8. non-finite values counted before pooling

def test_non_finite_values_are_counted_before_pooling_and_pool_as_missing(tmp_path):
    """NaN/inf were counted after pooling: nanmean dropped a NaN inside a window unsaid, and an inf made the
    whole pooled value inf (stored as 0). Now both are counted as read and pool as missing values."""
    from mllm_dr.corpus.model import Media, Participant
    from mllm_dr.features.extract import ExtractReport, Extractor
    from mllm_dr.workspace import ExtractionSettings

    table = tmp_path / "300_OpenSMILE2.3.0_egemaps.csv"
    loud = [0.1 * (i + 1) for i in range(20)]                                     # 100 Hz -> 10 Hz: windows of 10
    cells = [f"{v:g}" for v in loud]
    cells[1], cells[3] = "nan", "inf"
    table.write_text("name;frameTime;Loudness_sma3;F0\n"
                     + "".join(f"unknown;{i / 100:.2f};{c};20.0\n" for i, c in enumerate(cells)))
    p = Participant("300", "train", {}, None, None, [], Media(audio_features=[table]), tmp_path)
    notes: list = []
    x = Extractor(ExtractionSettings(), "corpus").audio(p, notes, ExtractReport())[0]
    assert [n.message for n in notes] == ["audio: 2 of 40 feature values are not finite (NaN or infinite in the "
                                          "source) and are stored as 0"]
    kept = [v for i, v in enumerate(loud[:10]) if i not in (1, 3)]
    assert x.shape == (2, 2) and float(x[0, 0]) == pytest.approx(np.mean(kept), rel=1e-6)
    assert float(x[1, 0]) == pytest.approx(np.mean(loud[10:]), rel=1e-6)
