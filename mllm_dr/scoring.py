"""Scoring one participant: all items in one batch, parse, fall back to MAA, total and band."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mllm_dr import phq
from mllm_dr.adapters import SiteModel
from mllm_dr.config import DEFAULT_SCORING
from mllm_dr.errors import MllmDrError
from mllm_dr.generation import end_token_ids
from mllm_dr.metrics import round_half_up
from mllm_dr.parsing import parse_answer
from mllm_dr.processor import Example
from mllm_dr.quotes import VerbatimQuotes
from mllm_dr.rationales import scoring_opening


@dataclass
class ItemScore:
    item: str
    score: int
    rationale: str
    source: str              # "generated" | "regression"
    regression_score: float
    raw_text: str
    # whether the item's dialogue holds a statement of the participant's on it (an evidence turn): an item with
    # none is scored all the same, and the clinician is told (clinician.annotate; session 46). None: not known
    has_evidence: bool | None = None

    def to_dict(self) -> dict:
        out = {"item": self.item, "score": self.score, "rationale": self.rationale, "source": self.source,
               "regression_score": round(self.regression_score, 4)}
        if self.has_evidence is not None:
            out["has_evidence"] = self.has_evidence
        return out


def shown_regression(regression: float) -> float:
    """The regression (MAA) head's value as the kit shows it, to 2 decimals: the figure ``regression_text``
    prints in the rationale, the HTML page and the terminal. Rounded from the 4 decimals an item keeps
    (``ItemScore.to_dict``), so the raw value and the kept one always show alike (session 44)."""
    return round(round(regression, 4), 2)


def regression_text(regression: float) -> str:
    """The regression head's value as text beside a fallback score ("2.50"): the one format (session 44)."""
    return f"{shown_regression(regression):.2f}"


def fallback_score(regression: float) -> int:
    """The regression (MAA) head's item score as the kit reports it: the value as shown (``shown_regression``)
    rounded half up into 0..3. Python's round() sent 2.5 to 2 beside a rationale saying "2.50" (session 42);
    rounding the raw value put 2 beside "2.50" for 2.4963 (session 44): the score is the shown figure's."""
    return int(min(max(round_half_up(shown_regression(regression)), phq.MIN_ITEM), phq.MAX_ITEM))


class HeadValueError(MllmDrError):
    """The regression (MAA) head gave a non-finite value: no score is given (see ``checked_head``)."""


def checked_head(value: float, participant: str, item: str) -> float:
    """The regression head's value, or HeadValueError naming the participant and item when it is NaN or infinite
    (``fallback_score(nan)`` raised a bare ValueError: a review, session 45). Not left out of the total, not
    scored 0: a total without an item, or with a 0 the model never gave, reads as a lower severity than the
    participant may have, and a band or binary call from it could miss depression. A non-finite head means
    weights that diverged (the trunk is shared with the generated answers), so the run stops, saying why."""
    if not math.isfinite(value):
        raise HeadValueError(f"participant {participant}, item {item}: the regression head gave {value} (not a "
                             f"number); the model's weights are likely broken (diverged training), so no score is "
                             f"given: retrain, or use the adapters before this run")
    return value


def score_examples(sm: SiteModel, exs: list[Example], max_new_tokens: int, engine=None,
                   verbatim_quotes: bool = DEFAULT_SCORING.verbatim_quotes) -> list[ItemScore]:
    """Greedy answers for a participant's items in one left-padded batch; a broken format falls back
    to the regression head's score, rounded into 0..3 (and says so in the rationale).

    ``engine`` computes the answers (``generate(batch, ...)``, see onnx_engine.py): the torch
    model itself by default, or its ONNX Runtime export; parsing and fallback stay here.
    ``verbatim_quotes``: a rationale may quote only the item's evidence turn (quotes.py)."""
    batch = sm.processor.collate(exs, left_pad=True)
    tok = sm.processor.tok
    choose = VerbatimQuotes(tok, [ex.instance.evidence for ex in exs],
                            openings=[scoring_opening(ex.instance.item, ex.instance.evidence) for ex in exs]) \
        if verbatim_quotes else None
    ends = end_token_ids(sm.model.base, tok)          # a chat base's end-of-turn token too (Llama-3's <|eot_id|>)
    ids, reg = (engine or sm.model).generate(batch, max_new_tokens, ends, tok.pad_token_id, choose)
    out = []
    for ex, text, r in zip(exs, sm.processor.decode(ids), reg.tolist()):
        checked_head(r, ex.instance.participant, ex.instance.item)   # every item: its head value feeds maa_*
        parsed = parse_answer(text, sm.processor.config.answer_order)
        if parsed.well_formed:
            out.append(ItemScore(ex.instance.item, parsed.score, parsed.reason, "generated", r, text,
                                 has_evidence=bool(ex.instance.evidence)))
        else:
            out.append(ItemScore(ex.instance.item, fallback_score(r),      # the score of the figure shown
                                 f"[format not followed; regression head score {regression_text(r)} used]",
                                 "regression", r, text, has_evidence=bool(ex.instance.evidence)))
    return out


def summarize(participant: str, items: list[ItemScore], sm: SiteModel) -> dict:
    total = sum(i.score for i in items)
    out = {"participant": participant, "base_model": sm.info.name, "adapters": sm.version,
           "items": [i.to_dict() for i in items], "total": total, "band": phq.band(total), "binary": phq.binary(total)}
    if sm.info.is_test_model:
        out["warning"] = "tiny-random test model: scores are meaningless"
    return out
