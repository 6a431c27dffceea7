"""Every kind of bad input gives a problem or error naming the file; nothing half-written."""

import numpy as np
import pytest
import soundfile as sf
from conftest import cli_json, run_cli

from mllm_dr.corpus import read_corpus
from mllm_dr.errors import InputError


def messages(corpus):
    return [(p.path, p.message) for p in corpus.problems]


def test_truncated_csv(fixture_copy):
    root = fixture_copy("edaic")
    path = root / "Detailed_PHQ8_Labels.csv"
    path.write_text(path.read_text().rstrip("\n")[:-9])  # cut the last row mid-way
    c = read_corpus(root)
    assert any(p == str(path) and "fields" in m for p, m in messages(c))
    assert c.get("300").items["Sleep"] == 1  # rows before the cut are kept


def test_wrong_delimiter_transcript(fixture_copy):
    root = fixture_copy("edaic")
    path = root / "300_P" / "300_Transcript.csv"
    path.write_text("Start_Time;End_Time;Text;Confidence\n1.0;2.0;hello there;0.9\n")
    c = read_corpus(root)
    assert any(p == str(path) and "semicolon" in m for p, m in messages(c))
    assert c.get("300").turns[0].text == "hello there"


def test_non_utf8_transcript(fixture_copy):
    root = fixture_copy("daic")
    path = root / "320_P" / "320_TRANSCRIPT.csv"
    path.write_bytes("start_time\tstop_time\tspeaker\tvalue\n1\t2\tParticipant\tcaf\xe9\n".encode("latin-1"))
    c = read_corpus(root)
    assert any(p == str(path) and "not UTF-8" in m for p, m in messages(c))
    assert c.get("320").turns == []


def test_gbk_cmdc_text_is_decoded_and_reported(fixture_copy):
    root = fixture_copy("cmdc")
    path = root / "part1" / "HC01" / "Q2.txt"
    path.write_bytes("我最近睡得很好。".encode("gb18030"))
    c = read_corpus(root)
    assert any(p == str(path) and "gb18030" in m for p, m in messages(c))
    assert any("睡得很好" in t.text for t in c.get("HC01").turns)


def test_missing_files_and_empty_transcript(fixture_copy):
    root = fixture_copy("edaic")
    (root / "dev_split.csv").unlink()
    (root / "302_P" / "302_Transcript.csv").write_text("Start_Time,End_Time,Text,Confidence\n")
    c = read_corpus(root)
    msgs = messages(c)
    assert any(p.endswith("dev_split.csv") and "missing" in m for p, m in msgs)
    assert any(p.endswith("302_Transcript.csv") and "empty" in m for p, m in msgs)


def test_unknown_participant(fixture_copy):
    root = fixture_copy("edaic")
    (root / "999_P").mkdir()
    (root / "999_P" / "999_Transcript.csv").write_text("Start_Time,End_Time,Text,Confidence\n0,1,hi,0.9\n")
    c = read_corpus(root)
    assert any("999" in m and "no label file" in m for _, m in messages(c))
    assert c.get("999").split == "unlisted" and c.get("999").total is None     # session 42: not hashed into training


@pytest.mark.parametrize("cell, says", [("7", "outside 0..3"),
                                         ("1e999", "not a finite number")])   # int(inf) raised OverflowError (exit 3)
def test_bad_label_value(fixture_copy, cell, says):
    root = fixture_copy("daic")
    path = root / "dev_split_Depression_AVEC2017.csv"
    path.write_text(path.read_text().replace("320,0,4,0,0,1", f"320,0,4,0,{cell},1"))
    c = read_corpus(root)
    assert c.get("320").items["NoInterest"] is None
    assert any(p == str(path) and "NoInterest" in m and says in m for p, m in messages(c))


def test_an_empty_cmdc_workbook_is_named_not_an_internal_error(tmp_path):
    """A SubjectInfo.xlsx whose sheet has no rows: rows[0] raised IndexError (exit 3)."""
    import openpyxl

    from mllm_dr.corpus.cmdc import _read_xlsx

    path = tmp_path / "SubjectInfo.xlsx"
    openpyxl.Workbook().save(path)
    with pytest.raises(InputError, match="sheet is empty"):
        _read_xlsx(path, ("ID",))


def test_wav_resampled_and_downmixed(tmp_path):
    from mllm_dr.corpus.tables import Problem
    from mllm_dr.features.audio import load_wav

    path = tmp_path / "q.wav"
    t = np.arange(48000) / 48000
    sf.write(path, np.stack([np.sin(2 * np.pi * 200 * t)] * 2, 1).astype(np.float32), 48000)
    notes: list[Problem] = []
    x = load_wav(path, notes)
    assert x.shape == (16000,)
    assert {n.message for n in notes} == {"2 channels downmixed to mono", "resampled 48000 Hz -> 16000 Hz"}
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(InputError, match="bad.wav"):
        load_wav(tmp_path / "bad.wav", notes)


def test_extract_records_broken_modality_and_keeps_store_readable(fixture_copy, tmp_path):
    root = fixture_copy("edaic")
    of = root / "300_P" / "features" / "300_OpenFace2.1.0_Pose_gaze_AUs.csv"
    of.write_text("frame, face_id, timestamp, confidence, success, AU12_r\n1, 0, 0.0, 0.9, 1, abc\n")
    ws = tmp_path / "ws"
    run_cli("mllmdr-site", "init", "-w", ws, "--site-id", "t")
    strict = run_cli("mllmdr-site", "extract", "-w", ws, "--corpus", root, check=False)   # strict by default
    assert strict.returncode == 2 and str(of) in strict.stderr and "--no-strict" in strict.stderr
    out = cli_json("mllmdr-site", "extract", "-w", ws, "--corpus", root, "--no-strict")
    assert out["extracted"] == ["300", "302"]
    assert any(str(of) in p["path"] and "visual missing" in p["message"] for p in out["problems"])
    from mllm_dr.features.store import FeatureStore

    store = FeatureStore(ws / "features")
    f = store.get("300")
    assert f.visual is None and f.audio is not None and f.audio_source.startswith("corpus")


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import torch

    from mllm_dr import atomic
    from mllm_dr.features.store import FeatureStore, ParticipantFeatures

    store = FeatureStore(tmp_path)
    store.put(ParticipantFeatures("1", torch.ones(3, 2), None))
    real_fsync = atomic.os.fsync

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", boom)
    with pytest.raises(OSError):
        store.put(ParticipantFeatures("2", torch.ones(3, 2), None))
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.safetensors", "manifest.json"]
    assert FeatureStore(tmp_path).participants == ["1"]


def test_corrupt_feature_file_is_named(tmp_path):
    import torch

    from mllm_dr.features.store import FeatureStore, ParticipantFeatures

    store = FeatureStore(tmp_path)
    store.put(ParticipantFeatures("1", torch.ones(3, 2), None))
    with open(tmp_path / "1.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x00")
    with pytest.raises(InputError, match="1.safetensors"):
        store.get("1")


def test_untrusted_pickle_refused(tmp_path):
    import pickle

    from mllm_dr.features.audio import read_corpus_audio_features

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "Q1.pkl"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(InputError, match="refusing"):
        read_corpus_audio_features(path, [])
    good = tmp_path / "Q2.pkl"
    good.write_bytes(pickle.dumps(np.ones((4, 128), dtype=np.float32)))
    data, names, hz = read_corpus_audio_features(good, [])
    assert data.shape == (4, 128)


def test_a_feature_manifest_of_the_wrong_shape_is_named_not_a_crash(tmp_path):
    """Valid JSON that is not the manifest's table (once an AttributeError, exit 3) is bad input."""
    from mllm_dr.errors import InputError
    from mllm_dr.features.store import FeatureStore

    for text in ("[1]", '{"participants": []}', "{"):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(InputError, match="feature manifest is not valid JSON"):
            FeatureStore(tmp_path)


def test_init_sets_the_dialogue_budget_or_refuses_it_in_one_line_writing_nothing(tmp_path):
    ws = tmp_path / "ws"
    out = cli_json("mllmdr-site", "init", "-w", ws, "--site-id", "t", "--max-context-tokens", "256")
    assert out["max_context_tokens"] == 256
    from mllm_dr.workspace import Workspace
    assert Workspace(ws).config.max_context_tokens == 256

    bad = tmp_path / "bad"
    proc = run_cli("mllmdr-site", "init", "-w", bad, "--site-id", "t", "--max-context-tokens", "16", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --max-context-tokens 16: must be above 32"], proc.stderr
    assert not bad.exists()


def test_malformed_feature_cells_are_one_line_errors_naming_the_file(tmp_path):
    """A non-numeric eGeMAPS `frameTime` or OpenFace `timestamp` (read outside the numeric check), and a feature
    pickle holding a dict or ragged rows, ended `extract` in an internal error (exit 3); an OpenFace CSV in which
    no frame found a face left visual missing without a note."""
    import pickle
    from collections import OrderedDict

    from mllm_dr.features.audio import read_corpus_audio_features
    from mllm_dr.features.visual import read_openface

    egemaps = tmp_path / "300_OpenSMILE2.3.0_egemaps.csv"
    egemaps.write_text("name;frameTime;Loudness_sma3\n'unknown';x;0.1\n'unknown';0.01;0.2\n")
    face = tmp_path / "300_OpenFace2.1.0_Pose_gaze_AUs.csv"
    face.write_text("frame, timestamp, confidence, success, AU01_r\n1, t0, 0.9, 1, 0.5\n2, 0.033, 0.9, 1, 0.4\n")
    ragged = tmp_path / "Q1.pkl"
    ragged.write_bytes(pickle.dumps([[1.0, 2.0], [3.0]]))
    odd = tmp_path / "Q2.pkl"
    odd.write_bytes(pickle.dumps(OrderedDict(a=1.0)))
    for read, path, words in ((read_corpus_audio_features, egemaps, "non-numeric feature value"),
                              (lambda p, pr: read_openface([p], pr), face, "non-numeric OpenFace value"),
                              (read_corpus_audio_features, ragged, "does not hold one numeric array"),
                              (read_corpus_audio_features, odd, "does not hold one numeric array")):
        with pytest.raises(InputError, match=words) as err:
            read(path, [])
        assert err.value.path == path or str(path) in str(err.value)
    face.write_text("frame, timestamp, confidence, success, AU01_r\n1, 0.0, 0.1, 0, 0.5\n2, 0.033, 0.1, 0, 0.4\n")
    problems = []
    data, _, _ = read_openface([face], problems)
    assert data.shape[0] == 0 and [p.message for p in problems] == [
        "OpenFace tracked no face in any of its 2 frames (success = 0): no visual features from it"]


@pytest.mark.parametrize("text,words", [('{"items": ["Q1"]}', "each item must map to a list"),
                                        ('{"items": {"Sleep": "Q1"}}', "each item must map to a list"),
                                        ('["Q1"]', "not a question map"),
                                        (b"\xff\xfe{", "not UTF-8")])
def test_a_question_map_of_the_wrong_shape_is_named(tmp_path, text, words):
    """An edited CMDC question map whose items are a list, whose values are strings (list("Q1") read as
    questions 'Q' and '1', silently matching nothing), or that is not UTF-8 was an internal error or worse."""
    from mllm_dr.aspects import load_question_map

    path = tmp_path / "question_map.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError, match=words) as err:
        load_question_map(path)
    assert str(path) in str(err.value)


def test_daic_clnf_files_are_joined_by_frame_number_not_by_row(tmp_path):
    """DAIC ships a segment's OpenFace output as three CLNF files joined column-wise. A malformed row dropped
    from one of them (reported) shifted every later frame of that file against the others' (the note said only
    'cut to n frames'): gaze of frame 3 beside the AUs of frame 2. They are now joined on the frame number."""
    from mllm_dr.features.visual import read_openface

    head = "frame, timestamp, confidence, success"
    aus, gaze = tmp_path / "319_CLNF_AUs.txt", tmp_path / "319_CLNF_gaze.txt"
    aus.write_text(f"{head}, AU01_r\n" + "".join(f"{f}, {f / 30:.3f}, 0.9, 1, {f}.0\n" for f in range(1, 6)))
    gaze.write_text(f"{head}, x_0\n" + "".join(f"{f}, {f / 30:.3f}, 0.9, 1, {10 * f}.0\n" for f in range(1, 6)
                                               if f != 2) + "2, 0.067, 0.9\n")   # frame 2's row malformed
    problems = []
    data, names, _ = read_openface([aus, gaze], problems)
    au, x = names.index("AU01_r"), names.index("gaze_0_x")     # CLNF's x_0 under OpenFace 2's name (session 42)
    assert data[:, au].tolist() == [1.0, 3.0, 4.0, 5.0] and data[:, x].tolist() == [10.0, 30.0, 40.0, 50.0]
    assert any("joined on the 4 frame numbers" in p.message for p in problems)
