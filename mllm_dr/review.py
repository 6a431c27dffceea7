"""Clinician review of a scored participant, and the paper's Table 7 figures over all reviews.

A review records, per item, the model's score and where it came from, the clinician's
rating of the rationale (3 fully agree / 2 reasonable / 1 disagree) and an optional
corrected score. Reviews are clinical records: they stay in the workspace
(``reviews/reviews.jsonl``); the audit log notes only who reviewed which participant.
"""

from __future__ import annotations

import fcntl
import math
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from mllm_dr import phq
from mllm_dr.errors import InputError

RATINGS = {3: "fully agree", 2: "reasonable", 1: "disagree"}


class ItemReview(BaseModel):
    item: str
    model_score: int = Field(ge=0, le=3)
    source: str                                   # "generated" | "regression"
    rating: int = Field(ge=1, le=3)
    corrected_score: int | None = Field(None, ge=0, le=3)

    @property
    def clinician_score(self) -> int:
        return self.model_score if self.corrected_score is None else self.corrected_score


class Review(BaseModel):
    participant: str
    reviewer: str
    time: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    adapters: str
    engine: str = "torch"        # the scoring engine whose scores were reviewed (score/evaluate --engine)
    items: list[ItemReview]


def reviews_path(root: Path) -> Path:
    return Path(root) / "reviews" / "reviews.jsonl"


def parse_ratings(text: str, items: list[str]) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) != len(items) or any(p not in ("1", "2", "3") for p in parts):
        raise InputError(f"--ratings needs {len(items)} values of 3, 2 or 1 (one per item: {', '.join(items)})")
    return [int(p) for p in parts]


def parse_corrections(text: str | None, items: list[str]) -> dict[str, int]:
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        item, _, value = part.partition("=")
        if item not in items or value not in ("0", "1", "2", "3"):
            raise InputError(f"--corrections: {part!r} is not ITEM=0..3 with ITEM one of {', '.join(items)}")
        out[item] = int(value)
    return out


def save_review(root: Path, review: Review) -> None:
    from mllm_dr.private import open_private, private_dir

    path = reviews_path(root)
    private_dir(path.parent)
    with open_private(path, "a") as fh:              # clinical records: owner only (0600)
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(review.model_dump_json() + "\n")
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)


def load_reviews(root: Path) -> list[Review]:
    path = reviews_path(root)
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(Review.model_validate_json(line))
            except ValueError:
                raise InputError(f"line {n} is not a valid review", path) from None
    return out


def review_stats(reviews: list[Review]) -> dict:
    """The paper's Table 7 rows, labelled as its table has them: I format violations, II agreement of
    the model's item scores with the clinician's, III RMSE/MAE of the totals (model vs clinician),
    IV share of rationale ratings 3/2/1. (The paper's text lists II and III the other way round;
    the values in its table are read as here: II <= 1, III in PHQ points.)"""
    items = [i for r in reviews for i in r.items]
    if not items:
        return {"reviews": 0, "items": 0}
    totals = [(sum(i.model_score for i in r.items), sum(i.clinician_score for i in r.items)) for r in reviews]
    counts = {k: sum(i.rating == k for i in items) for k in (3, 2, 1)}
    return {
        "reviews": len(reviews), "items": len(items),
        "I_format_violations": sum(i.source == "regression" for i in items) / len(items),
        "II_agreement": sum(i.corrected_score is None or i.corrected_score == i.model_score
                            for i in items) / len(items),
        "II_binary_agreement": sum(phq.binary(m) == phq.binary(c) for m, c in totals) / len(totals),
        "III_rmse": math.sqrt(sum((m - c) ** 2 for m, c in totals) / len(totals)),
        "III_mae": sum(abs(m - c) for m, c in totals) / len(totals),
        "IV_ratings_3_2_1": {f"{k} {RATINGS[k]}": counts[k] / len(items) for k in (3, 2, 1)},
    }


EXCERPT_CHARS = 600


def excerpt(inst) -> tuple[str, str]:
    """What a clinician sees beside an item: its key quote and the part of its dialogue around it (the
    dialogue's end when there is no quote, or the quote is not found word for word)."""
    if inst is None:
        return "", ""
    quote, text = inst.evidence or "", inst.dialogue
    at = text.find(quote.rstrip(".")) if quote else -1
    if at < 0 or len(text) <= EXCERPT_CHARS:
        return quote, text[-EXCERPT_CHARS:]
    start = max(0, min(at - EXCERPT_CHARS // 3, len(text) - EXCERPT_CHARS))
    return quote, text[start:start + EXCERPT_CHARS]


def record_review(ws, review: Review) -> dict:
    """Store the review on site, audit who reviewed what, and summarise it."""
    from mllm_dr import audit

    save_review(ws.root, review)
    audit.append(ws.audit_path, "review", actor=review.reviewer, participant=review.participant,
                 adapter_version=review.adapters, engine=review.engine, items=len(review.items),
                 corrected=sum(i.corrected_score is not None for i in review.items))
    return {"participant": review.participant, "reviewer": review.reviewer, "engine": review.engine,
            "items": len(review.items),
            "ratings": {RATINGS[k]: sum(i.rating == k for i in review.items) for k in (3, 2, 1)},
            "model_total": sum(i.model_score for i in review.items),
            "clinician_total": sum(i.clinician_score for i in review.items)}
