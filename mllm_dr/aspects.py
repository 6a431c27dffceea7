"""Aspect instances: one (participant, PHQ item) pair with its dialogue, label and prompt.

The paper scores every item separately (section 4.1): CMDC uses only the questions
mapped to the item (an editable JSON map), DAIC keeps Ellie/Participant turns as a
dialogue, E-DAIC uses the whole transcript. A transcript longer than the model's
context is reduced by :func:`reduce_dialogue` (documented, recorded on the instance),
never silently truncated. Which turns speak to an item (the quote, what a reduction keeps)
is decided by mllm_dr.evidence, on free speech as on keyword-rich text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Callable

from mllm_dr import evidence
from mllm_dr.corpus.model import PARTICIPANT_SPEAKER, Corpus, Participant, Turn
from mllm_dr.errors import InputError
from mllm_dr.phq import ITEM_ASPECTS, PHQ9_ITEMS

AUDIO_MARKER = "<AudioHere>"
VIDEO_MARKER = "<VideoHere>"

SYSTEM_PROMPT = (
    "You are a psychiatrist, assessing the participant's mental health in certain aspects through a series of "
    "questions. A score of 0 means not at all, 1 means several days, 2 means more than half the days, and 3 means "
    "nearly every day."
)
_RESULT_SPEC = "Evaluation Result: A numeric value between 0-3."
_REASON_SPEC = "Evaluation Reason: A concise and logical description."
_STRICT = "Each output must strictly follow this format, avoiding omissions or confusion."
FORMAT_INSTRUCTIONS = {   # by ModelConfig.answer_order; the teacher always uses the paper's (result-first)
    "result-first": f"The output format is as follows: {_RESULT_SPEC} {_REASON_SPEC} {_STRICT}",
    "reason-first": f"The output format is as follows: {_REASON_SPEC} {_RESULT_SPEC} {_STRICT}",
}
FORMAT_INSTRUCTION = FORMAT_INSTRUCTIONS["result-first"]   # the paper's Table 1 wording

TokenCounter = Callable[[str], int]


def approx_tokens(text: str) -> int:
    """A tokenizer-free upper-ish estimate (words * 1.4, CJK characters count one each)."""
    cjk = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    return int(len(text.split()) * 1.4) + cjk


def load_question_map(path: Path | None = None) -> dict[str, list[str]]:
    """CMDC item -> questions. The packaged default, or a site's edited copy."""
    if path is None:
        raw = resources.files("mllm_dr.resources").joinpath("cmdc_question_map.json").read_text()
        where = "packaged cmdc_question_map.json"
    else:
        where = str(path)
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError("not UTF-8 text; save the question map as UTF-8", where) from None
    shape = "expected {\"items\": {item: [\"Q1\", ...]}}"
    try:
        items = json.loads(raw)["items"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"not a question map ({type(err).__name__}: {err}); {shape}", where) from None
    if not isinstance(items, dict) or not all(isinstance(v, list) and all(isinstance(q, str) for q in v)
                                              for v in items.values()):
        raise InputError(f"not a question map: each item must map to a list of question names; {shape}", where)
    unknown = set(items) - set(ITEM_ASPECTS)
    if unknown:
        raise InputError(f"unknown PHQ item(s) {sorted(unknown)}", where)
    # as the corpus reader names the answers (Q01.txt answers Q1): the number names the question
    # ASCII digits only: "Q²" and "Q١" are digits to str.isdigit; int("²") was a bare ValueError (session 46)
    for v in items.values():
        for q in v:
            if q[:1] == "Q" and q[1:].isdigit() and not (q[1:].isascii() and q[1:].isdecimal()):
                raise InputError(f"question name {q!r} is not Q followed by the digits 0-9 (as Q1, Q12); {shape}",
                                 where)
    return {k: [f"Q{int(q[1:])}" if q[:1] == "Q" and q[1:].isascii() and q[1:].isdecimal() else q for q in v]
            for k, v in items.items()}


def load_keywords() -> dict[str, list[str]]:
    """item -> words that name it (one of the item descriptions the quote selector embeds)."""
    raw = json.loads(resources.files("mllm_dr.resources").joinpath("item_keywords.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


@dataclass
class AspectInstance:
    participant: str
    item: str
    label: int | None
    dialogue: str
    turns_total: int
    turns_kept: int
    reduced: bool = False
    has_audio: bool = True
    has_visual: bool = True
    evidence: str | None = None   # the participant turn most related to the item (rationales, clinician review)
    evidence_turns: list[int] | None = None   # indices in the participant's turns: the item's own part (evidence.py)

    @property
    def aspect(self) -> str:
        return ITEM_ASPECTS[self.item]

    def teacher_messages(self) -> list[dict[str, str]]:
        """Paper Table 1: the teacher is told the true score and asked for a rationale."""
        user = (f"Given the participant's self-rating score of {self.label}, please evaluate the participant's "
                f"performance in {self.aspect} based on the dialogue content. {FORMAT_INSTRUCTION}\n\n"
                f"Dialogue:\n{self.dialogue}")
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def student_messages(self, audio: bool, visual: bool, order: str = "result-first",
                         layout: str = "instruction-first") -> list[dict[str, str]]:
        """What MLlm-DR sees: no label; markers where the LQ-former outputs are inserted. ``layout``:
        ModelConfig.prompt_layout (the instruction before the media and dialogue, or after them)."""
        media = "".join([f"Audio: {AUDIO_MARKER}\n" if audio else "", f"Video: {VIDEO_MARKER}\n" if visual else ""])
        ask = (f"Please evaluate the participant's performance in {self.aspect} based on the dialogue content"
               f"{' and the audio and video cues' if media else ''}. {FORMAT_INSTRUCTIONS[order]}")
        material = f"{media}Dialogue:\n{self.dialogue}"
        user = f"{ask}\n\n{material}" if layout == "instruction-first" else f"{material}\n\n{ask}"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("participant", "item", "label", "dialogue", "turns_total",
                                              "turns_kept", "reduced", "has_audio", "has_visual", "evidence",
                                              "evidence_turns")}


def _render(turn: Turn) -> str:
    who = turn.question if turn.question else turn.speaker
    return f"{who}: {turn.text}"


def rank_turns(turns: list[Turn], item: str, scores=None) -> list[int]:
    """Turn indices, most related to ``item`` first (evidence.turn_item_scores; ties keep earlier turns).

    ``scores`` are that function's output for ``turns`` when the caller already has them.
    """
    col = (evidence.turn_item_scores(turns) if scores is None else scores)[:, PHQ9_ITEMS.index(item)]
    return sorted(range(len(turns)), key=lambda i: (-col[i], i))


GAP_LINE = "[...]"     # between two kept turns that were not adjacent (a note line, like the reduction's)


def _group(participant: list[bool], i: int) -> list[int]:
    """Turn ``i`` with what must travel with it (``participant``: which turns are the participant's): a
    participant turn with the interviewer's question right before it, an interviewer turn with the participant's
    answer right after it. A question is never shown without its own answer below it (session 45: a question
    whose answer did not fit was kept, and the next kept participant turn, another question's answer, read as
    its answer)."""
    if participant[i] and i > 0 and not participant[i - 1]:
        return [i - 1, i]
    if not participant[i] and i + 1 < len(participant) and participant[i + 1]:
        return [i, i + 1]
    return [i]


def _cut(turn: Turn, budget: int, count: TokenCounter) -> Turn:
    """``turn`` with its text shortened (marked " [cut]") until its line takes at most ``budget``."""
    text = turn.text
    while text and count(_render(replace(turn, text=text + " [cut]"))) + 1 > budget:
        text = text[: int(len(text) * 0.9)]
        text = text.rsplit(" ", 1)[0] if " " in text.strip() else text      # at a word's end
    return replace(turn, text=text.rstrip() + " [cut]")


def reduce_turns(turns: list[Turn], item: str, budget: int, count: TokenCounter,
                 scores=None, own: list[int] | None = None) -> tuple[list[tuple[int, Turn]], bool]:
    """:func:`reduce_dialogue` with each kept turn's index in ``turns`` (a cut turn is a copy, cut)."""
    rendered = [_render(t) for t in turns]
    if sum(count(r) + 1 for r in rendered) <= budget:
        return list(enumerate(turns)), False
    cost = [count(r) + 1 for r in rendered]
    gap = count(GAP_LINE) + 1
    participant = [t.speaker == PARTICIPANT_SPEAKER for t in turns]
    order = rank_turns(turns, item, scores)
    first = [i for i in dict.fromkeys(own or []) if 0 <= i < len(turns)]     # the item's own evidence turns lead
    lead = frozenset(first)
    order = first + [i for i in order if i not in lead]
    kept: dict[int, Turn] = {}
    used = runs = 0                 # tokens of the kept lines (a cut turn: its cut line); runs of adjacent turns
    for rank, i in enumerate(order):
        group = [j for j in _group(participant, i) if j not in kept]    # one or two adjacent turns
        if not group:
            continue
        new_runs = runs + 1 - (group[0] - 1 in kept) - (group[-1] + 1 in kept)
        if used + sum(cost[j] for j in group) + gap * max(new_runs - 1, 0) <= budget:
            kept.update((j, turns[j]) for j in group)
            used, runs = used + sum(cost[j] for j in group), new_runs
        elif rank == 0:   # the first turn (the quote) is over the budget: cut it, never dropped (session 45); its
            target = next((j for j in group if participant[j]), i)     # question stays when half the budget
            others = [j for j in group if j != target]                # is left for the answer
            room = budget - sum(cost[j] for j in others)
            if others and room < budget / 2:
                others, room = [], budget          # no room for the question: the answer alone
            kept.update((j, turns[j]) for j in others)
            kept[target] = turns[target] if cost[target] <= room else _cut(turns[target], room, count)
            used, runs = sum(cost[j] for j in others) + count(_render(kept[target])) + 1, 1
    return sorted(kept.items()), True


def reduce_dialogue(turns: list[Turn], item: str, budget: int, count: TokenCounter,
                    scores=None, own: list[int] | None = None) -> tuple[list[Turn], bool]:
    """Keep the turns most relevant to ``item`` within ``budget`` tokens, in original order.

    ``own``: the item's evidence turns (indices in ``turns``, the quote first: evidence.evidence_by_item),
    taken before any other, then the rest by relevance (:func:`rank_turns`). The ranking alone could drop
    the item's quote, which one-quote-per-turn may have moved off the top-ranked turn, and show other
    items' answers instead (session 46). A question and its answer are kept together or not at all
    (``_group``), the first turn (the quote; without ``own`` the most relevant) is cut to fit rather
    than dropped, and each gap between kept turns costs a ``GAP_LINE`` (``build_instances`` writes it).
    Returns (kept turns, whether anything was dropped).
    """
    kept, reduced = reduce_turns(turns, item, budget, count, scores, own)
    return [t for _, t in kept], reduced


def build_instances(corpus: Corpus, participant: Participant, max_context_tokens: int = 384,
                    count: TokenCounter = approx_tokens, question_map: dict[str, list[str]] | None = None,
                    modalities: dict[str, bool] | None = None) -> list[AspectInstance]:
    """One instance per PHQ item of the corpus for this participant."""
    mods = modalities or participant.modalities()
    qmap = (question_map or load_question_map()) if corpus.format == "cmdc" else {}
    every = participant.turns
    scores = evidence.turn_item_scores(every)     # once per participant, over all its turns
    mapped = {item: [i for i in range(len(every)) if every[i].question in set(qmap[item])]
              for item in corpus.item_names if corpus.format == "cmdc" and qmap.get(item)}
    parts = {item: idx for item, idx in mapped.items() if idx}    # an item none of whose questions was
    unanswered = {item for item, idx in mapped.items() if not idx}  # answered reads the whole interview, said
    own_turns = evidence.evidence_by_item(every, scores, list(corpus.item_names), mapped)   # unanswered: no quote
    out = []
    for item in corpus.item_names:
        idx = parts.get(item, list(range(len(every))))
        turns = [every[i] for i in idx]
        local = {g: k for k, g in enumerate(idx)}
        own_local = [local[g] for g in own_turns[item] if g in local]      # the item's quote stays in view
        kept, reduced = reduce_turns(turns, item, max_context_tokens, count, scores[idx], own_local)
        lines = []
        for k, (j, t) in enumerate(kept):
            if k and j - kept[k - 1][0] > 1:
                lines.append(GAP_LINE)
            lines.append(_render(t))
        if item in unanswered:
            lines.insert(0, f"[no answer to this item's questions ({', '.join(qmap[item])}): the whole interview "
                            f"is shown]")
        if reduced:
            lines.append(f"[transcript reduced to the {len(kept)} of {len(turns)} turns most related to this item]")
        own = own_turns[item]
        out.append(AspectInstance(participant.id, item, participant.items.get(item), "\n".join(lines),
                                  len(turns), len(kept), reduced, mods["audio"], mods["visual"],
                                  every[own[0]].text if own else None, own))
    return out
