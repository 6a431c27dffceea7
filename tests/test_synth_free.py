"""data synth --text free: paraphrased interviews in the real layouts, with the answer turns recorded."""

import json

import pytest
from conftest import cli_json

from mllm_dr.aspects import load_keywords
from mllm_dr.corpus import read_corpus
from mllm_dr.grounding import load_answer_turns
from mllm_dr.synth import SynthConfig, write_synthetic
from mllm_dr.synth_free import banks


@pytest.fixture(scope="module")
def free_sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("free")
    return {fmt: write_synthetic(SynthConfig(out / fmt, fmt, participants=12, sites=2, seed=2, seconds=0.5, text="free"))
            for fmt in ("edaic", "daic", "cmdc")}


def _bank_phrase(text: str, lang: str, item: str, score: int | None) -> bool:
    """The turn says one of the item x score paraphrases (hedges around it allowed; any score
    when the label is hidden, as in DAIC's test split)."""
    by_score = banks()[f"answers_{lang}"][item]
    phrases = by_score[str(score)] if score is not None else [ph for v in by_score.values() for ph in v]
    return any(ph.lower().rstrip(".。") in text.lower() for ph in phrases)


def test_banks_share_no_keyword_with_their_item():
    keywords = load_keywords()
    for lang in ("en", "zh"):
        for item, by_score in banks()[f"answers_{lang}"].items():
            assert len(by_score) == 4 and all(len(v) >= 3 for v in by_score.values())
            for phrases in by_score.values():
                assert len(set(phrases)) == len(phrases)
                for ph in phrases:
                    assert not [w for w in keywords[item] if w.lower() in ph.lower()], (item, ph)


@pytest.mark.parametrize("fmt", ["edaic", "daic", "cmdc"])
def test_free_layouts_read_back_with_true_answer_turns(free_sites, fmt):
    lang = "zh" if fmt == "cmdc" else "en"
    unasked = asked = 0
    varied = 0
    for site in free_sites[fmt]:
        corpus = read_corpus(site)
        assert corpus.format == fmt and not corpus.problems
        meta = json.loads((site / "SYNTHETIC.json").read_text())
        assert meta["text"] == "free" and "not clinical data" in meta["warning"]
        truth = load_answer_turns(site)
        assert set(truth) == {p.id for p in corpus.participants}
        for p in corpus.participants:
            if None not in p.items.values():
                assert p.total == sum(p.items.values())
                varied += len(set(p.items.values())) > 1
            for item, idx in truth[p.id].items():
                asked += bool(idx)
                unasked += not idx
                for i in idx:
                    assert p.turns[i].speaker == "Participant"
                    assert _bank_phrase(p.turns[i].text, lang, item, p.items[item]), (p.id, item, p.turns[i].text)
            answer_idx = {i for idx in truth[p.id].values() for i in idx}
            others = [t for i, t in enumerate(p.turns) if i not in answer_idx and t.speaker == "Participant"]
            if fmt != "cmdc":
                assert others, "small talk or stalls between answers"
    assert unasked >= 1 and asked > 3 * unasked   # some items never asked, most are
    assert varied >= 1                              # items vary within a participant


def test_daic_free_has_free_interviewer_questions(free_sites):
    corpus = read_corpus(free_sites["daic"][0])
    asked = {t.text for p in corpus.participants for t in p.turns if t.speaker == "Ellie"}
    questions = {q.lower() for qs in banks()["questions_en"].values() for q in qs}
    assert len(asked & questions) >= 8
    truth = load_answer_turns(free_sites["daic"][0])
    answers = [p.turns[i].text for p in corpus.participants for idx in truth[p.id].values() for i in idx]
    assert len(set(answers)) > 0.8 * len(answers)   # paraphrases and hedges, not one sentence per score


def test_template_mode_is_unchanged_and_records_answers(tmp_path):
    a = write_synthetic(SynthConfig(tmp_path / "a", "daic", participants=4, sites=1, seed=7, seconds=0.5))[0]
    b = write_synthetic(SynthConfig(tmp_path / "b", "daic", participants=4, sites=1, seed=7, seconds=0.5))[0]
    for f in sorted(a.rglob("*_TRANSCRIPT.csv")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
    corpus, truth = read_corpus(a), load_answer_turns(a)
    for p in corpus.participants:
        for item, idx in truth[p.id].items():
            assert len(idx) == 1 and corpus.format == "daic"
            assert p.turns[idx[0] - 1].speaker == "Ellie"   # the template question right before the answer


def test_cli_synth_free(tmp_path):
    rep = cli_json("mllmdr-site", "data", "synth", tmp_path / "s", "--participants", "3", "--sites", "1",
                   "--seconds", "0.5", "--text", "free", "--format", "daic")
    assert rep["text"] == "free"
    assert json.loads((tmp_path / "s" / "site1" / "SYNTHETIC.json").read_text())["text"] == "free"
