"""Session 47, two evidence defects left open by session 46's review. 1: the scorer's allowed quote cuts were looser
than training's (a one-word cut such as "Depressed" from "Depressed? No, ..." was a verbatim quote at scoring, and
the teacher's validator accepted it); one rule now (``quotes.allowed_quotes``; training's quotes are drawn from it).
2: the parser (``parsing._last_sentence_end``) and the prefilled teacher (``rationales._first_sentence_end``) found
a sentence end outside a quote by rules of their own that knew only " and “ ”; one helper now
(``quotes.sentence_ends``, on ``quotes.QUOTE_MARKS``). Each test failed on the code before the change."""

from __future__ import annotations

import torch

import mllm_dr.parsing as P
import mllm_dr.quotes as Q             # as modules: each test fails on its own where a name is missing
import mllm_dr.rationales as R
from mllm_dr.aspects import AspectInstance

DEPRESSED = "Depressed? No, I am not depressed at all."
TURNS = [DEPRESSED, "um, I'm tossing and turning most of the time, I hardly get four hours.",
         "I sleep 3.5 hours a night, at most.", "I mean, most days I'm running on fumes by midday.",
         "Yes.", "I lie awake. It is hard to fall asleep, most nights; honestly, always",
         "i just lie there and don't sleep ."]     # a space before the final stop: "...sleep " trained, not allowed


def _answer(reason: str, label: int) -> str:
    return f"Evaluation Result: {label}\nEvaluation Reason: {reason}"


# ----------------------------------------------------------------------------- 1: the one quote rule
def test_a_one_word_cut_is_no_quote_at_scoring():
    allowed = Q.allowed_quotes(DEPRESSED)
    assert "Depressed" not in allowed and "Depressed? No" not in allowed           # 1 and 2 words: fragments
    assert allowed == {"Depressed? No, I am not depressed at all", DEPRESSED}
    reason = 'Evaluation Reason: The participant said "Depressed", which fits a score of 0.'
    assert not Q.within_rule(reason, allowed)
    assert not Q.within_rule(reason.replace('"', "\u201c", 1).replace('"', "\u201d", 1), allowed)
    assert Q.within_rule('Evaluation Reason: The participant said "Depressed', allowed)     # open: may go on
    assert Q.within_rule('Evaluation Reason: The participant said "Depressed? No, I am not depressed at all", which',
                         allowed)
    # the filler openings of free speech and a cut inside a number were quotes too
    assert "um" not in Q.allowed_quotes(TURNS[1]) and "I mean" not in Q.allowed_quotes(TURNS[3])
    assert "I sleep 3" not in Q.allowed_quotes(TURNS[2])
    assert "I sleep 3.5 hours a night" in Q.allowed_quotes(TURNS[2])


def test_what_the_scorer_allows_is_what_training_quotes():
    """Training's quotes (``training_quotes``: the extractive rationales and the default teacher's opening) are the
    scorer's allowed texts but the whole turn with its final full stop: nothing shorter is allowed at scoring."""
    for turn in TURNS:
        training = Q.training_quotes(turn)
        assert set(training) <= Q.allowed_quotes(turn)
        assert Q.allowed_quotes(turn) - set(training) <= {Q.quote_form(turn)}, turn
    assert Q.training_quotes("Yes.") == ["Yes"] and Q.allowed_quotes("Yes.") == {"Yes", "Yes."}   # a whole turn


def test_the_teachers_validator_refuses_a_fragment_quote():
    inst = AspectInstance("p1", "Depressed", 0, f"Ellie: do you feel depressed\nParticipant: {DEPRESSED}", 2, 2,
                          evidence=DEPRESSED)
    fragment = _answer('The participant said "Depressed", which shows a low mood is denied at all times.', 0)
    why = R.validate(fragment, 0, inst.dialogue, evidence=inst.evidence)
    assert why is not None and "not the item's evidence" in why
    whole = _answer('The participant said "Depressed? No, I am not depressed at all", which shows no low mood.', 0)
    assert R.validate(whole, 0, inst.dialogue, evidence=inst.evidence) is None


class _FragmentLM:
    """Logits of a model that quotes "Depressed" and closes the quote there: while the text follows HEAD it wants
    HEAD's next token, inside an open quote the closing mark, after it TAIL (the score), else nothing in particular."""

    HEAD = 'Evaluation Reason: The participant said "Depressed'
    TAIL = ', which fits a score of 0.\nEvaluation Result: 0'

    def __init__(self, tok):
        self.tok = tok
        self.noise = torch.randn(len(tok), generator=torch.Generator().manual_seed(0))

    def _want(self, text: str) -> str | None:
        if self.HEAD.startswith(text) and len(text) < len(self.HEAD):
            return self.HEAD[len(text):]
        if text.count('"') % 2 == 1:
            return '"' + self.TAIL
        after = text.split('"')[-1]
        return self.TAIL[len(after):] if self.TAIL.startswith(after) and len(after) < len(self.TAIL) else None

    def logits(self, ids: list[int]) -> torch.Tensor:
        out = self.noise.clone()
        want = self._want(self.tok.decode(ids, skip_special_tokens=True))
        if want:
            out[self.tok(want, add_special_tokens=False)["input_ids"][0]] = 100.0
        return out


def test_the_scorer_holds_a_fragment_quote_open_and_keeps_the_score(tiny):
    """A model closing its quote after "Depressed" is held inside it (the quote goes on in the turn's own words to
    an allowed end); its reason and score stay its own: the answer parses, score and all."""
    _, tok, _ = tiny
    lm, chooser, ids = _FragmentLM(tok), Q.VerbatimQuotes(tok, [DEPRESSED]), []
    for _ in range(P.ANSWER_TOKEN_BUDGET):                # the answer's budget at scoring
        ids.append(int(chooser(lm.logits(ids)[None])[0]))
        if P.parse_answer(tok.decode(ids, skip_special_tokens=True), "reason-first").score is not None:
            break
    text = tok.decode(ids, skip_special_tokens=True)
    closed, open_part = Q.quotes_in_reason(text)
    assert closed and open_part is None, text
    assert Q.unspaced(closed[0]) != "Depressed" and Q.unspaced(closed[0]) in Q.allowed_quotes(DEPRESSED), text
    parsed = P.parse_answer(text, "reason-first")
    assert parsed.well_formed and parsed.score == 0, text


def test_a_short_cut_stays_refused_however_far_the_next_end():
    """"Yes" of "Yes, <a run-on clause>" is no quote (an earlier fix of review F5 allowed a short cut whose next
    allowed end lay more than 20 words on); a quote is kept within the answer's budget by the scorer's allowed set
    instead, training's under the budget (tests/test_quote_budget_s47.py)."""
    run_on = "Yes, " + " ".join(["and I just cannot get myself out of bed in the morning"] * 5)
    assert "Yes" not in Q.allowed_quotes(run_on) and "Yes" not in Q.training_quotes(run_on)
    assert "Depressed" not in Q.allowed_quotes(DEPRESSED)


# ----------------------------------------------------------------------------- 2: one sentence-end rule
def test_the_parser_reads_no_sentence_end_inside_a_german_or_guillemet_quote():
    for left, right in (("\u201e", "\u201c"), ("\u00ab", "\u00bb"), ("\u00bb", "\u00ab")):
        cut = f"The participant said {left}I sleep badly. I wake at four{right} on most nights and the"
        assert P._last_sentence_end(cut) == -1, (left, right)
        assert P.clean_reason(cut) == cut                  # was cut inside the quote: "...said „I sleep badly."
        two = f"She sleeps badly every night. The participant said {left}I sleep badly. I wake at four{right} on most"
        assert P.clean_reason(two) == "She sleeps badly every night."


def test_the_prefilled_teacher_ends_after_a_guillemet_quote_not_inside_it():
    """The default teacher keeps one sentence of what it generated: a sentence end inside «...» is not it (the
    answer was cut inside the quote and refused as leaving it open)."""
    from test_rationales_s46 import _fake_tok

    turn = "I lie awake. It is hard to fall asleep"
    inst = AspectInstance("p1", "Sleep", 2, f"Ellie: how do you sleep\nParticipant: {turn}", 2, 2, evidence=turn)
    new = f" fits a score of 2; she repeats \u00ab{turn}\u00bb often. The participant also"
    prefix = R.LocalTeacher(None, None, "t", prefill=True)._prefix(inst)
    assert R._first_sentence_end(prefix, new) == new.index("often.") + len("often.")
    assert R._first_sentence_end(prefix, new.replace("\u00ab", "\u201e").replace("\u00bb", "\u201c")) == \
        new.index("often.") + len("often.")
    Tok = _fake_tok(lambda rows: [new] * len(rows))

    class Model:
        device = "cpu"

        def generate(self, input_ids, max_new_tokens, **kw):       # stopped at the limit (no EOS)
            return torch.cat([input_ids, torch.full((len(input_ids), max_new_tokens), 5)], dim=1)

    out = R.LocalTeacher(Model(), Tok(), "t", prefill=True, max_new_tokens=4).answer([inst], 0)[0]
    assert out.problem is None and out.endswith("often."), out
    assert R.validate(out, 2, inst.dialogue, evidence=inst.evidence) is None


SAMPLE = ("She compares weekdays vs. weekends. She said \u201eI sleep. Badly\u201c most nights. \u00abI wake. Early\u00bb "
          "she adds! \"It is hard. Always\" she says? 3.5 hours. It is hard")


def _teacher_ends(text: str) -> list[int]:
    """Every sentence end the teacher's rule finds, asked again after each one."""
    out, start = [], 0
    while (k := R._first_sentence_end(text[:start], text[start:])) is not None:
        out.append(start + k - 1)
        start += k
    return out


def _parser_ends(text: str) -> list[int]:
    """Every sentence end the parser's rule finds, asked again before each one."""
    out = []
    while (k := P._last_sentence_end(text)) >= 0:
        out.insert(0, k)
        text = text[:k]
    return out


def test_the_parser_and_the_teacher_share_one_sentence_end_rule():
    expected = [SAMPLE.index("weekends.") + 8, SAMPLE.index("nights.") + 6, SAMPLE.index("adds!") + 4,
                SAMPLE.index("says?") + 4, SAMPLE.index("hours.") + 5]
    assert _parser_ends(SAMPLE) == expected            # not "vs.", "3.5" nor inside „...“, «...», "..."
    assert _teacher_ends(SAMPLE) == expected           # the teacher took "vs." and the ends inside „...“ and «...»
    assert Q.sentence_ends(SAMPLE) == expected
    for text in (SAMPLE, SAMPLE + ".", "No end here", "Es ist \u201eschwer. Immer\u201c so. Und", "一晚没睡。然后"):
        ends = Q.sentence_ends(text)
        assert P._last_sentence_end(text) == (ends[-1] if ends else -1), text
        for start in range(len(text) + 1):
            later = [k for k in ends if k >= start]
            assert R._first_sentence_end(text[:start], text[start:]) == \
                (later[0] - start + 1 if later else None), (text, start)
