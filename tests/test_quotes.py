"""Verbatim quotes (mllm_dr/quotes.py): the rule on hand-made texts, and the greedy chooser driven by a
scripted language model that wants to quote a memorised sentence (what the trained SmolLM2 did)."""

import pytest
import torch

from mllm_dr.grounding import is_grounded, repeated_items
from mllm_dr.quotes import VerbatimQuotes, allowed_quotes, within_rule

EVIDENCE = "I wake up at three every night, and I can't fall back asleep."
MEMORISED = ('Evaluation Result: 1\nEvaluation Reason: The participant said "I\'m in a good place emotionally", '
             'which fits a score of 1.')


def test_allowed_quotes_are_the_evidence_whole_or_cut_at_a_clause():
    allowed = allowed_quotes(EVIDENCE)
    assert EVIDENCE in allowed and EVIDENCE.rstrip(".") in allowed
    assert "I wake up at three every night" in allowed           # cut at the comma
    assert "I wake up at three" not in allowed                   # not at a clause boundary
    assert allowed_quotes(None) == allowed_quotes("  ") == frozenset()


def test_within_rule_checks_only_the_reason_and_every_quote_in_it():
    allowed = allowed_quotes(EVIDENCE)
    assert within_rule('Evaluation Result: 2\nEvaluation Re', allowed)          # before the reason
    assert within_rule('Evaluation Reason: The participant said "I wake up', allowed)  # open, a start
    assert not within_rule('Evaluation Reason: The participant said "I\'m in', allowed)
    assert within_rule(f'Evaluation Reason: The participant said "{EVIDENCE.rstrip(".")}", which fits', allowed)
    assert not within_rule('Evaluation Reason: said "I wake up at three", which', allowed)   # closed mid-clause
    assert not within_rule('Evaluation Reason: The participant said "', frozenset())       # nothing to quote


class ScriptedLM:
    """Logits that put the next token of ``script`` first while the text so far follows it, and a fixed
    random order over the vocabulary otherwise (a model with no opinion)."""

    def __init__(self, tok, script: str, vocab: int):
        self.tok, self.script = tok, tok(script, add_special_tokens=False)["input_ids"]
        self.noise = torch.randn(vocab, generator=torch.Generator().manual_seed(0))

    def logits(self, ids: list[int]) -> torch.Tensor:
        out = self.noise.clone()
        if ids == self.script[:len(ids)] and len(ids) < len(self.script):
            out[self.script[len(ids)]] = 100.0
        return out


def run(tok, lm: ScriptedLM, chooser: VerbatimQuotes | None, steps: int) -> str:
    ids: list[int] = []
    for _ in range(steps):
        logits = lm.logits(ids)[None]
        ids.append(int((logits.argmax(-1) if chooser is None else chooser(logits))[0]))
    return tok.decode(ids, skip_special_tokens=True)


def test_a_memorised_quote_becomes_the_items_evidence(tiny):
    _, tok, _ = tiny
    vocab = len(tok)
    lm = ScriptedLM(tok, MEMORISED, vocab)
    steps = len(lm.script) + 8
    free = run(tok, lm, None, steps)
    assert '"I\'m in a good place emotionally"' in free                 # what the model wants to say
    kept = run(tok, lm, VerbatimQuotes(tok, [EVIDENCE]), steps + 24)
    assert kept.startswith('Evaluation Result: 1\nEvaluation Reason: The participant said "')
    quoted = kept.split('"')[1]
    assert quoted in allowed_quotes(EVIDENCE) and len(kept.split('"')) >= 3, kept
    turns = [EVIDENCE, "I'm in a good place emotionally.", "The weather has been nice."]
    assert is_grounded(kept, turns, [0]) and not is_grounded(free, turns, [0])


def test_an_item_without_evidence_cannot_open_a_quote(tiny):
    _, tok, _ = tiny
    lm = ScriptedLM(tok, MEMORISED, len(tok))
    text = run(tok, lm, VerbatimQuotes(tok, [None]), len(lm.script) + 4)
    assert text.startswith("Evaluation Result: 1\nEvaluation Reason: The participant said")
    assert '"' not in text.split("Evaluation Reason:")[1]


def test_an_item_without_evidence_opens_its_reason_as_its_training_answers_do(tiny):
    """Free text at 24 participants (session 25): every item with no evidence turn got "The participant
    said a score of 2", and those were the run's only repeated rationales. The reason now opens with
    the no-statement words of the item's training answer; the model goes on from there; a row with
    evidence is untouched."""
    from mllm_dr.rationales import no_statement

    _, tok, _ = tiny
    lm = ScriptedLM(tok, MEMORISED, len(tok))
    chooser = VerbatimQuotes(tok, [None, EVIDENCE], openings=[no_statement("Sleep"), None])
    ids: list[list[int]] = [[], []]
    for _ in range(len(lm.script) + 24):
        step = chooser(torch.stack([lm.logits(ids[0]), lm.logits(ids[1])]))
        for row in (0, 1):
            ids[row].append(int(step[row]))
    none, some = (tok.decode(i, skip_special_tokens=True) for i in ids)
    assert none.startswith("Evaluation Result: 1\nEvaluation Reason: The dialogue gives no direct statement on sleep")
    assert '"' not in none.split("Evaluation Reason:")[1] and len(none) > len(
        "Evaluation Result: 1\nEvaluation Reason: " + no_statement("Sleep"))
    assert some.startswith('Evaluation Result: 1\nEvaluation Reason: The participant said "')


def test_rows_are_independent_and_two_items_no_longer_repeat(tiny):
    _, tok, _ = tiny
    lm = ScriptedLM(tok, MEMORISED, len(tok))
    other = "My appetite is gone; I skip lunch most days."
    chooser = VerbatimQuotes(tok, [EVIDENCE, other])
    ids: list[list[int]] = [[], []]
    for _ in range(len(lm.script) + 30):
        logits = torch.stack([lm.logits(ids[0]), lm.logits(ids[1])])
        for row, token in enumerate(chooser(logits).tolist()):
            ids[row].append(token)
    texts = [tok.decode(i, skip_special_tokens=True) for i in ids]
    assert texts[0].split('"')[1] in allowed_quotes(EVIDENCE)
    assert texts[1].split('"')[1] in allowed_quotes(other)
    assert not repeated_items({"Sleep": texts[0], "Appetite": texts[1]})


# ---------------------------------------------------------------- reason-first answers (ModelConfig.answer_order)
def test_reason_first_answers_round_trip_and_parse_only_the_first_block():
    from mllm_dr.parsing import format_answer, parse_answer, reorder

    paper = format_answer(2, 'The participant said "I wake up at three", which fits a score of 2.')
    first = reorder(paper, "reason-first")
    assert first == 'Evaluation Reason: The participant said "I wake up at three", which fits a score of 2.\n' \
                    'Evaluation Result: 2'
    assert reorder("Score: 2", "reason-first") == "Score: 2" and reorder(paper, "result-first") == paper
    parsed = parse_answer(first + "\n\nEvaluation Reason: something else entirely here.\nEvaluation Result: 0",
                          "reason-first")
    assert parsed.score == 2 and parsed.reason.startswith("The participant said")
    assert not parse_answer("Evaluation Result: 2\nEvaluation Reason: x y z w", "reason-first").well_formed
    assert parse_answer(paper).reason == parse_answer(first, "reason-first").reason


def test_reason_first_model_is_trained_on_the_reordered_answer_with_its_instruction(tiny):
    from test_model import SMALL, _example, _model

    from mllm_dr.config import ModelConfig

    sm = _model(tiny, ModelConfig.from_dict(SMALL.to_dict() | {"answer_order": "reason-first"}))
    tok = sm.processor.tok
    batch = sm.processor.collate([_example()])
    answer = tok.decode(batch.labels[0][batch.labels[0] != -100], skip_special_tokens=True)
    assert answer.startswith("Evaluation Reason: The participant cannot sleep") and answer.endswith("Result: 2")
    assert tok.decode(batch.input_ids[0, batch.score_positions[0]]) == "2"       # the score token, now last
    prompt = tok.decode(batch.input_ids[0][batch.prompt_mask[0]])
    assert prompt.index("Evaluation Reason: A concise") < prompt.index("Evaluation Result: A numeric")
    with pytest.raises(ValueError, match="answer_order"):
        ModelConfig(answer_order="score-last")


def test_the_run_plan_carries_the_answer_order_into_the_signed_model_config():
    from fl_server.plan import RunPlan
    from mllm_dr.config import ModelConfig

    plan = RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "answer-order": "result-first"})
    assert ModelConfig.from_dict(plan.architecture().to_dict()).answer_order == "result-first"
    # the default is reason-first (the order every arm of bench.federation learns the items with)
    assert RunPlan.model_validate({"center-dir": "/c", "run-name": "r"}).architecture().answer_order == "reason-first"
    assert ModelConfig().answer_order == "reason-first"
    with pytest.raises(ValueError, match="answer-order"):
        RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "answer-order": "score-last"})


def test_a_config_stored_before_the_answer_order_existed_is_read_as_the_result_first_it_was_trained_on():
    from mllm_dr.config import ModelConfig

    stored = ModelConfig().to_dict()
    del stored["answer_order"]                       # an adapter_meta.json / run spec of an earlier version
    assert ModelConfig.from_dict(stored).answer_order == "result-first"
    assert ModelConfig.from_dict(ModelConfig().to_dict()).answer_order == "reason-first"


def test_when_every_likely_token_opens_a_forbidden_quote_the_best_quote_free_token_is_taken(tiny):
    """A model sure it must quote (all of its top tokens hold a quote mark) for an item with no evidence:
    the chooser used to fall back to the argmax and open the quote anyway."""
    _, tok, _ = tiny
    script = "Evaluation Result: 0\nEvaluation Reason: The participant said"
    quote_tokens = [t for t in range(len(tok)) if '"' in tok.decode([t])]
    assert len(quote_tokens) > 20                          # more than the chooser's top_k

    class QuoteHungryLM(ScriptedLM):
        def logits(self, ids):
            out = super().logits(ids)
            if len(ids) >= len(self.script):
                out[quote_tokens] += 50.0
            return out

    lm = QuoteHungryLM(tok, script, len(tok))
    assert '"' in run(tok, lm, None, len(lm.script) + 3).split("Evaluation Reason:")[1]
    kept = run(tok, lm, VerbatimQuotes(tok, [None]), len(lm.script) + 6)
    assert kept.startswith(script) and len(kept) > len(script)
    assert '"' not in kept.split("Evaluation Reason:")[1], kept
