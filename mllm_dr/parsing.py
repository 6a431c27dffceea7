"""Parsing "Evaluation Result: N / Evaluation Reason: ..." answers (paper Table 1)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mllm_dr.config import DEFAULT_SCORING
from mllm_dr.quotes import sentence_ends

# one score digit: not a decimal ("2.5", "2,5"; a sentence's full stop, "2.", is no decimal: it fell back to
# the regression head until session 42), and not the start of a range or a hedge ("0-3" echoing the
# prompt, "1-2", "2 or 3", "2/3", "1 to 2", "2 and 3", "1 (or 2)", "1, maybe 2", Unicode dashes), which would
# otherwise read as the lower bound and hide a format violation (the regression head's score is the fallback then).
# Since session 44 a hedge is also a chain of such words ("1 and/or 2", "1 or perhaps 2", "1, maybe 2"), and a bare
# list of scores ("1, 2", "1; 2", "1，2"), which parsed as a well-formed 1; a comma before a detail is not one
# ("2, 3 nights a week" is a 2), and an opening bracket counts only beside a hedge word ("2 (3 days a week)" is a 2).
_HEDGE = r"(?:[-–—‐‑‒−－/~～]|或|到|\b(?:or|to|and|maybe|perhaps|possibly|probably|likely|even)\b)"
_LIST = r"[,;，；、]"
# Since session 45 neither lookahead crosses a line break: "Evaluation Result: 2\n- 3 nights a week" is a 2 (a
# detail on the next line, a list item), where it read as the hedge "2 - 3".
_SP = r"(?:[^\S\r\n]|[*(（])*"           # spaces, bold marks, opening brackets: on the same line
_RESULT = re.compile(r"Evaluation\s+Result\s*[:：]\s*\**\s*([0-3])(?![0-9]|[.,][0-9])"
                     rf"(?!{_SP}(?:{_LIST}{_SP})?(?:{_HEDGE}{_SP})+[0-9])"     # 1 or 2, 1, maybe 2
                     rf"(?!(?:[^\S\r\n]|\*)*{_LIST}[^\S\r\n]*\**[0-3](?![0-9])\**[^\S\r\n]*"   # 1, 2
                     r"(?:$|[.。)）\n,;，；]))",
                     re.IGNORECASE | re.MULTILINE)
_REASON = re.compile(r"Evaluation\s+Reason\s*[:：]\s*(.+)", re.IGNORECASE | re.DOTALL)
_REASON_HEAD = re.compile(r"Evaluation\s+Reason\s*[:：]\s*", re.IGNORECASE)
_BLOCK_END = re.compile(r"\n\s*\n|Evaluation\s+(?:Result|Reason)", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n\s*\n")
MIN_REASON_WORDS = 4
# the format instruction's own words (aspects.FORMAT_INSTRUCTIONS): a reason holding them copied the prompt
# (the 135M teacher did, and an under-trained student can) and is no reason (session 45: the teacher's
# validator refused it, the scorer showed it as a rationale)
ECHOES = ("concise and logical", "numeric value between")

# The most tokens a training answer may take, EOS included: the scoring default's generation budget. An answer
# longer than that is never written whole at scoring, and in the reason-first order its score comes last, so it
# is never written at all (session 45: a long evidence turn quoted whole). The extractive rationale is cut to
# fit (rationales.extractive_rationale), the teacher's validator refuses a longer one, and the processor
# replaces one that its tokenizer still finds longer (processor.Processor). Scoring with fewer new tokens
# (--max-new-tokens) than this can cut a trained answer short.
ANSWER_TOKEN_BUDGET = DEFAULT_SCORING.max_new_tokens


# the score the reason itself commits to, in the training rationales' words (dataset.fallback_rationale: "...,
# which fits a score of 2." / "...; a score of 2 is given."): not any "score of N" (a reason reciting the scale,
# "a score of 0 means not at all", or comparing, "more than a score of 1", states no score of its own)
_STATED = re.compile(r"\bfits\s+a\s+score\s+of\s+([0-3])(?![0-9]|[.,][0-9])"
                     r"|\ba\s+score\s+of\s+([0-3])\s+is\s+given\b", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedAnswer:
    score: int | None
    reason: str | None
    contradicted: bool = False        # the reason states another score than the result (session 44)
    echoed: bool = False              # the reason copies the format instruction (ECHOES, session 45)

    @property
    def well_formed(self) -> bool:
        return self.score is not None and self.reason is not None and not self.contradicted and not self.echoed


def contradicts(reason: str | None, score: int | None) -> bool:
    """Whether ``reason`` commits to a score other than ``score`` in the training rationales' words (``_STATED``). Such an answer is a format break:
    the rationale would be shown beside a score it argues against (a review, session 44: reason-first answers
    committed to "which fits a score of 2", then wrote "Evaluation Result: 3")."""
    if reason is None or score is None:
        return False
    return any(int(a or b) != score for a, b in _STATED.findall(reason))


def first_block(text: str) -> str:
    """The reason's text as written: its first paragraph, up to any next 'Evaluation Result/Reason', with
    whitespace collapsed (what ``contradicts`` and the echo check read; ``clean_reason`` may shorten it)."""
    return " ".join(_BLOCK_END.split(text, maxsplit=1)[0].split())


SENTENCE_ENDS = (".", "。", "!", "?", "！", "？")     # what a finished reason ends with (clean_reason, the teachers')


def _last_sentence_end(text: str) -> int:
    """Index of the last sentence end of ``text`` outside quotes (``quotes.sentence_ends``, the teacher's rule
    too: not "vs. weekends", not "3.5"; "I can't sleep. I wake at four" inside a quote, "...", „...“ or «...»,
    is one quotation, not two sentences); -1 when none."""
    ends = sentence_ends(text)
    return ends[-1] if ends else -1


def clean_reason(text: str, complete: bool = False) -> str | None:
    """The first paragraph, without a repeated 'Evaluation Result' block; None when too short.

    A reason the generation limit may have cut (the paper's order: the reason comes last) loses its
    unfinished last sentence; ``complete``: the reason cannot have been cut (the reason-first order: the
    result follows it), so it is kept whole (session 45)."""
    text = first_block(text)
    if not complete and not text.endswith(SENTENCE_ENDS):
        last_stop = _last_sentence_end(text)
        if last_stop > 0:
            text = text[: last_stop + 1]  # drop a sentence cut off by the token limit
    n_words = len(text.split()) + sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff") // 2
    return text if n_words >= MIN_REASON_WORDS else None


def parse_answer(text: str, order: str = "result-first") -> ParsedAnswer:
    """The first score and its reason: the reason after the score (``result-first``, the paper's
    order) or the last one before it (``reason-first``); ``clean_reason`` cuts the reason at the next block.

    Not well formed (scoring falls back to the regression head, the teacher's validator refuses it): a
    reason stating another score than the result (``contradicts``, read on the reason as written, before
    ``clean_reason`` drops a cut-off sentence), a reason copying the format instruction (``ECHOES``), and an
    answer with two different results (``Evaluation Result: 0 ... Evaluation Result: 3``): no score. A second
    answer after a blank line (a model that went on past its answer) is not read."""
    m = _RESULT.search(text)
    score = int(m.group(1)) if m else None
    if order == "reason-first":
        heads = list(_REASON_HEAD.finditer(text, 0, m.start() if m else len(text)))
        raw = text[heads[-1].end(): m.start() if m else len(text)] if heads else None
        answer_end = m.end() if m else len(text)
    else:
        r = _REASON.search(text[m.end():] if m else text)
        raw = r.group(1) if r else None
        answer_end = (m.end() if m else 0) + (r.start(1) if r else 0)
    if m is not None:
        blank = _BLANK_LINE.search(text, answer_end)
        results = {int(x.group(1)) for x in _RESULT.finditer(text, 0, blank.start() if blank else len(text))}
        if len(results) > 1:
            score = None
    reason = clean_reason(raw, complete=order == "reason-first") if raw is not None else None
    block = first_block(raw) if raw is not None else ""
    echoed = reason is not None and any(e in block.lower() for e in ECHOES)
    return ParsedAnswer(score, reason, contradicts(block or None, score), echoed)


_SCORE_DIGIT = re.compile(r"(?:Evaluation\s+Result|Score)\s*[:：]\s*([0-3])")


def score_char(answer: str) -> int | None:
    """Character index of the score digit in a training answer ("Evaluation Result: N" or "Score: N")."""
    m = _SCORE_DIGIT.search(answer)
    return m.start(1) if m else None


def format_answer(score: int, reason: str, order: str = "result-first") -> str:
    if order == "reason-first":
        return f"Evaluation Reason: {reason}\nEvaluation Result: {score}"
    return f"Evaluation Result: {score}\nEvaluation Reason: {reason}"


_PIECE = re.compile(r"[A-Za-z]+|\n+|\S")


def estimated_answer_tokens(answer: str) -> int:
    """An upper-ish estimate of the tokens ``answer`` and its EOS take, without a tokenizer (the teacher's
    validator and the dataset have none; the processor counts with the model's own, ``ANSWER_TOKEN_BUDGET``):
    a run of ASCII letters 1 + len // 6, a line break 1, any other character 1, or 2 when not ASCII (CJK
    characters take about 2 in SmolLM2's tokenizer). On SmolLM2's tokenizer it is at or above the true count
    for every answer quoting a turn of the synthetic corpora, 6.7 tokens above on average; rare long words
    (names) can be more."""
    n = 1
    for piece in _PIECE.findall(answer):
        if piece[0].isascii() and piece[0].isalpha():
            n += 1 + len(piece) // 6
        elif piece[0] == "\n" or piece.isascii():
            n += 1
        else:
            n += 2
    return n


def fits_budget(answer: str, count=estimated_answer_tokens) -> bool:
    """Whether training answer ``answer`` (either order) takes at most ANSWER_TOKEN_BUDGET tokens (``count``:
    the answer's tokens with its EOS)."""
    return count(answer) <= ANSWER_TOKEN_BUDGET


def reorder(answer: str, order: str) -> str:
    """A training answer written in the paper's order, in ``order`` (a stage-1 "Score: N" answer as is)."""
    if order == "result-first":
        return answer
    parsed = parse_answer(answer)
    m = _REASON.search(answer)
    if parsed.score is None or m is None:
        return answer
    return format_answer(parsed.score, m.group(1).strip(), order)
