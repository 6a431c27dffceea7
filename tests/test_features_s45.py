"""Session 45, the feature path (a review's findings): a changed media-check verdict re-extracts, feature pickles
of an odd width are judged against most of the corpus's, truncated wavs and malformed ResNet .mat files are
named, stale feature files are deleted, the frame cap is kept, OpenFace frames without a face keep their place,
a truncated video is named."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from mllm_dr.errors import InputError
from mllm_dr.features.extract import extract_corpus
from mllm_dr.features.schema import checked_corpus
from mllm_dr.features.store import FeatureStore
from mllm_dr.synth import SynthConfig, write_synthetic
from mllm_dr.workspace import ExtractionSettings


def _site(tmp_path: Path, fmt: str = "edaic", participants: int = 4) -> Path:
    return write_synthetic(SynthConfig(tmp_path / f"syn-{fmt}", fmt, participants=participants, sites=1, seed=3,
                                       seconds=2.0))[0]


# ---------------------------------------------------------------- 1. a changed verdict is a change

def test_a_changed_column_verdict_re_extracts_though_no_file_changed(tmp_path):
    root = _site(tmp_path, participants=5)
    ids = sorted(d.name[:-2] for d in root.glob("*_P"))
    narrow = ids[-2:]                                       # these two lack AU45_c
    for pid in narrow:
        f = root / f"{pid}_P/features/{pid}_OpenFace2.1.0_Pose_gaze_AUs.csv"
        f.write_text("\n".join(", ".join(line.split(", ")[:-1]) for line in f.read_text().splitlines()) + "\n")
    store = FeatureStore(tmp_path / "store")
    c, chk = checked_corpus(root)
    assert "AU45_c" in chk.columns["openface"]
    extract_corpus(c, store, ExtractionSettings(), check=chk, strict=False)
    assert all(not store.manifest["participants"][pid]["visual"]["present"] for pid in narrow)
    for pid in [i for i in ids if i not in narrow][:2]:     # two with the wide files leave: the majority flips
        shutil.move(str(root / f"{pid}_P"), tmp_path / f"gone_{pid}_P")
    c, chk = checked_corpus(root)
    assert "AU45_c" not in chk.columns["openface"]
    report = extract_corpus(c, store, ExtractionSettings(), check=chk, strict=False)
    assert sorted(report.extracted) == sorted(p.id for p in c.participants)      # every one: the verdict changed
    dims = {store.manifest["participants"][p.id]["visual"]["dim"] for p in c.participants}
    assert len(dims) == 1 and None not in dims
    again = extract_corpus(c, store, ExtractionSettings(), check=chk, strict=False)
    assert again.extracted == [] and len(again.skipped) == len(c.participants)


# ---------------------------------------------------------------- 2. one odd feature pickle

def test_an_odd_width_pickle_is_flagged_by_the_check_and_takes_no_one_elses_audio(tmp_path):
    root = _site(tmp_path, "cmdc", participants=4)
    c, _ = checked_corpus(root)
    for i, p in enumerate(c.participants):
        for w in p.media.wav:
            with open(w.with_suffix(".pkl"), "wb") as fh:
                pickle.dump(np.random.rand(3, 64 if i == 0 else 128).astype(np.float32), fh)
    c, chk = checked_corpus(root)
    first = c.participants[0]
    assert any("64 feature columns per frame, where most of the corpus's feature pickles" in pr.message
               for pr in chk.by_participant[first.id])
    store = FeatureStore(tmp_path / "store")
    extract_corpus(c, store, ExtractionSettings(audio_source="corpus"), check=chk, strict=False)
    audio = {pid: e["audio"]["dim"] for pid, e in store.manifest["participants"].items()}
    assert all(audio[p.id] == 128 for p in c.participants[1:]) and audio[first.id] is None, audio


# ---------------------------------------------------------------- 3. a truncated wav

def test_a_truncated_wav_is_named_by_the_media_check(tmp_path):
    import soundfile as sf

    from mllm_dr.features.schema import _audio_ok

    sig = (np.random.rand(16000 * 4) - .5).astype(np.float32)
    full, cut = tmp_path / "full.wav", tmp_path / "trunc.wav"
    sf.write(str(full), sig, 16000, subtype="PCM_16")
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 4])
    probs: list = []
    assert _audio_ok(full, probs) and probs == []
    assert not _audio_ok(cut, probs)
    assert probs[0].path == str(cut)
    assert f"truncated: header declares 128000 bytes of audio, file holds {len(data) // 4 - 44}" in probs[0].message


# ---------------------------------------------------------------- 4. a malformed ResNet .mat

@pytest.mark.parametrize("value", [np.array([np.zeros((2, 3)), np.zeros((3, 3))], dtype=object), "hello"])
def test_a_malformed_resnet_mat_is_an_input_error_naming_it(tmp_path, value):
    from scipy.io import savemat

    from mllm_dr.features.schema import _mat_ok
    from mllm_dr.features.visual import read_resnet_mat

    mat = tmp_path / "300_CNN_ResNet.mat"
    savemat(str(mat), {"feature": value})
    with pytest.raises(InputError, match="not a numeric 2-D array") as err:
        read_resnet_mat(mat)
    assert str(mat) in str(err.value)
    probs: list = []
    assert not _mat_ok(mat, probs) and probs[0].path == str(mat)
    good = tmp_path / "ok.mat"
    savemat(str(good), {"feature": np.zeros((4, 2048), np.float32)})
    assert _mat_ok(good, probs) and read_resnet_mat(good)[0].shape == (4, 2048)


# ---------------------------------------------------------------- 5. stale feature files are deleted

def test_a_reset_store_deletes_the_files_of_a_withdrawn_participant(tmp_path):
    root = _site(tmp_path, participants=3)
    store = FeatureStore(tmp_path / "store")
    c, chk = checked_corpus(root)
    extract_corpus(c, store, ExtractionSettings(), check=chk, strict=True)
    gone = c.participants[-1].id
    assert (store.dir / f"{gone}.safetensors").is_file()
    (store.dir / "999.safetensors").write_bytes(b"left by a crash")           # listed by no manifest
    shutil.move(str(c.participants[-1].folder), tmp_path / "withdrawn")
    c, chk = checked_corpus(root)
    report = extract_corpus(c, store, ExtractionSettings(audio_hz=5.0), check=chk, strict=True)   # fingerprint resets
    on_disk = sorted(f.stem for f in store.dir.glob("*.safetensors"))
    assert on_disk == sorted(p.id for p in c.participants) == store.participants
    assert gone in report.removed and "999" in report.removed


# ---------------------------------------------------------------- 6. the frame cap

def test_the_frame_cap_is_kept_and_the_version_raised(tmp_path):
    from mllm_dr.corpus.model import Media, Participant
    from mllm_dr.features.extract import Extractor
    from mllm_dr.features.store import CHANGED_IN, FEATURE_VERSION

    ex = Extractor(ExtractionSettings(), "opensmile")
    p = Participant("300", "train", {}, None, None, [], Media(), tmp_path)
    for t in (9000, 6000, 4097, 12289):
        x = ex._finish([np.random.rand(t, 3).astype(np.float32)], [], p, "audio")
        assert x.shape[0] <= ex.s.max_frames, (t, x.shape)
    assert FEATURE_VERSION >= 5 and "frame cap" in CHANGED_IN[5]


def _set_success(path: Path, value: str, rows: slice = slice(None)) -> None:
    lines = path.read_text().splitlines()
    i = [h.strip() for h in lines[0].split(",")].index("success")
    body = [[v.strip() for v in line.split(",")] for line in lines[1:]]
    for cells in body[rows]:
        cells[i] = value
    path.write_text("\n".join([lines[0], *(", ".join(c) for c in body)]) + "\n")


def test_a_version_4_store_over_the_cap_or_with_lost_faces_is_extracted_again(tmp_path):
    root = _site(tmp_path, participants=2)
    tables = sorted(root.glob("*_P/features/*_OpenFace2.1.0_Pose_gaze_AUs.csv"))
    for of in tables:
        _set_success(of, "1")
    store = FeatureStore(tmp_path / "store")
    c, chk = checked_corpus(root)
    extract_corpus(c, store, ExtractionSettings(), check=chk)
    made = store.manifest["fingerprint"]

    def as_version_4(change=lambda entries: None) -> FeatureStore:
        old = FeatureStore(store.dir)
        old.manifest["fingerprint"] = made | {"version": 4}
        change(old.manifest["participants"])
        old._write_manifest()
        return FeatureStore(store.dir)

    assert as_version_4().set_fingerprint(made, root) == []            # nothing touched: upgraded in place
    assert len(FeatureStore(store.dir).participants) == 2
    over = as_version_4(lambda entries: next(iter(entries.values()))["audio"].update(frames=5000))
    assert len(over.set_fingerprint(made, root)) == 2                   # stored over the cap: extracted again
    extract_corpus(c, FeatureStore(store.dir), ExtractionSettings(), check=chk)
    _set_success(tables[0], "0", slice(0, 1))
    assert len(as_version_4().set_fingerprint(made, root)) == 2        # a face lost: extracted again


# ---------------------------------------------------------------- 7. OpenFace frames without a face

def test_openface_frames_without_a_face_keep_their_place_and_are_counted(tmp_path):
    from mllm_dr.features.audio import pool
    from mllm_dr.features.visual import read_openface

    root = _site(tmp_path, participants=1)
    src = next(root.glob("*_P/features/*_OpenFace2.1.0_Pose_gaze_AUs.csv")).read_text().splitlines()
    head = [h.strip() for h in src[0].split(",")]
    row = [v.strip() for v in src[1].split(",")]
    lines = [", ".join(head)]
    for i in range(300):        # 10 s at 30 fps; face lost for the first 5 s
        r = list(row)
        r[head.index("frame")], r[head.index("timestamp")] = str(i + 1), f"{i / 30:.4f}"
        r[head.index("success")] = "0" if i < 150 else "1"
        lines.append(", ".join(r))
    of = tmp_path / "of.csv"
    of.write_text("\n".join(lines) + "\n")
    notes: list = []
    data, _, fps = read_openface([of], notes)
    assert data.shape[0] == 300 and np.isnan(data[:150]).all() and np.isfinite(data[150:]).all()
    assert pool(data, fps, 5.0).shape[0] == 50
    assert any("150 of 300 frames without a tracked face" in n.message for n in notes)


# ---------------------------------------------------------------- 8. a truncated video

def test_a_truncated_video_is_named_and_stops_strict_extraction(tmp_path):
    cv2 = pytest.importorskip("cv2")
    from mllm_dr.features.visual import OpenCvFaceExtractor

    full, cut = tmp_path / "v.avi", tmp_path / "vt.avi"
    w = cv2.VideoWriter(str(full), cv2.VideoWriter_fourcc(*"MJPG"), 30, (160, 120))
    for _ in range(150):
        w.write(np.random.randint(0, 255, (120, 160, 3), np.uint8))
    w.release()
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    ex = OpenCvFaceExtractor()
    ex(full, 5.0)
    assert ex.last_short is None
    ex(cut, 5.0)
    assert ex.last_short and "header declares 150 frames" in ex.last_short
