"""Features are never stale or silently degraded; one writer per workspace; `data check` is a gate."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
import soundfile as sf
from conftest import BIN, FIXTURES, cli_json, run_cli

from mllm_dr.errors import InputError
from mllm_dr.features.extract import extract_workspace
from mllm_dr.features.store import FeatureStore
from mllm_dr.synth import SynthConfig, write_synthetic
from mllm_dr.workspace import Workspace, read_jsonl


@pytest.fixture
def corpora(tmp_path):
    """Two small synthetic E-DAIC sites with the same participant ids and different recordings."""
    a = write_synthetic(SynthConfig(tmp_path / "a", "edaic", participants=4, sites=1, seed=1, seconds=1.0))[0]
    b = write_synthetic(SynthConfig(tmp_path / "b", "edaic", participants=4, sites=1, seed=2, seconds=2.0))[0]
    return a, b


def openface(site, pid):
    return site / f"{pid}_P" / "features" / f"{pid}_OpenFace2.1.0_Pose_gaze_AUs.csv"


def drop_column(path, column):
    lines = path.read_text().splitlines()
    header = [h.strip() for h in lines[0].split(",")]
    k = header.index(column)
    path.write_text("\n".join(", ".join(c for i, c in enumerate(line.split(",")) if i != k) for line in lines) + "\n")


def test_a_changed_source_file_is_extracted_again(tmp_path, corpora):
    a, _ = corpora
    ws = Workspace.init(tmp_path / "ws", "s")
    first = extract_workspace(ws, a)
    assert sorted(first["extracted"]) == ["300", "301", "302", "600"]
    frames = FeatureStore(ws.features_dir).manifest["participants"]["301"]["visual"]["frames"]
    (openface(a, "301")).touch()                                  # same bytes, new mtime: still current
    assert extract_workspace(ws, a)["extracted"] == []
    of = openface(a, "301")
    lines = of.read_text().splitlines()
    of.write_text("\n".join(lines + lines[1:]) + "\n")            # twice the frames
    again = extract_workspace(ws, a)
    assert again["extracted"] == ["301"] and sorted(again["skipped"]) == ["300", "302", "600"]
    assert FeatureStore(ws.features_dir).manifest["participants"]["301"]["visual"]["frames"] > frames


def test_another_corpus_needs_replace_corpus_and_marks_adapters_stale(tmp_path, corpora):
    from mllm_dr.workspace import stale_note

    a, b = corpora
    ws = Workspace.init(tmp_path / "ws", "s")
    extract_workspace(ws, a)
    adapters = ws.checkpoints_dir / "local" / "latest"
    adapters.mkdir(parents=True)
    (adapters / "adapter_meta.json").write_text("{}")
    ws.rationales_path.write_text('{"participant": "300", "item": "Sleep", "rationale": "old"}\n')
    with pytest.raises(InputError, match="--replace-corpus"):
        extract_workspace(ws, b)
    assert Workspace(ws.root).config.corpus_path == str(a.resolve())      # nothing changed
    assert stale_note(adapters) is None
    out = extract_workspace(ws, b, replace_corpus=True)
    assert sorted(out["extracted"]) == ["300", "301", "302", "600"]       # nothing kept from corpus a
    assert Workspace(ws.root).config.corpus_path == str(b.resolve())
    assert "train again" in stale_note(adapters)
    assert not ws.rationales_path.exists() and list(ws.rationales_dir.glob("replaced-corpus-*/rationales.jsonl"))
    store = FeatureStore(ws.features_dir)
    assert all(k.startswith("300_P/") for k in store.manifest["participants"]["300"]["sources"])
    assert store.manifest["participants"]["300"]["audio"]["frames"] == 20                  # 2 s at 10 Hz (a: 1 s)
    events = [json.loads(x) for x in (ws.audit_path).read_text().splitlines()]
    assert any(e["event"] == "replace-corpus" and e["old"] == str(a.resolve()) for e in events)


def test_a_participant_that_left_the_corpus_leaves_the_store(tmp_path, corpora):
    import shutil

    a, _ = corpora
    ws = Workspace.init(tmp_path / "ws", "s")
    extract_workspace(ws, a)
    shutil.rmtree(a / "302_P")
    out = extract_workspace(ws, a)
    assert out["removed"] == ["302"] and "302" not in FeatureStore(ws.features_dir).participants


def test_second_writer_is_refused_naming_the_holder(tmp_path, corpora):
    a, _ = corpora
    ws = Workspace.init(tmp_path / "ws", "s")
    with ws.lock("train"):
        proc = run_cli("mllmdr-site", "extract", "-w", ws.root, "--corpus", a, check=False)
    assert proc.returncode == 2
    assert "in use by 'mllmdr-site train'" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert FeatureStore(ws.features_dir).participants == []


def test_concurrent_extracts_of_two_corpora_never_mix(tmp_path, corpora):
    a, b = corpora
    ws = Workspace.init(tmp_path / "ws", "s")
    procs = [subprocess.Popen([str(BIN / "mllmdr-site"), "extract", "-w", str(ws.root), "--corpus", str(c),
                               "--replace-corpus", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (a, b)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert any(rc == 0 for rc, _ in results), results
    assert all(rc == 0 or (rc == 2 and "in use by" in err) for rc, err in results), results
    ws = Workspace(ws.root)
    from mllm_dr.corpus import read_corpus
    from mllm_dr.features.store import describe_sources

    corpus = read_corpus(ws.config.corpus_path)
    store = FeatureStore(ws.features_dir)
    assert store.participants == sorted(p.id for p in corpus.participants)
    for pid, entry in store.manifest["participants"].items():   # every stored file was made from this corpus
        now = describe_sources(corpus.root, [corpus.root / rel for rel in entry["sources"]])
        assert entry["sources"] and {k: v["sha256"] for k, v in now.items()} == \
            {k: v["sha256"] for k, v in entry["sources"].items()}, pid


def test_openface_without_a_column_is_a_named_problem_never_shifted(tmp_path, corpora):
    a, _ = corpora
    drop_column(openface(a, "301"), "AU12_r")
    proc = run_cli("mllmdr-site", "data", "check", a, "--json", check=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert [p for p in report["participants"] if p["id"] == "301"][0]["modalities"]["visual"] is False
    assert any(pr["path"] == str(openface(a, "301")) and "AU12_r" in pr["message"] for pr in report["problems"])
    ws = Workspace.init(tmp_path / "ws", "s")
    with pytest.raises(InputError, match="AU12_r"):
        extract_workspace(ws, a)                                   # strict by default: nothing extracted
    assert FeatureStore(ws.features_dir).participants == []
    extract_workspace(ws, a, strict=False)
    m = FeatureStore(ws.features_dir).manifest["participants"]
    assert m["301"]["visual"]["present"] is False and any("AU12_r" in n for n in m["301"]["notes"])
    assert {m[p]["visual"]["dim"] for p in ("300", "302", "600")} == {49}


def test_a_corpus_wide_column_change_is_taken_and_an_odd_one_out_is_not(tmp_path, corpora):
    from mllm_dr.features.extract import _differs
    from mllm_dr.features.store import ParticipantFeatures

    a, _ = corpora
    ws = Workspace.init(tmp_path / "ws", "s")
    extract_workspace(ws, a)
    for pid in ("300", "301", "302", "600"):          # a new OpenFace export for everyone: one schema again
        drop_column(openface(a, pid), "AU12_r")
    out = extract_workspace(ws, a)
    assert len(out["extracted"]) == 4 and FeatureStore(ws.features_dir).dims()["visual"] == 48
    store = FeatureStore(tmp_path / "store")          # the backstop for tables the schema check cannot read
    import torch

    store.put(ParticipantFeatures("1", None, torch.ones(2, 2), visual_names=["x", "y"]))
    assert _differs(store, "visual", {"1"}, ["x", "z"]) and not _differs(store, "visual", {"1"}, ["x", "y"])
    assert not _differs(store, "visual", set(), ["x", "z"])


def test_unreadable_and_empty_wavs_are_reported_and_stop_strict_extract(tmp_path, corpora):
    a, _ = corpora
    text_wav, empty_wav = a / "300_P" / "300_AUDIO.wav", a / "301_P" / "301_AUDIO.wav"
    text_wav.write_text("this is not audio\n")
    empty_wav.write_bytes(b"")
    proc = run_cli("mllmdr-site", "data", "check", a, "--json", check=False)
    assert proc.returncode == 1
    problems = {pr["path"]: pr["message"] for pr in json.loads(proc.stdout)["problems"]}
    assert "not readable as audio" in problems[str(text_wav)] and "0 bytes" in problems[str(empty_wav)]
    ws = Workspace.init(tmp_path / "ws", "s")
    with pytest.raises(InputError, match="media problem"):
        extract_workspace(ws, a)


def test_a_mistyped_hubert_path_is_an_error(tmp_path, corpora):
    a, _ = corpora
    run_cli("mllmdr-site", "init", "-w", tmp_path / "ws", "--site-id", "s")
    proc = run_cli("mllmdr-site", "extract", "-w", tmp_path / "ws", "--corpus", a, "--hubert", "/nonexistent",
                   check=False)
    assert proc.returncode == 2 and "/nonexistent: does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_synth_refuses_a_folder_with_someone_elses_files(tmp_path):
    out = tmp_path / "out"
    (out / "site1").mkdir(parents=True)
    (out / "site1" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a synthetic site"):
        write_synthetic(SynthConfig(out, "edaic", participants=2, sites=1, seconds=0.5))
    assert (out / "site1" / "notes.txt").read_text() == "mine"
    kit = tmp_path / "kit"
    write_synthetic(SynthConfig(kit, "edaic", participants=2, sites=1, seconds=0.5))
    write_synthetic(SynthConfig(kit, "edaic", participants=2, sites=1, seconds=0.5, seed=3))   # its own sites: fine


def test_data_check_exit_codes(tmp_path, corpora):
    a, _ = corpora
    assert run_cli("mllmdr-site", "data", "check", a, check=False).returncode == 0
    parent = run_cli("mllmdr-site", "data", "check", a.parent, check=False)
    assert parent.returncode == 2 and "site1" in parent.stderr and "not itself a corpus" in parent.stderr
    missing = run_cli("mllmdr-site", "data", "check", tmp_path / "nope", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    labels = a / "Detailed_PHQ8_Labels.csv"
    rows = labels.read_text().splitlines()
    labels.write_text("\n".join(rows[:2]) + "\n" + rows[2][:5])   # truncated mid-row: 3 of 4 participants lost
    proc = run_cli("mllmdr-site", "data", "check", a, "--json", check=False)
    assert proc.returncode == 1
    named = [pr["message"] for pr in json.loads(proc.stdout)["problems"] if "has no row" in pr["message"]]
    assert sorted(m.split()[1] for m in named) == ["301", "302", "600"]
    assert "Exit status" in run_cli("mllmdr-site", "data", "check", "--help").stdout


def test_operator_os_errors_are_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_cli("mllmdr-site", "init", "-w", afile / "ws", "--site-id", "s", check=False)
    assert proc.returncode == 2 and str(afile) in proc.stderr and "is a file, not a folder" in proc.stderr
    assert "internal error" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    from mllm_dr.errors import operator_os_error

    for code, words in ((13, "permission denied"), (30, "read-only"), (28, "no space left")):
        err = operator_os_error(OSError(code, os.strerror(code), "/srv/mllmdr/features/x.safetensors"))
        assert str(err).startswith("/srv/mllmdr/features/x.safetensors: ") and words in str(err)
    assert operator_os_error(OSError(111, "Connection refused")) is None      # not the operator's: a bug report


@pytest.mark.parametrize("exc, rc, words", [(PermissionError(13, "Permission denied", "/data/x"), 2, "/data/x: permission"),
                                             (KeyboardInterrupt(), 130, "interrupted; completed work is kept")])
def test_run_app_turns_os_errors_and_ctrl_c_into_one_line(monkeypatch, capsys, exc, rc, words):
    """The real site CLI: extract raising mid-way (Typer swallowed Ctrl-C before)."""
    import mllm_dr.features.extract as ex
    from cli.site import main

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(ex, "extract_workspace", boom)
    monkeypatch.setattr(sys, "argv", ["mllmdr-site", "extract", "-w", "/tmp", "--corpus", "/tmp"])
    monkeypatch.setattr("mllm_dr.workspace.resolve_workspace", lambda w: None)
    with pytest.raises(SystemExit) as out:
        main()
    assert out.value.code == rc
    assert words in capsys.readouterr().err.replace("\n", " ")


def test_both_clis_answer_version():
    from mllm_dr import __version__

    for tool in ("mllmdr-site", "mllmdr-center"):
        assert run_cli(tool, "--version").stdout.strip() == __version__
        assert cli_json(tool, "version") == {"version": __version__}      # mllmdr-site had no `version`


def test_wav_with_no_samples(tmp_path):
    from mllm_dr.corpus.tables import Problem
    from mllm_dr.features.schema import _audio_ok

    path = tmp_path / "q.wav"
    sf.write(path, np.zeros((0,), dtype=np.float32), 16000)
    probs: list[Problem] = []
    assert _audio_ok(path, probs) is False and "no samples" in probs[0].message


def test_teacher_rationales_written_for_another_quote_label_or_dialogue_are_not_trained_on_and_are_asked_again(
        tmp_path, corpora):
    """A selector change (session 25: one quote per turn) moves some items' quote; a teacher
    rationale written for the old quote may cite another item's answer. It is used only while its
    recorded quote is the instance's current one; `rationales` asks the teacher again for the rest.
    Session 40: the same for a corrected label (the answer was validated against the old score) and a
    corrected transcript (it may quote words no longer said), which the quote alone let through; and a
    final reject settles its item only while it answered the same quote, label and dialogue."""
    from mllm_dr.dataset import examples, fallback_rationale, labelled_training_instances, teacher_rationales
    from mllm_dr.parsing import format_answer
    from mllm_dr.rationales import run_rationales

    a, _ = corpora
    ws = Workspace.init(tmp_path / "ws", "s")
    extract_workspace(ws, a)
    insts = labelled_training_instances(ws)
    fresh, moved, unknown = insts[0], insts[1], insts[2]
    relabelled, retold, rejected, settled = insts[3], insts[4], insts[5], insts[6]
    digest = hashlib.sha256(retold.dialogue.encode()).hexdigest()
    records = [{"participant": fresh.participant, "item": fresh.item, "rationale": "kept reason", "evidence": fresh.evidence,
                "label": fresh.label},                                           # before session 40: no dialogue hash
               {"participant": moved.participant, "item": moved.item, "rationale": "moved", "evidence": "another turn",
                "label": moved.label},
               {"participant": unknown.participant, "item": unknown.item, "rationale": "unknown"},  # before session 25
               {"participant": relabelled.participant, "item": relabelled.item, "rationale": "old score",
                "evidence": relabelled.evidence, "label": (relabelled.label + 1) % 4},
               {"participant": retold.participant, "item": retold.item, "rationale": "old words",
                "evidence": retold.evidence, "label": retold.label, "dialogue_sha256": "0" * 64}]
    ws.rationales_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rejects = [{"participant": i.participant, "item": i.item, "label": label, "evidence": i.evidence,
                "dialogue_sha256": hashlib.sha256(i.dialogue.encode()).hexdigest(), "attempt": 1, "final": True,
                "why": "w", "text": "t"} for i, label in ((rejected, (rejected.label + 1) % 4), (settled, settled.label))]
    ws.rejects_path.write_text("".join(json.dumps(r) + "\n" for r in rejects))
    assert digest != "0" * 64
    current, stale = teacher_rationales(ws, insts)
    assert current == {(fresh.participant, fresh.item): "kept reason"} and stale == 4
    answers = {(e.instance.participant, e.instance.item): e.answer for e in examples(ws, insts[:3], 2)}
    assert answers[(fresh.participant, fresh.item)] == format_answer(fresh.label, "kept reason")
    assert answers[(moved.participant, moved.item)] == format_answer(moved.label, fallback_rationale(moved))
    # the federated path trains on the same examples(): its operator is told before the SuperNode
    # starts (this workspace is not enrolled, so the start is then refused) and by `status`
    fed = run_cli("mllmdr-site", "train", "--federated", "--workspace", ws.root, "--json", check=False)
    assert fed.returncode == 2 and "not enrolled" in fed.stderr and fed.stdout == ""
    assert "4 teacher rationales were written for another quote, label or dialogue" in " ".join(fed.stderr.split())
    assert cli_json("mllmdr-site", "status", "--workspace", ws.root)["stale_teacher_rationales"] == 4
    a.rename(a.with_name("moved"))               # a moved corpus: status still answers, and says why it could not count
    st = cli_json("mllmdr-site", "status", "--workspace", ws.root)
    a.with_name("moved").rename(a)
    assert st["stale_teacher_rationales"] is None and str(a) in st["stale_teacher_rationales_not_checked"]
    local = run_cli("mllmdr-site", "train", "--local", "--zero-shot", "--workspace", ws.root, "--json")
    assert json.loads(local.stdout)["stale_teacher_rationales"] == 4 and "4 teacher rationales" in local.stderr

    class Teacher:                     # an endpoint that answers every instance with its label, from its dialogue
        name = "stub"

        def __init__(self):
            self.asked = []

        def answer(self, instances, attempt):
            self.asked += [(i.participant, i.item) for i in instances]
            return [f"Evaluation Result: {i.label}\nEvaluation Reason: {' '.join(i.dialogue.split()[-6:])} supports it."
                    for i in instances]

    teacher = Teacher()
    summary = run_rationales(ws, teacher, retries=0)
    assert summary["stale_asked_again"] == 4 and (fresh.participant, fresh.item) not in teacher.asked
    assert (settled.participant, settled.item) not in teacher.asked          # its final reject answered today's item
    assert {(i.participant, i.item) for i in (moved, unknown, relabelled, retold, rejected)} <= set(teacher.asked)
    assert teacher_rationales(ws, insts)[1] == 0
    new = {(r["participant"], r["item"]): r for r in read_jsonl(ws.rationales_path)}[(retold.participant, retold.item)]
    assert new["label"] == retold.label and new["dialogue_sha256"] == digest and new["evidence"] == retold.evidence


def test_missing_or_damaged_features_stop_scoring_and_training_named_never_text_only(site_ws):
    """A participant the store lacks (an interrupted extract) or whose file no longer matches its hash used to
    get zero audio and video without a word: a text-only score that looked like any other. Now it stops,
    naming the file; a modality the interview lacks stays a zero frame. An emptied store (an extract that
    failed after changing the recipe, a deleted features/ folder) made the whole site text-only without a word;
    now it stops unless the interviews have no audio or video at all (a text-only site scores from text).
    Features made by an older extractor (session 39 joined DAIC's CLNF files on frame number; a store made
    before kept the row join and was trained and scored on without a word) stop too, until extract runs,
    when the change touched them (a store without CLNF sources is upgraded in place)."""
    from mllm_dr.dataset import examples, instances_by_split
    from mllm_dr.workspace import Workspace

    insts = instances_by_split(site_ws, ("test",))[:1]
    assert examples(site_ws, insts, 2, with_answers=False)[0].features["audio"] is not None
    store = FeatureStore(site_ws.features_dir)
    made = store.manifest["fingerprint"]
    assert made["version"] >= 3                         # 3: the CLNF frame join (session 39)
    entries = json.loads(json.dumps(store.manifest["participants"]))
    try:
        # a version-2 store none of whose sources is a DAIC CLNF file holds what version 3 makes: used as is,
        # and `extract` raises its version in place (no participant extracted again)
        store.manifest["fingerprint"] = made | {"version": 2}
        store._write_manifest()
        assert examples(site_ws, insts, 2, with_answers=False)[0].features["audio"] is not None
        upgraded = FeatureStore(site_ws.features_dir)
        upgraded.set_fingerprint(made)
        assert upgraded.manifest["participants"] == entries and FeatureStore(site_ws.features_dir).manifest[
            "fingerprint"] == made
        # one whose sources include a CLNF file was joined by row: refused until extract runs again
        store.manifest["fingerprint"] = made | {"version": 2}
        store.manifest["participants"][insts[0].participant]["sources"]["x/300_CLNF_AUs.txt"] = {"size": 1}
        store._write_manifest()
        with pytest.raises(InputError, match="made by extractor version 2, this kit's is .*CLNF files are now joined "
                                             "on frame number.*run 'mllmdr-site extract") as err:
            examples(site_ws, insts, 2, with_answers=False)
        assert str(store.manifest_path) in str(err.value)
        wiped = FeatureStore(site_ws.features_dir)
        wiped.set_fingerprint(made)                      # what extract does: every participant again
        assert wiped.manifest["participants"] == {}
    finally:
        store.manifest["fingerprint"], store.manifest["participants"] = made, entries
        store._write_manifest()
    # a source file replaced after extract (a re-exported OpenFace CSV): its features were of other bytes
    source = Path(site_ws.config.corpus_path) / next(iter(store.manifest["participants"][insts[0].participant]
                                                          ["sources"]))
    kept = source.read_bytes()
    try:
        source.write_bytes(kept)                                   # touched, same bytes: still current
        assert examples(site_ws, insts, 2, with_answers=False)[0].features["audio"] is not None
        source.write_bytes(kept[:-4] + b"0000")
        with pytest.raises(InputError, match="source file\\(s\\) changed, went away or came since its features"):
            examples(site_ws, insts, 2, with_answers=False)
    finally:
        source.write_bytes(kept)                                   # the corpus is shared by other tests
    path = site_ws.features_dir / store.manifest["participants"][insts[0].participant]["file"]
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(InputError, match="does not match its manifest hash") as err:
        examples(site_ws, insts, 2, with_answers=False)
    assert str(path) in str(err.value)
    del store.manifest["participants"][insts[0].participant]
    store._write_manifest()
    with pytest.raises(InputError, match=f"participant {insts[0].participant} has no features"):
        examples(site_ws, insts, 2, with_answers=False)
    store.manifest["participants"].clear()
    store._write_manifest()
    with pytest.raises(InputError, match=r"no features are stored, but \d+ participant\(s\) have audio or video"):
        examples(site_ws, insts, 2, with_answers=False)
    text_only = Workspace.init(site_ws.root.parent / "text-only", "site9")     # E-DAIC 302: a transcript only
    text_only.config.corpus_path, text_only.config.corpus_format = str(FIXTURES / "edaic"), "edaic"
    text_only.save()
    insts = instances_by_split(text_only, ("test",))
    assert {i.participant for i in insts} == {"302"}
    assert examples(text_only, insts, 2, with_answers=False)[0].features == {"audio": None, "visual": None}


def test_local_adapters_refuse_features_extracted_again_at_other_widths(site_ws):
    """Adapters trained on 25-wide audio, the store re-extracted at another width (e.g. --hubert): scoring
    used to end in a shape RuntimeError, reported as an internal error (exit 3); now one named line."""
    from mllm_dr.adapters import build_site_model, save_adapters
    from mllm_dr.base_model import load_base
    from mllm_dr.config import ModelConfig
    from mllm_dr.local_run import load_trained, run_dir

    store = FeatureStore(site_ws.features_dir)
    base, tok, info = load_base("tiny-random", "cpu")
    save_adapters(build_site_model(base, tok, info, store.dims(), ModelConfig()), run_dir(site_ws) / "latest")
    assert load_trained(site_ws).processor.dims == {m: d for m, d in store.dims().items() if d}
    for entry in store.manifest["participants"].values():
        entry["audio"]["dim"] = 768
    store._write_manifest()
    with pytest.raises(InputError, match="these adapters read feature widths .*'audio': 25.*'audio': 768"):
        load_trained(site_ws)


def test_a_session_folder_linked_elsewhere_is_described_not_an_internal_error(tmp_path):
    """Hospitals keep sessions on shares: `E-DAIC/300_P` a symlink to a NAS folder. Source paths were
    resolved before being made relative to the corpus root, so a linked folder fell outside it (ValueError,
    `extract` ended in an internal error, exit 3). They are now named as the corpus names them."""
    from mllm_dr.features.store import describe_sources

    share, corpus = tmp_path / "nas" / "300_P", tmp_path / "corpus"
    share.mkdir(parents=True)
    corpus.mkdir()
    (share / "300_AUDIO.wav").write_bytes(b"RIFF0000")
    (corpus / "300_P").symlink_to(share, target_is_directory=True)
    described = describe_sources(corpus, [corpus / "300_P" / "300_AUDIO.wav"])
    assert list(described) == ["300_P/300_AUDIO.wav"] and described["300_P/300_AUDIO.wav"]["size"] == 8


def test_non_finite_feature_values_are_stored_as_zero_and_said(tmp_path):
    """NaN or infinite values in a feature table were turned into 0 before storing with no note (and the
    manifest's "finite" flag was then always true): a damaged table trained silently. Now the participant's
    extraction notes (report, manifest) count them."""
    import numpy as np

    from mllm_dr.corpus.model import Media, Participant
    from mllm_dr.features.extract import ExtractionSettings, Extractor

    ex = Extractor(ExtractionSettings(max_frames=4), "corpus")
    p = Participant("300", "train", {}, None, None, [], Media(), tmp_path / "300_P")
    clean = np.ones((8, 3))
    damaged = clean.copy()
    damaged[1, 2], damaged[5, 0] = np.nan, np.inf
    notes = []
    assert ex._finish([clean], notes, p, "audio") is not None and notes == []
    x = ex._finish([damaged], notes, p, "visual")
    assert [n.message for n in notes] == ["visual: 2 of 24 feature values are not finite (NaN or infinite in the "
                                          "source) and are stored as 0"] and notes[0].path == str(p.folder)
    assert x.shape == (4, 3) and bool(torch.isfinite(x).all()) and float(x[2, 0]) == 1.0   # inf missing (s44; was 0)
    assert float(x[0, 2]) == 1.0          # pooling averages the finite frames (a NaN or inf counts as missing)


def test_one_missing_shipped_audio_table_switching_the_corpus_to_opensmile_is_said(tmp_path):
    """One audio source serves the whole corpus (one width): with one participant's shipped eGeMAPS table
    gone (or left out by --no-strict), every participant's audio silently came from openSMILE on the wav,
    the other shipped tables unused. The switch is now a problem of the extraction report, naming one."""
    from mllm_dr.corpus import read_corpus
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.synth import SynthConfig, write_synthetic
    from mllm_dr.workspace import ExtractionSettings

    root = write_synthetic(SynthConfig(tmp_path / "synth", "edaic", participants=3, sites=1, seed=2, seconds=1.0,
                                       audio_tables=True))[0]
    table = next(root.glob("*_P/features/*_egemaps.csv"))
    whole = extract_corpus(read_corpus(root), FeatureStore(tmp_path / "f1"), ExtractionSettings())
    assert not any("openSMILE on the wav" in p.message for p in whole.problems)
    table.unlink()
    report = extract_corpus(read_corpus(root), FeatureStore(tmp_path / "f2"), ExtractionSettings())
    said = [p.message for p in report.problems if "openSMILE on the wav" in p.message]
    assert len(said) == 1 and f"participant {table.parent.parent.name[:-2]}" in said[0] and "2 shipped" in said[0]


def test_a_participant_without_a_transcript_is_never_trained_or_scored_from_an_empty_dialogue(tmp_path, corpora):
    """Session 41 (a site-path review): a missing or unreadable transcript left its participant labelled with
    an empty dialogue; the problem was listed by `data check` only, and training learned 'Score: N' from no
    words, `score` gave a clinician a PHQ total for a blank interview. Now building that participant's
    instances (train, evaluate, score) stops, naming the transcript."""
    from mllm_dr.dataset import instances_by_split

    ws = Workspace.init(tmp_path / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(corpora[0]), "edaic"
    ws.save()
    every = ("train", "dev", "test")
    assert {i.participant for i in instances_by_split(ws, every)} == {"300", "301", "302", "600"}
    (corpora[0] / "301_P" / "301_Transcript.csv").unlink()
    with pytest.raises(InputError, match="participant 301 has no interview text") as err:
        instances_by_split(ws, every)
    assert Path(err.value.path).name == "301_Transcript.csv" and "missing" in str(err.value)
    assert {i.participant for i in instances_by_split(ws, every, participant="300")} == {"300"}   # others still score
    (corpora[0] / "301_P" / "301_Transcript.csv").write_text("start_time,stop_time,Text\n")   # no turns at all
    with pytest.raises(InputError, match="participant 301 has no interview text"):
        instances_by_split(ws, every)


def test_a_recording_copied_in_after_extraction_stops_training_until_extract_runs(tmp_path, corpora):
    """Session 41 (a site-path review): only the files a participant's features were made from were checked
    again, so a wav copied in after extraction (it was missing, or dropped) left the participant training and
    scoring without audio, without a word. Now the files an extraction would read today are compared too."""
    import shutil

    from mllm_dr.dataset import examples, instances_by_split

    a, _ = corpora
    wav = a / "301_P" / "301_AUDIO.wav"
    kept = tmp_path / "kept.wav"
    shutil.move(wav, kept)                                       # extracted while the wav was not there
    ws = Workspace.init(tmp_path / "ws", "s")
    extract_workspace(ws, a)
    insts = [i for i in instances_by_split(ws, ("train", "dev", "test")) if i.participant == "301"][:1]
    assert examples(ws, insts, 2, with_answers=False)[0].features["audio"] is None     # as extracted: no audio
    shutil.copy(kept, wav)                                       # the recording turns up
    with pytest.raises(InputError, match="came since its features were extracted") as err:
        examples(ws, insts, 2, with_answers=False)
    assert "301_AUDIO.wav" in str(err.value)
    assert extract_workspace(ws, a)["extracted"] == ["301"]
    assert examples(ws, insts, 2, with_answers=False)[0].features["audio"] is not None
    # a file the media check left out (extract --no-strict) is known, not taken for one that came since (a
    # read of this change found every such participant blocked for good); replaced by a good one, it is
    wav.write_bytes(b"")
    assert extract_workspace(ws, a, strict=False)["extracted"] == ["301"]
    assert examples(ws, insts, 2, with_answers=False)[0].features["audio"] is None
    assert extract_workspace(ws, a, strict=False)["extracted"] == []                # current: skipped
    shutil.copy(kept, wav)
    with pytest.raises(InputError, match="came since its features were extracted|changed"):
        examples(ws, insts, 2, with_answers=False)
