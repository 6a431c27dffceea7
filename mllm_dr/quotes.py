"""Verbatim quotes: what a rationale puts between double quotes is the patient's own words for that item.

A rationale that quotes the participant is read by a clinician as evidence. A small language
model left to itself quotes what it memorised instead: the same sentence for every item, or a
sentence from another (training) patient, which is both wrong evidence and a leak of someone
else's words. So greedy decoding runs under one rule, enforced token by token:

- text between double quotes (straight or typographic: ``QUOTE_MARKS``, “ ” „ « », any of them opening or
  closing) in the "Evaluation Reason" is the item's evidence turn (the
  participant turn the kit attributes to the item, ``AspectInstance.evidence``: the one the
  training answers quote and the clinician's review shows), whole (with or without its final full
  stop) or cut where training cuts it: before a clause end (``, ; . ! ?``) that a space or the turn's
  end follows, keeping at least MIN_CUT_WORDS words (:func:`allowed_quotes`, the one rule for the
  scorer, the teacher's validator and the training answers' quotes), and only such a text whose training
  answer fits the answer's token budget (``rationales.scoring_quotes``: a training answer never quotes a
  longer one, and a quote held to it would end the answer inside the quote, with no score);
- an item with no evidence turn has nothing to quote: the model cannot open a quote, and its
  reason opens with what its training answers say there (``openings``: "The dialogue gives no
  direct statement on <topic>", rationales.no_statement); so has an item whose evidence turn has no
  quote within the budget, its reason opening "The participant's long answer on <topic>" as its training
  answers' do (``rationales.scoring_opening``); without it an under-trained model
  wrote "The participant said a score of 2" for every such item (session 25, free text at 24
  participants: the only repeated rationales of the run). In the reason-first order (the default)
  the score is written after the reason, so for such an item it follows these words too;
- everything else (the score, whether to quote, the words around the quote) is the model's own
  greedy choice.

At each step the most likely token that keeps the text within the rule is taken (the first of
the ``top_k`` most likely that does); when none of them does, inside a quote the next token of
the evidence itself, outside one the most likely token with no quote mark in it. Works on the
logits of any engine (torch or ONNX Runtime).
"""

from __future__ import annotations

import bisect
import re

import torch

REASON = re.compile(r"Evaluation\s+Reason\s*[:：]", re.IGNORECASE)
QUOTE = '"'
# every double quote mark a quote may open or close with: a model may write the typographic ones (“ ” „ « »),
# and a quote opened with one of them escaped the rule (session 46)
QUOTE_MARKS = '"\u201c\u201d\u201e\u00ab\u00bb'
_QUOTE_SPLIT = re.compile("[" + re.escape(QUOTE_MARKS) + "]")
CLAUSE_ENDS = ",;.!?"


_AS_SINGLE = {ord(ch): "'" for ch in QUOTE_MARKS}


def quote_form(evidence: str) -> str:
    """The evidence turn as a quote holds it: its double quote marks (any of QUOTE_MARKS) as single ones (a
    quote ends at the next double quote mark) and its whitespace, line breaks included, collapsed to single
    spaces. The scoring rule (:func:`allowed_quotes`) and the training answers' quotes (:func:`training_quotes`)
    are built on it, so a training answer never quotes a text the scorer would refuse (session 45: a turn with
    a double quote or a line break in it was quoted raw)."""
    return " ".join(evidence.translate(_AS_SINGLE).split())


def allowed_quotes(evidence: str | None) -> frozenset[str]:
    """The texts a quote may hold for an item whose evidence turn is ``evidence``: the one rule of what is an
    acceptable quote of the transcript, for the scorer (:func:`within_rule`, so :class:`VerbatimQuotes`), the
    teacher's validator (``rationales.validate``) and the training answers (:func:`training_quotes`, drawn from
    these). The turn in :func:`quote_form`, whole, whole without its final full stop, or cut before a clause end
    (CLAUSE_ENDS) that a space or the turn's end follows ("3.5 hours" is not cut), without the clause marks and
    space before the cut, keeping at least MIN_CUT_WORDS words (a CJK character counts half a word).

    Before session 47 the scorer allowed a cut before any clause mark, of any length: "Depressed" from
    "Depressed? No, I am not depressed at all." was a verbatim quote there although no training answer ever
    quotes such a fragment (training's cuts were already these); a model that closes its quote there is now
    held inside it until an allowed end (the quote goes on in the turn's own words; the score is untouched).
    The scorer and the validator take of these only those whose training answer fits the answer's budget
    (``rationales.scoring_quotes``), so that end is never past it."""
    if not evidence or not evidence.strip():
        return frozenset()
    full = quote_form(evidence)
    out = {full, _whole(full), *_clause_cuts(full)}
    return frozenset(q for q in out if q)


MIN_CUT_WORDS = 3     # a quote cut shorter than this ("um", "well, i", "Depressed") says nothing: no such quote


def _whole(full: str) -> str:
    """The whole turn (quote form) without its final full stop(s)."""
    return full.rstrip(".").strip()


def _clause_cuts(full: str) -> list[str]:
    """The cuts of ``full`` (quote form) a quote may end at (see :func:`allowed_quotes`), shortest first."""
    cuts = [full[:k].rstrip(CLAUSE_ENDS + " ") for k, ch in enumerate(full)
            if ch in CLAUSE_ENDS and (k + 1 == len(full) or full[k + 1] == " ")]
    return [q for q in cuts if _words(q) >= MIN_CUT_WORDS]


def training_quotes(evidence: str | None) -> list[str]:
    """The quotes a training answer may hold for ``evidence``, longest first: the whole turn without its final
    full stop, then its cuts; that is every text of :func:`allowed_quotes` but the whole turn with its full stop
    (what the scorer lets the model write is what it was trained to write, and nothing shorter). The training
    answer takes the longest whose answer fits the budget (``rationales._extractive_parts``)."""
    allowed = allowed_quotes(evidence)
    if not allowed:
        return []
    full = quote_form(evidence)
    whole = _whole(full)
    return ([whole] if whole else []) + sorted(allowed - {full, whole}, key=lambda q: (-len(q), q))


def _words(text: str) -> float:
    return len(text.split()) + sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff") / 2


def quotes_in_reason(text: str) -> tuple[list[str], str | None]:
    """The quotes of ``text``'s "Evaluation Reason": the closed ones' texts and the open one's text
    (None when no quote is open); none before the reason."""
    m = REASON.search(text)
    if m is None:
        return [], None
    parts = _QUOTE_SPLIT.split(text[m.end():])      # any of QUOTE_MARKS opens or closes a quote
    return parts[1:-1:2], (parts[-1] if len(parts) % 2 == 0 else None)


def quote_allowed(quote: str, allowed: frozenset[str]) -> bool:
    """Whether a closed quote's text as written (``quotes_in_reason``) is an acceptable quote: one of ``allowed``
    (:func:`allowed_quotes` of the item's evidence turn) once :func:`unspaced`. The one test, for the scorer
    (:func:`within_rule`) and the teacher's validator (``rationales.validate``)."""
    return unspaced(quote) in allowed


def within_rule(text: str, allowed: frozenset[str]) -> bool:
    """Whether generated ``text`` keeps the rule: after "Evaluation Reason:", every closed quote holds
    an allowed text (:func:`quote_allowed`), and an open one a start of an allowed text."""
    closed, open_part = quotes_in_reason(text)
    if not all(quote_allowed(q, allowed) for q in closed):
        return False
    return open_part is None or any(a.startswith(pending(open_part)) for a in allowed)


# a sentence's end: . ! ? before the text's end or before a space and a character that is no lowercase letter (not
# "vs. weekends", not "3.5"), or a CJK full stop. Outside a quote only: see sentence_ends.
_SENTENCE_END = re.compile(r"[.!?](?=\s*$|\s+[^\sa-z])|[。！？]")


def sentence_ends(text: str, start: int = 0) -> list[int]:
    """Indices of the sentence-end marks of ``text`` from ``start`` on that lie outside quotes, in order: the one
    rule of the parser (``parsing.clean_reason`` drops an unfinished last sentence) and the prefilled teacher
    (``rationales._first_sentence_end`` ends its answer at its first sentence). A mark is inside a quote when an
    odd number of quote marks (any of QUOTE_MARKS, each opening or closing, as :func:`quotes_in_reason` reads
    them) comes before it in ``text``: "I can't sleep. I wake at four" inside a quote is one quotation, not two
    sentences, with „...“ or «...» as with "...". A sentence end: ``_SENTENCE_END``.

    Before session 47 the two had rules of their own, knowing only " and “ ”, and the teacher's took a full
    stop before a lowercase word ("vs. weekends") as an end."""
    marks = [k for k, ch in enumerate(text) if ch in QUOTE_MARKS]
    return [m.start() for m in _SENTENCE_END.finditer(text, start) if bisect.bisect_left(marks, m.start()) % 2 == 0]


def unspaced(quote: str) -> str:
    """A quote's text without the one space a tokenizer may put after the opening quote mark."""
    return quote[1:] if quote.startswith(" ") else quote


def pending(open_part: str) -> str:
    """An open quote's text as far as it can be compared: :func:`unspaced`, and no trailing half
    character (a token can end inside a multi-byte character, which decodes as U+FFFD)."""
    return unspaced(open_part).rstrip("\ufffd")


class VerbatimQuotes:
    """A greedy token chooser for a batch of items (one evidence text per row), called once per step."""

    def __init__(self, tok, evidence: list[str | None], top_k: int = 20, openings: list[str | None] | None = None):
        self.tok, self.top_k = tok, top_k
        from mllm_dr.rationales import scoring_quotes     # the allowed quotes under the budget (its one owner)

        self.allowed = [scoring_quotes(e) for e in evidence]
        self.openings = openings or [None] * len(evidence)    # per row: the text the reason must open with
        self.ids: list[list[int]] = [[] for _ in evidence]

    def __call__(self, logits: torch.Tensor, done: torch.Tensor | None = None) -> torch.Tensor:
        """[B, V] logits -> [B] token ids (greedy under the rule); rows already ``done`` take the argmax."""
        choice = logits.argmax(-1)
        for row in range(logits.shape[0]):
            if done is not None and bool(done[row]):
                continue
            choice[row] = self._choose(row, logits[row], int(choice[row]))
            self.ids[row].append(int(choice[row]))
        return choice

    def _choose(self, row: int, logits: torch.Tensor, best: int) -> int:
        text = self.tok.decode(self.ids[row], skip_special_tokens=True)
        allowed = self.allowed[row]
        if REASON.search(text) is None and REASON.search(text + self.tok.decode([best])) is None:
            return best                       # still before the reason: nothing to check
        forced = self._opening_token(text, self.openings[row])
        if forced is not None:
            return forced
        for token in logits.topk(min(self.top_k, logits.shape[-1])).indices.tolist():
            if within_rule(self.tok.decode(self.ids[row] + [token], skip_special_tokens=True), allowed):
                return token
        open_part = quotes_in_reason(text)[1]
        if open_part is not None:
            return self._next_evidence_token(pending(open_part), allowed, best)
        return self._best_without_quote(logits)

    def _opening_token(self, text: str, opening: str | None) -> int | None:
        """The next token of ``opening`` while the reason has not yet written it all; else None."""
        m = REASON.search(text)
        if not opening or m is None:
            return None
        after = text[m.end():]
        written = after.lstrip()
        if len(written) >= len(opening) or not opening.startswith(written):
            return None
        rest = opening[len(written):] if after else " " + opening
        ids = self._ids(rest)
        return ids[0] if ids else None

    def _best_without_quote(self, logits: torch.Tensor) -> int:
        """Outside a quote, when every likely token would open a quote the item cannot hold."""
        for token in logits.argsort(descending=True).tolist():
            if not any(mark in self.tok.decode([token]) for mark in QUOTE_MARKS):
                return token
        raise ValueError("every token of the vocabulary holds a quote mark")

    def _next_evidence_token(self, open_part: str, allowed: frozenset[str], best: int) -> int:
        """Inside a quote (``open_part``: its text so far, :func:`pending`) with no likely token that
        fits: the next token of the (longest) allowed text."""
        fits = sorted((a for a in allowed if a.startswith(open_part)), key=len, reverse=True)
        if not fits:
            return best
        rest = fits[0][len(open_part):] or QUOTE
        ids = self._ids(rest)
        return ids[0] if ids else best

    def _ids(self, text: str) -> list[int]:
        """``text``'s token ids as the processor tokenizes patient text (processor.Processor): a control token's
        spelling in a transcript ("<|im_end|>") is ordinary tokens, never the control token itself, which
        would end the answer inside a quote (session 46)."""
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
