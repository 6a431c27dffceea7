"""Parsing "Evaluation Result: N / Evaluation Reason: ..." answers (paper Table 1)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# one score digit: not a decimal ("2.5", "2,5"; a sentence's full stop, "2.", is no decimal: it fell back to
# the regression head until session 42), and not the start of a range or a hedge ("0-3" echoing the
# prompt, "1-2", "2 or 3", "2/3", "1 to 2", "2 and 3", "1 (or 2)", "1, maybe 2", Unicode dashes), which would
# otherwise read as the lower bound and hide a format violation (the regression head's score is the fallback then).
# Since session 44 a hedge is also a chain of such words ("1 and/or 2", "1 or perhaps 2", "1, maybe 2"), and a bare
# list of scores ("1, 2", "1; 2", "1，2"), which parsed as a well-formed 1; a comma before a detail is not one
# ("2, 3 nights a week" is a 2), and an opening bracket counts only beside a hedge word ("2 (3 days a week)" is a 2).
_HEDGE = r"(?:[-–—‐‑‒−－/~～]|或|到|\b(?:or|to|and|maybe|perhaps|possibly|probably|likely|even)\b)"
_LIST = r"[,;，；、]"
_RESULT = re.compile(r"Evaluation\s+Result\s*[:：]\s*\**\s*([0-3])(?![0-9]|[.,][0-9])"
                     rf"(?![\s*(（]*(?:{_LIST}[\s*(（]*)?(?:{_HEDGE}[\s*(（]*)+[0-9])"     # 1 or 2, 1, maybe 2
                     rf"(?![\s*]*{_LIST}\s*\**[0-3](?![0-9])\**\s*(?:$|[.。)）\n,;，；]))",   # 1, 2
                     re.IGNORECASE | re.MULTILINE)
_REASON = re.compile(r"Evaluation\s+Reason\s*[:：]\s*(.+)", re.IGNORECASE | re.DOTALL)
MIN_REASON_WORDS = 4


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

    @property
    def well_formed(self) -> bool:
        return self.score is not None and self.reason is not None and not self.contradicted


def contradicts(reason: str | None, score: int | None) -> bool:
    """Whether ``reason`` commits to a score other than ``score`` in the training rationales' words (``_STATED``). Such an answer is a format break:
    the rationale would be shown beside a score it argues against (a review, session 44: reason-first answers
    committed to "which fits a score of 2", then wrote "Evaluation Result: 3")."""
    if reason is None or score is None:
        return False
    return any(int(a or b) != score for a, b in _STATED.findall(reason))


def clean_reason(text: str) -> str | None:
    """The first paragraph, without a repeated 'Evaluation Result' block; None when too short."""
    text = re.split(r"\n\s*\n|Evaluation\s+(?:Result|Reason)", text, maxsplit=1, flags=re.IGNORECASE)[0].strip()
    text = " ".join(text.split())
    last_stop = max(text.rfind(". "), text.rfind("。"), text.rfind(".") if text.endswith(".") else -1)
    if last_stop > 0 and not text.endswith((".", "。")):
        text = text[: last_stop + 1]  # drop a sentence cut off by the token limit
    n_words = len(text.split()) + sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff") // 2
    return text if n_words >= MIN_REASON_WORDS else None


def parse_answer(text: str, order: str = "result-first") -> ParsedAnswer:
    """The first score and its reason: the reason after the score (``result-first``, the paper's
    order) or before it (``reason-first``); ``clean_reason`` cuts the reason at the next block.
    A reason stating another score than the result is not well formed (``contradicts``, session 44)."""
    m = _RESULT.search(text)
    score = int(m.group(1)) if m else None
    if order == "reason-first":
        r = _REASON.search(text[:m.start()] if m else text)
    else:
        r = _REASON.search(text[m.end():] if m else text)
    reason = clean_reason(r.group(1)) if r else None
    return ParsedAnswer(score, reason, contradicts(reason, score))


_SCORE_DIGIT = re.compile(r"(?:Evaluation\s+Result|Score)\s*[:：]\s*([0-3])")


def score_char(answer: str) -> int | None:
    """Character index of the score digit in a training answer ("Evaluation Result: N" or "Score: N")."""
    m = _SCORE_DIGIT.search(answer)
    return m.start(1) if m else None


def format_answer(score: int, reason: str, order: str = "result-first") -> str:
    if order == "reason-first":
        return f"Evaluation Reason: {reason}\nEvaluation Result: {score}"
    return f"Evaluation Result: {score}\nEvaluation Reason: {reason}"


def reorder(answer: str, order: str) -> str:
    """A training answer written in the paper's order, in ``order`` (a stage-1 "Score: N" answer as is)."""
    if order == "result-first":
        return answer
    parsed = parse_answer(answer)
    m = _REASON.search(answer)
    if parsed.score is None or m is None:
        return answer
    return format_answer(parsed.score, m.group(1).strip(), order)
