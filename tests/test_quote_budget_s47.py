"""Session 47, review F5: a quote the scorer allowed could be held open past the answer's token budget
(``parsing.ANSWER_TOKEN_BUDGET``, 64): the answer ended inside the quote, with no score (regression-head fallback).
The scorer's and the teacher validator's allowed quotes are now training's under the budget
(``rationales.scoring_quotes``: the texts of ``quotes.allowed_quotes`` whose training answer fits, by the one test
``rationales.quote_fits`` the training answers are cut by); an item with no quote that fits is one with nothing to
quote, its reason opening as its training answers' do ("The participant's long answer on ...",
``rationales.scoring_opening``). Each test runs at the real budget and failed on the code before the change."""

from __future__ import annotations

import mllm_dr.parsing as P
import mllm_dr.quotes as Q             # as modules: each test fails on its own where a name is missing
import mllm_dr.rationales as R
from mllm_dr.aspects import AspectInstance
from test_evidence_s47 import _FragmentLM       # its logits: the wanted text's next token, over fixed noise

# the reviewer's turn: "Yes" and one run-on clause, no cut of >= 3 words, far over the budget whole
RUN_ON = ("Yes, I have been feeling really down most of the days for the past couple of months and I just cannot "
          "get myself out of bed in the morning because there is nothing to look forward to at work or at home "
          "anymore and my sister keeps telling me to see someone about it but I do not want to")
# a turn with a cut that fits and a whole that does not
LONG = ("I feel down most days, and it has been like that for months now, since my father died last spring and "
        "I had to sell the house we all grew up in and move to a small flat near my work where I know nobody at all "
        "and nothing I do seems to lift it for more than an hour or so before it all comes back")


def _inst(evidence: str, label: int = 2) -> AspectInstance:
    return AspectInstance("P1", "Depressed", label, "the dialogue", 1, 1, evidence=evidence)


class _LM(_FragmentLM):
    """Logits of a model whose answers are the template's: while the text follows HEAD it wants HEAD's next token;
    inside an open quote it wants COPY's next token (it copies the turn, closing the quote only where COPY ends),
    then ', which' and TAIL (the score); after any other opening it wants TAIL."""

    HEAD = 'Evaluation Reason: The participant said "'
    TAIL = ' fits a score of 2.\nEvaluation Result: 2'

    def __init__(self, tok, copy: str):
        super().__init__(tok)
        self.copy = copy

    def _want(self, text: str) -> str | None:
        if self.HEAD.startswith(text) and len(text) < len(self.HEAD):
            return self.HEAD[len(text):]
        closed, open_part = Q.quotes_in_reason(text)
        if open_part is not None:
            written = Q.pending(open_part)
            return self.copy[len(written):] + '"' if self.copy.startswith(written) else '"'
        k = text.find(" fits")
        if k >= 0:
            after = text[k:]
            return self.TAIL[len(after):] if self.TAIL.startswith(after) and len(after) < len(self.TAIL) else None
        return (", which" if text.endswith('"') else "") + self.TAIL


def _generate(tok, lm: _LM, evidence: str, item: str = "Depressed") -> str:
    chooser = Q.VerbatimQuotes(tok, [evidence], openings=[R.scoring_opening(item, evidence)])
    ids: list[int] = []
    for _ in range(P.ANSWER_TOKEN_BUDGET):                       # the answer's budget at scoring
        ids.append(int(chooser(lm.logits(ids)[None])[0]))
        text = tok.decode(ids, skip_special_tokens=True)
        if P.parse_answer(text, "reason-first").score is not None:
            break
    return tok.decode(ids, skip_special_tokens=True)


def test_the_scorers_quotes_are_trainings_under_the_budget(tiny):
    """Every quote the scorer allows has a training answer that fits the budget, and every training quote that fits
    is allowed: "Yes" of RUN_ON (never a training quote) and LONG whole (its answer over the budget) are not."""
    _, tok, _ = tiny
    for turn in (RUN_ON, LONG):
        allowed = Q.VerbatimQuotes(tok, [turn]).allowed[0]
        fitting = {q for q in Q.training_quotes(turn) if R.quote_fits(q)}
        assert set(allowed) - {Q.quote_form(turn)} == fitting, turn
        assert all(R.quote_fits(q) for q in allowed)
    assert R.scoring_quotes(RUN_ON) == frozenset()
    assert R.extractive_rationale(_inst(RUN_ON)).startswith(R.long_answer("Depressed"))
    assert Q.quote_form(LONG) not in R.scoring_quotes(LONG) and "I feel down most days" in R.scoring_quotes(LONG)


def test_a_turn_with_no_quote_in_the_budget_is_not_quoted_and_keeps_its_score(tiny):
    """The reviewer's scenario: a model that opens a quote of RUN_ON and would close it after "Yes" (held to the
    turn's end before, out of the budget inside the quote). Now no quote opens: the reason opens as training's
    ("The participant's long answer on ..."), the answer ends within the budget, score and all."""
    _, tok, _ = tiny
    text = _generate(tok, _LM(tok, "Yes"), RUN_ON)
    closed, open_part = Q.quotes_in_reason(text)
    assert not closed and open_part is None, text
    assert text.startswith(f"Evaluation Reason: {R.long_answer('Depressed')}"), text
    assert P.parse_answer(text, "reason-first").score == 2, text


def test_a_quote_copied_past_the_budget_is_closed_at_the_longest_end_that_fits(tiny):
    """A model that copies the whole of a long turn (the quote allowed whole before) ran out of the budget inside
    the quote; now it is closed at the longest allowed end whose training answer fits, and the score follows."""
    _, tok, _ = tiny
    text = _generate(tok, _LM(tok, Q.quote_form(LONG)), LONG)
    closed, open_part = Q.quotes_in_reason(text)
    assert open_part is None and len(closed) == 1, text
    assert Q.unspaced(closed[0]) == Q.training_quotes(LONG)[0] or R.quote_fits(Q.unspaced(closed[0])), text
    assert Q.unspaced(closed[0]) in R.scoring_quotes(LONG), text
    assert P.parse_answer(text, "reason-first").score == 2, text


def test_the_validator_refuses_a_quote_the_scorer_would_not_allow():
    """The teacher's validator takes the scorer's set: "Yes" of RUN_ON was accepted (a short cut kept for a held
    quote) though no training answer quotes it and the scorer now refuses it."""
    answer = 'Evaluation Result: 2\nEvaluation Reason: The participant said "Yes", which fits a score of 2.'
    assert R.validate(answer, 2, evidence=RUN_ON) is not None
    fits = 'Evaluation Result: 2\nEvaluation Reason: The participant said "I feel down most days", which fits a score of 2.'
    assert R.validate(fits, 2, evidence=LONG) is None
