"""data check --json on hand-written corpora in the three layouts, with their quirks."""

import json

import numpy as np
import pytest
from conftest import FIXTURES, run_cli


def by_id(report):
    return {p["id"]: p for p in report["participants"]}


def check_json(path, *args, rc: int):
    """``data check --json``: the report is complete whatever the exit status (0 clean, 1 problems)."""
    proc = run_cli("mllmdr-site", "data", "check", path, *args, "--json", check=False)
    assert proc.returncode == rc, proc.stderr
    return json.loads(proc.stdout)


def test_edaic_fixture():
    rep = check_json(FIXTURES / "edaic", rc=1)   # the fixture lacks session 301: a problem
    assert rep["format"] == "edaic"
    ps = by_id(rep)
    assert set(ps) == {"300", "302"}
    p = ps["300"]
    assert p["split"] == "train" and p["total"] == 2 and p["binary"] == 0
    assert p["items"]["Sleep"] == 1 and p["items"]["Tired"] == 1 and "SelfHarm" not in p["items"]
    assert p["modalities"] == {"text": True, "audio": True, "visual": True}
    assert p["turns"] == 3
    q = ps["302"]
    assert q["split"] == "test" and q["total"] == 15 and q["binary"] == 1
    assert all(v is None for v in q["items"].values())
    assert q["modalities"] == {"text": True, "audio": False, "visual": False}
    assert any("301" in pr["message"] and "absent" in pr["message"] for pr in rep["problems"])


def test_daic_fixture():
    rep = check_json(FIXTURES / "daic", "--format", "daic", rc=0)   # no problems: exit 0
    ps = by_id(rep)
    assert rep["format"] == "daic" and set(ps) == {"319", "320", "400"}
    assert ps["319"]["items"]["Sleep"] is None and ps["319"]["items"]["Tired"] == 3
    assert ps["319"]["total"] == 13 and ps["319"]["binary"] == 1 and ps["319"]["turns"] == 3
    assert ps["320"]["split"] == "dev" and ps["320"]["modalities"]["visual"] is True
    assert ps["400"]["split"] == "test" and ps["400"]["total"] == 11 and ps["400"]["binary"] == 1
    assert all(v is None for v in ps["400"]["items"].values())


def test_cmdc_fixture():
    rep = check_json(FIXTURES / "cmdc", rc=1)
    ps = by_id(rep)
    assert rep["format"] == "cmdc" and set(ps) == {"HC01", "MDD01"}
    assert ps["HC01"]["split"] is None and ps["HC01"]["items"]["SelfHarm"] == 0 and ps["HC01"]["total"] == 1
    assert ps["MDD01"]["total"] == 21 and ps["MDD01"]["binary"] == 1 and ps["MDD01"]["turns"] == 3
    assert ps["MDD01"]["modalities"]["visual"] is False and ps["HC01"]["modalities"]["visual"] is True
    assert any("HC02" in pr["message"] for pr in rep["problems"])


def test_not_a_corpus(tmp_path):
    proc = run_cli("mllmdr-site", "data", "check", tmp_path, check=False)
    assert proc.returncode == 2
    assert str(tmp_path) in proc.stderr and "not an E-DAIC-WOZ" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def test_synthetic_round_trip(synth_site):
    from mllm_dr.corpus import read_corpus
    import json

    sites = [read_corpus(s) for s in synth_site]
    assert all(c.format == "edaic" and not c.problems for c in sites)
    for c in sites:
        for p in c.participants:
            assert p.total == sum(p.items.values()) and p.binary == int(p.total >= 10)
            assert all(p.modalities().values())
    # non-IID: the second site is more severe on average
    means = [np.mean([p.total for p in c.participants]) for c in sites]
    assert means[1] > means[0]
    assert json.loads((synth_site[0] / "SYNTHETIC.json").read_text())["warning"].startswith("synthetic")


def test_a_corpus_with_split_files_never_guesses_a_participants_split(tmp_path):
    """An E-DAIC participant with item scores but in no split file (a copy without test_split.csv, say) was
    hashed into train or test like a CMDC participant: a test participant could land in training, silently.
    A participant listed under two splits took the last one. Both are now left out of training and
    evaluation (split 'unlisted') and named as problems."""
    import shutil

    from mllm_dr.corpus import read_corpus
    from mllm_dr.corpus.labels import UNLISTED, effective_split

    edaic = tmp_path / "edaic"
    shutil.copytree(FIXTURES / "edaic", edaic)
    detailed = edaic / "Detailed_PHQ8_Labels.csv"
    detailed.write_text(detailed.read_text() + "302,3,3,2,2,2,1,1,1,15\n")   # the test participant's items
    (edaic / "test_split.csv").unlink()
    corpus = read_corpus(edaic)
    p302 = next(p for p in corpus.participants if p.id == "302")
    assert p302.split == UNLISTED and effective_split("302", p302.split) not in ("train", "dev", "test")
    assert any("302" in pr.message and "no split file" in pr.message for pr in corpus.problems)
    daic = tmp_path / "daic"
    shutil.copytree(FIXTURES / "daic", daic)
    train = daic / "train_split_Depression_AVEC2017.csv"
    train.write_text(train.read_text() + "400,1,11,1,2,2,1,1,1,2,1,1\n")        # 400 is a test participant
    corpus = read_corpus(daic, "daic")
    splits = {p.id: p.split for p in corpus.participants}
    assert splits["400"] == UNLISTED and splits["319"] == "train" and splits["320"] == "dev"
    assert any("400" in pr.message and "also listed as train" in pr.message for pr in corpus.problems)


def test_one_participant_in_two_session_folders_is_an_error_naming_both(tmp_path):
    """Session 41 (a site-path review): with a/300_P and b/300_P the first folder found was read and the other
    ignored without a word; which interview is the participant's cannot be guessed. Now `data check` (and
    every reader) stops, naming both (exit 2)."""
    import shutil

    from mllm_dr.corpus import read_corpus
    from mllm_dr.errors import InputError

    edaic = tmp_path / "edaic"
    shutil.copytree(FIXTURES / "edaic", edaic)
    (edaic / "copy").mkdir()
    shutil.copytree(edaic / "300_P", edaic / "copy" / "300_P")
    proc = run_cli("mllmdr-site", "data", "check", edaic, check=False)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "participant 300 has two session folders, 300_P and copy/300_P" in said
    cmdc = tmp_path / "cmdc"
    shutil.copytree(FIXTURES / "cmdc", cmdc)
    subject = next(d for d in sorted(cmdc.rglob("*")) if d.is_dir() and d.name.startswith(("HC", "MDD")) and
                   d.name[-1].isdigit())
    (cmdc / "again").mkdir()
    shutil.copytree(subject, cmdc / "again" / subject.name)
    with pytest.raises(InputError, match=f"subject {subject.name} has two folders"):
        read_corpus(cmdc)
