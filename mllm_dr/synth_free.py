"""Free-text interviews for the synthetic corpus (``data synth --text free``). NOT clinical data.

The template corpus (synth_text) says one sentence per item score, worded with the item's
own keywords, so keyword-based quote selection cannot fail on it. Real interviews are not
like that: answers are paraphrases ("I'm out like a light" for Sleep 0), hedged ("I guess"),
negated ("it's not that I'm lazy, my batteries are just flat"), separated by small talk
that happens to contain other items' keywords ("he works nights", "traffic downtown is
slow"), and some items are never asked. This module writes such interviews from the phrase
banks in ``resources/synth_free.json`` (several paraphrases per item x score, none
containing its own item's keywords), in random item order, and says which lines answer
which item: the ground truth of the grounding figures (mllm_dr.grounding).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np

from mllm_dr.corpus.model import INTERVIEWER_SPEAKER, PARTICIPANT_SPEAKER

Line = tuple[str, str, str | None]   # (speaker, text, the item this line answers or None)

P_UNASKED = 0.15      # chance that an item is never asked (its label still exists)
MAX_UNASKED = 2
P_SMALL_TALK = 0.6    # chance of a small-talk exchange before each item
P_STALL = 0.2         # chance of a hedge-only participant turn ("hmm, let me think.") before an answer
P_TWO_TURNS = 0.3     # chance that an answer takes two participant turns
P_HEDGE_BEFORE, P_HEDGE_AFTER = 0.4, 0.2
OPENING = "hi, thanks for coming in today."


@lru_cache(maxsize=1)
def banks() -> dict:
    """The phrase banks (one JSON file; sites never edit it: it is test data)."""
    raw = json.loads(resources.files("mllm_dr.resources").joinpath("synth_free.json").read_text(encoding="utf-8"))
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def unasked_items(items: list[str], rng: np.random.Generator) -> set[str]:
    """Items the interviewer never gets to (at most MAX_UNASKED)."""
    drawn = [i for i in items if rng.uniform() < P_UNASKED]
    return set(drawn[:MAX_UNASKED])


def _pick(options: list[str], rng: np.random.Generator) -> str:
    return str(options[int(rng.integers(len(options)))])


def _hedged(phrase: str, rng: np.random.Generator) -> str:
    """Add "I guess ..." / "..., you know." around a phrase, sometimes."""
    b = banks()
    if rng.uniform() < P_HEDGE_BEFORE:
        head = phrase if phrase.startswith(("I ", "I'")) else phrase[0].lower() + phrase[1:]
        phrase = _pick(b["hedges_before_en"], rng) + head
    if rng.uniform() < P_HEDGE_AFTER:
        phrase = phrase.rstrip(".") + _pick(b["hedges_after_en"], rng)
    return phrase


def interview(items: dict[str, int], rng: np.random.Generator, interviewer: bool) -> list[Line]:
    """One English interview: (speaker, text, item) lines in order.

    ``interviewer=False`` leaves the interviewer's lines out (E-DAIC transcripts hold the
    participant only). Answer lines carry their item; small talk and stalls carry None.
    """
    b = banks()
    order = [str(i) for i in rng.permutation(list(items))]
    skipped = unasked_items(order, rng)
    small = [b["small_talk_en"][int(k)] for k in rng.permutation(len(b["small_talk_en"]))]
    lines: list[Line] = [(INTERVIEWER_SPEAKER, OPENING, None)] if interviewer else []

    def ask(text: str) -> None:
        if interviewer:
            lines.append((INTERVIEWER_SPEAKER, text, None))

    for item in order:
        if small and rng.uniform() < P_SMALL_TALK:
            question, answer = small.pop()
            ask(question)
            lines.append((PARTICIPANT_SPEAKER, answer, None))
        if item in skipped:
            continue
        ask(_pick(b["questions_en"][item], rng))
        if rng.uniform() < P_STALL:
            lines.append((PARTICIPANT_SPEAKER, _pick(b["stalls_en"], rng), None))
        options = b["answers_en"][item][str(items[item])]
        n = 2 if rng.uniform() < P_TWO_TURNS else 1
        for k in rng.choice(len(options), size=n, replace=False):
            lines.append((PARTICIPANT_SPEAKER, _hedged(options[int(k)], rng), item))
    return lines


def cmdc_answer(item: str | None, score: int | None, asked: bool, rng: np.random.Generator) -> tuple[str, bool]:
    """The text of one CMDC question file and whether it answers its item.

    Questions mapped to no item get small talk; an unasked item's question gets a
    deflection ("这个不太好说。"), which says nothing about the item.
    """
    b = banks()
    if item is None:
        return _pick(b["small_talk_zh"], rng), False
    if not asked:
        return _pick(b["deflections_zh"], rng), False
    phrase = _pick(b["answers_zh"][item][str(score)], rng)
    if rng.uniform() < P_HEDGE_BEFORE:
        phrase = _pick(b["hedges_before_zh"], rng) + phrase
    return phrase, True
