"""Item-level metrics, rationale checks and quote selection on hand-made examples (values worked by hand)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mllm_dr.corpus.model import Turn
from mllm_dr.errors import InputError
from mllm_dr.grounding import (RationaleStats, content_words, is_grounded, load_answer_turns, participant_texts,
                               repeated_items, selection_hits, severity_claim, states_opposite)
from mllm_dr.metrics import ItemStats

TURNS = ["I drift off as soon as my head hits the pillow.",       # 0: Sleep's answer
         "the traffic downtown is slow but the weather is nice.",  # 1: small talk
         "my batteries are flat most of the week."]               # 2: Tired's answer


def test_item_stats_by_hand():
    a, b = ItemStats(), ItemStats()
    # A: errors 1,0,1,2 -> sae 4, sse 6; exact only the 1; true std sqrt(1.25), pred std 0; flat while true varies
    a.add([0, 1, 2, 3], [1, 1, 1, 1])
    # B: errors .4,.4 -> sae .8, sse .32; 1.6 and 2.4 both round to 2 (exact); true std 0, pred std .4
    b.add({"Sleep": 2, "Tired": 2, "Moving": None}, {"Sleep": 1.6, "Tired": 2.4, "Moving": 3})
    m = a.merge(b).compute()
    assert m["n_items"] == 6 and m["n_participants"] == 2
    assert m["item_mae"] == pytest.approx(4.8 / 6)
    assert m["item_rmse"] == pytest.approx(math.sqrt(6.32 / 6))
    assert m["item_exact"] == pytest.approx(3 / 6)
    assert m["true_item_spread"] == pytest.approx(math.sqrt(1.25) / 2)
    assert m["pred_item_spread"] == pytest.approx(0.4 / 2)
    assert m["flat_pred_share"] == 1.0            # B's true items do not vary: not in the denominator
    pooled = ItemStats()
    pooled.add([0, 1, 2, 3], [1, 1, 1, 1])
    pooled.add([2, 2], [1.6, 2.4])
    assert pooled.to_dict() == pytest.approx(a.merge(b).to_dict())
    assert ItemStats.from_dict(json.loads(json.dumps(pooled.to_dict()))) == pooled
    half = ItemStats()
    half.add([3, 0], [2.5, 0.4])                  # half up: 2.5 -> 3 (Python's round gives 2)
    assert half.compute()["item_exact"] == 1.0 and half.compute()["flat_pred_share"] == 0.0
    assert math.isnan(ItemStats().compute()["item_mae"])


def test_content_words():
    assert content_words("The participant said \"I'm sleeping badly\", which fits a score of 2.") == {"sleep", "badly"}
    assert content_words("我几乎每天都睡不着") == {"睡不", "不着"}        # frequency words name no item
    assert content_words("I feel energetic most of the time") == {"energetic"}


def test_grounded_by_hand():
    quote = 'The participant said "I drift off as soon as my head hits the pillow", which fits a score of 0.'
    assert is_grounded(quote, TURNS, [0])          # shares drift, soon, head, hit, pillow with turn 0 only
    assert not is_grounded(quote, TURNS, [2])      # quotes another item's answer
    small = 'The participant said "the traffic downtown is slow", which fits a score of 3.'
    assert not is_grounded(small, TURNS, [0])      # quotes small talk
    assert not is_grounded("The participant seems fine overall.", TURNS, [0])   # shares < MIN_SHARED words
    assert not is_grounded(quote, TURNS, [])       # an item with no evidence turn
    para = "Reports that the batteries feel flat for most of the week."
    assert is_grounded(para, TURNS, [2])           # a paraphrase: batteries, flat, week
    assert is_grounded('The participant said "once in a while I overeat".', TURNS + ["once in a while I overeat."], [3])
    assert is_grounded('The participant said "有几天会觉得累。"', ["有几天会觉得累。", "我有一个妹妹。"], [0])
    turns = [Turn("Ellie", "how are you sleeping?"), Turn("Participant", TURNS[0])]
    assert participant_texts(turns) == ["", TURNS[0]]


def test_repeated_by_hand():
    r = {"Sleep": 'The participant said "I am in a good place", which fits a score of 3.',
         "Tired": 'The participant said "I am in a good place", which fits a score of 2.',
         "Appetite": "Skips lunch most days and has lost weight.",
         "Moving": "Skips lunch most days and has lost weight!"}
    assert repeated_items(r) == {"Sleep", "Tired", "Appetite", "Moving"}
    r["Moving"] = "Paces around the kitchen most days."
    assert repeated_items(r) == {"Sleep", "Tired"}


@pytest.mark.parametrize("text,claim", [
    ("I'm in a good place emotionally", "mild"),
    ("feels hopeless nearly every day", "severe"),
    ("the mood is not good", "severe"),            # negated mild counts as severe
    ("no problem with sleep at all", "mild"),
    ("sleeps well but is exhausted", None),        # one of each: no claim
    ("I feel energetic most of the time", None),   # frequency alone is no claim
    ("she goes to the shops", None),
    ("我几乎每天都睡不着", "severe"),
])
def test_severity_claim(text, claim):
    assert severity_claim(text) == claim


def test_opposite_and_stats_by_hand():
    assert states_opposite("I'm in a good place emotionally", 3)
    assert not states_opposite("I'm in a good place emotionally", 0)
    assert states_opposite("feels hopeless nearly every day", 0)
    assert not states_opposite("feels hopeless nearly every day", 1)   # 1 = several days: symptom words fit
    assert states_opposite("no problem, sleeps fine", 2)
    rationales = {"Sleep": 'The participant said "I drift off as soon as my head hits the pillow", fits 0.',
                  "Tired": 'The participant said "I drift off as soon as my head hits the pillow", fits 3.',
                  "Depressed": "In a good place emotionally."}
    scores = {"Sleep": 0, "Tired": 3, "Depressed": 3}
    stats = RationaleStats()
    stats.add(rationales, scores, TURNS, evidence={"Sleep": [0], "Tired": [2], "Depressed": []},
              truth={"Sleep": [0], "Tired": [2], "Depressed": []})
    # grounded: Sleep only, of the 2 items with evidence (nobody spoke to Depressed); repeated:
    # Sleep+Tired; opposite: Depressed (good at 3); truth: Sleep, Tired asked
    assert stats.to_dict() == {"n_items": 3, "n_evidence_items": 2, "grounded": 1, "repeated": 2, "opposite": 1,
                               "n_truth_items": 2, "grounded_truth": 1}
    m = stats.merge(RationaleStats.from_dict(stats.to_dict())).compute()
    assert m["n_items"] == 6 and m["item_grounded"] == pytest.approx(1 / 2) and m["repeated"] == pytest.approx(2 / 3)
    assert m["no_evidence"] == pytest.approx(1 / 3)
    assert m["opposite_severity"] == pytest.approx(1 / 3) and m["item_grounded_truth"] == pytest.approx(0.5)


def test_selection_hits_and_sidecar(tmp_path):
    insts = [SimpleNamespace(participant="300", item="Sleep", evidence_turns=[4, 6]),
             SimpleNamespace(participant="300", item="Tired", evidence_turns=[4]),
             SimpleNamespace(participant="300", item="Moving", evidence_turns=[2])]
    truth = {"300": {"Sleep": [4, 5], "Tired": [8], "Moving": []}}
    assert selection_hits(insts, truth) == (1, 2)  # Moving was never asked: not counted
    assert load_answer_turns(tmp_path) is None
    (tmp_path / "SYNTHETIC.json").write_text("{broken")
    with pytest.raises(InputError, match="SYNTHETIC.json"):
        load_answer_turns(tmp_path)


def test_selector_reads_free_speech_where_keywords_fail():
    """Old keyword ranking picked "he works nights" for Sleep and "eat"-in-"great" for Appetite."""
    from mllm_dr.aspects import build_instances
    from mllm_dr.corpus.model import Corpus, Participant

    turns = [Turn("Participant", "a younger brother, he works nights at a hospital."),
             Turn("Participant", "I'm up every single evening until dawn, I barely get two hours."),
             Turn("Participant", "we drove up the coast two summers ago, it was great."),
             Turn("Participant", "I can barely touch my plate, every single day."),
             Turn("Participant", "I'm worn out from the moment I get up, every day without fail.")]
    p = Participant("300", "train", {"Sleep": 3, "Appetite": 3, "Tired": 3}, 9, 0, turns)
    corpus = Corpus("edaic", Path("."), ("Sleep", "Appetite", "Tired"), [p], [])
    got = {i.item: i.evidence_turns[0] for i in build_instances(corpus, p)}
    assert got == {"Sleep": 1, "Appetite": 3, "Tired": 4}


def test_small_talk_and_hedges_are_evidence_for_no_item_and_an_unspoken_item_gets_no_quote():
    """Session 23's misses on free E-DAIC text: "I work in logistics, lots of spreadsheets" was the
    quote for Concentrating and "hard to say." for Depressed and Failure; an item nobody spoke to
    quoted whatever came closest. Its fallback rationale says so, naming the item, with no
    severity claim either way."""
    from mllm_dr.aspects import build_instances
    from mllm_dr.corpus.model import Corpus, Participant
    from mllm_dr.dataset import fallback_rationale
    from mllm_dr.phq import PHQ8_ITEMS

    turns = [Turn("Participant", "I work in logistics, lots of spreadsheets and phone calls."),
             Turn("Participant", "now and then my thoughts drift off in meetings."),
             Turn("Participant", "hard to say."),
             Turn("Participant", "every so often I get a heavy feeling for a day, then it lifts."),
             Turn("Participant", "I'm up every single evening until dawn, I barely get two hours."),
             Turn("Participant", "a younger brother, he works nights at a hospital.")]
    p = Participant("300", "train", {i: 1 for i in PHQ8_ITEMS}, 8, 0, turns)
    insts = {i.item: i for i in build_instances(Corpus("edaic", Path("."), PHQ8_ITEMS, [p], []), p)}
    assert insts["Sleep"].evidence_turns[:1] == [4]
    # "my thoughts drift off" is one item's quote (one quote per turn): the encoder puts it nearer to
    # Moving (0.42) than to Concentrating (0.30), so Moving has it: the rule's cost (README)
    assert [k for k, i in insts.items() if i.evidence_turns[:1] == [1]] == ["Moving"]
    assert not any(set(i.evidence_turns) & {0, 2, 5} for i in insts.values())
    unspoken = [i for i in insts.values() if not i.evidence_turns]
    assert {"Appetite", "NoInterest"} <= {i.item for i in unspoken}
    texts = {i.item: fallback_rationale(i) for i in unspoken}
    assert "appetite" in texts["Appetite"] and "interest in activities" in texts["NoInterest"]
    from mllm_dr.rationales import LocalTeacher                  # the teacher's answer opens the same way
    assert LocalTeacher(None, None, "t", prefill=True)._prefix(insts["Appetite"]).endswith(
        "Evaluation Reason: The dialogue gives no direct statement on appetite;")
    assert not any(states_opposite(t, s) for t in texts.values() for s in (0, 3))


def test_rapport_small_talk_about_tastes_seasons_and_studies_is_no_items_quote():
    """Session 25's federated free-text run quoted "autumn, when the leaves change colour" as the
    evidence for Depressed (2 of 6 test participants); on 72 participants the selector also gave
    "I like old films, westerns mostly" to NoInterest and "uh, I don't know how to put it" to
    Failure when those items were never asked. Rapport topics in item_queries.json's "none".
    The second interview's small talk is in no phrase bank (written for this test): before the
    change its "I studied history at college" was NoInterest's quote and "how do I say this, um."
    Moving's."""
    from mllm_dr.aspects import build_instances
    from mllm_dr.corpus.model import Corpus, Participant
    from mllm_dr.phq import PHQ8_ITEMS

    turns = [Turn("Participant", t) for t in ("autumn, when the leaves change colour.",
                                                "I like old films, westerns mostly.", "uh, I don't know how to put it.",
                                                "mostly jazz, my dad used to play records.",
                                                "I mean, I get a solid eight hours, I'm out like a light.")]
    p = Participant("301", "train", {i: 1 for i in PHQ8_ITEMS}, 8, 0, turns)
    insts = {i.item: i for i in build_instances(Corpus("edaic", Path("."), PHQ8_ITEMS, [p], []), p)}
    assert insts["Sleep"].evidence_turns[:1] == [4]
    assert {k: i.evidence_turns for k, i in insts.items() if set(i.evidence_turns) & {0, 1, 2, 3}} == {}
    unseen = ["spring, when everything starts to bloom.", "mostly sci-fi novels and the odd documentary.",
              "I studied history at college, ages ago.", "we went camping in the mountains last year.",
              "country music, my mum loved it.", "how do I say this, um.",
              "I mean, I get a solid eight hours, I'm out like a light."]
    p = Participant("302", "train", {i: 1 for i in PHQ8_ITEMS}, 8, 0, [Turn("Participant", t) for t in unseen])
    insts = {i.item: i for i in build_instances(Corpus("edaic", Path("."), PHQ8_ITEMS, [p], []), p)}
    assert insts["Sleep"].evidence_turns[:1] == [6]
    assert {k: i.evidence_turns for k, i in insts.items() if set(i.evidence_turns) & set(range(6))} == {}


def test_one_turn_is_the_quote_of_one_item_only():
    """Session 24's federated free-text arm, participant 631: "some days I lose my place in a book"
    was the quote of Concentrating and of NoInterest, so their two rationales repeated each other
    (5 of the arm's 6 repeated pairs were two items quoting one turn). The turn speaks to
    Concentrating most; NoInterest takes its own answer, the skipped saturday plans."""
    from mllm_dr.aspects import build_instances
    from mllm_dr.corpus.model import Corpus, Participant
    from mllm_dr.phq import PHQ8_ITEMS

    texts = ["a bit cloudy, I took the bus in.", "well, I feel peppy and lively from morning to evening, you know.",
             "my partner and our two kids.", "I mean, now and then I raid the cupboard for biscuits when I'm stressed.",
             "autumn, when the leaves change colour.", "I like old films, westerns mostly.",
             "honestly, a couple of days here and there I skip my usual saturday plans and stay in, if that makes sense.",
             "a younger brother, he works nights at a hospital.",
             "well, I have the odd grey day where I feel a bit blue, I guess.",
             "we drove up the coast two summers ago, it was great.",
             "some days I lose my place in a book and have to start the page again.", "a fat old cat called max.",
             "the traffic downtown is slow but the weather is nice.",
             "I mean, I get a solid eight hours, I'm out like a light, if that makes sense.",
             "I go off easily and stay under until morning."]
    p = Participant("631", "test", {i: 1 for i in PHQ8_ITEMS}, 8, 0, [Turn("Participant", t) for t in texts])
    insts = {i.item: i for i in build_instances(Corpus("edaic", Path("."), PHQ8_ITEMS, [p], []), p)}
    assert insts["Concentrating"].evidence_turns[:1] == [10] and insts["NoInterest"].evidence_turns[:1] == [6]
    quotes = [i.evidence_turns[0] for i in insts.values() if i.evidence_turns]
    assert len(quotes) == len(set(quotes)) >= 5


def test_one_quote_per_turn_serves_the_strongest_claim_first_and_leaves_mapped_parts_alone():
    """On hand-made scores: Sleep's claim on turn 0 (0.9) beats NoInterest's (0.8); NoInterest may
    then not take turn 1, which speaks to Depressed more (a fixed serving order gave it to
    NoInterest and left Depressed without its only answer). A CMDC-mapped item keeps its mapped
    turns and a mapped item whose questions were never asked gets none. With the rule off, the
    per-item choice of session 24 (two items share turn 0)."""
    from unittest import mock

    import numpy as np

    from mllm_dr import evidence
    from mllm_dr.phq import PHQ9_ITEMS

    turns = [Turn("Participant", "a"), Turn("Participant", "b")]
    scores = np.zeros((2, len(PHQ9_ITEMS)))
    col = PHQ9_ITEMS.index
    scores[0, col("Sleep")], scores[0, col("NoInterest")] = 0.9, 0.8
    scores[1, col("Depressed")], scores[1, col("NoInterest")] = 0.6, 0.5
    items = ["NoInterest", "Depressed", "Sleep"]
    assert evidence.evidence_by_item(turns, scores, items) == {"NoInterest": [], "Depressed": [1], "Sleep": [0]}
    mapped = evidence.evidence_by_item(turns, scores, items + ["Tired"], {"NoInterest": [0], "Tired": []})
    assert mapped == {"NoInterest": [0], "Depressed": [1], "Sleep": [0], "Tired": []}
    with mock.patch.object(evidence, "ONE_QUOTE_PER_TURN", False):
        assert evidence.evidence_by_item(turns, scores, items) == {"NoInterest": [0], "Depressed": [1], "Sleep": [0]}


def test_turn_embeddings_are_cached_in_the_workspace_and_the_model_is_not_loaded_again(site_ws):
    """Every Flower message rebuilds the site's instances: with the workspace's cache file a fresh
    process gets the same scores without loading the sentence encoder; the policy check counts
    participants from the labels alone."""
    import os

    from mllm_dr import evidence
    from mllm_dr.dataset import labelled_training_counts, labelled_training_instances, load_corpus

    insts = labelled_training_instances(site_ws)
    assert labelled_training_counts(site_ws) == (len({i.participant for i in insts}), len(insts)) and insts
    evidence.default_encoder().save_cache()
    path = site_ws.embeddings_cache_path
    assert path.is_file() and os.stat(path).st_mode & 0o777 == 0o600
    fresh = evidence.SentenceEncoder(evidence.encoder_folder())     # as in a new ClientApp process
    fresh.load_cache(path)
    turns = load_corpus(site_ws).participants[0].turns
    assert np.allclose(evidence.turn_item_scores(turns, fresh), evidence.turn_item_scores(turns))
    assert fresh._model is None                                      # everything came from the file
    fresh.encode(["a sentence no site has said"])
    assert fresh._model is not None
