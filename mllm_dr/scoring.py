"""Scoring one participant: all items in one batch, parse, fall back to MAA, total and band."""

from __future__ import annotations

from dataclasses import dataclass

from mllm_dr import phq
from mllm_dr.model import Example, MLlmDR
from mllm_dr.parsing import parse_answer


@dataclass
class ItemScore:
    item: str
    score: int
    rationale: str
    source: str              # "generated" | "regression"
    regression_score: float
    raw_text: str

    def to_dict(self) -> dict:
        return {"item": self.item, "score": self.score, "rationale": self.rationale, "source": self.source,
                "regression_score": round(self.regression_score, 4)}


def score_examples(model: MLlmDR, exs: list[Example], max_new_tokens: int = 80) -> list[ItemScore]:
    batch = model.collate(exs, left_pad=True)
    texts, reg = model.generate(batch, max_new_tokens=max_new_tokens)
    out = []
    for ex, text, r in zip(exs, texts, reg.tolist()):
        parsed = parse_answer(text)
        if parsed.well_formed:
            out.append(ItemScore(ex.instance.item, parsed.score, parsed.reason, "generated", r, text))
        else:
            fallback = int(min(max(round(r), phq.MIN_ITEM), phq.MAX_ITEM))
            out.append(ItemScore(ex.instance.item, fallback,
                                 f"[format not followed; regression head score {r:.2f} used]", "regression", r, text))
    return out


def summarize(participant: str, items: list[ItemScore], base_name: str, adapters: str, is_test_model: bool) -> dict:
    total = sum(i.score for i in items)
    out = {"participant": participant, "base_model": base_name, "adapters": adapters,
           "items": [i.to_dict() for i in items], "total": total, "band": phq.band(total), "binary": phq.binary(total)}
    if is_test_model:
        out["warning"] = "tiny-random test model: scores are meaningless"
    return out
