"""Clinician review of a scored participant, and the paper's Table 7 figures over all reviews.

A review records, per item, the model's score and where it came from, the clinician's
rating of the rationale (3 fully agree / 2 reasonable / 1 disagree) and an optional
corrected score, and which kept score it rated (``clinician.keep_score``: what ``score`` showed).
Reviews are clinical records: they stay in the workspace (``reviews/reviews.jsonl``, 0600); the
audit log notes who reviewed which participant and the review's sha256, so an edited record shows.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
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
    score_sha256: str | None = None   # the kept score rated (clinician.keep_score); None before session 40
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


def load_reviews(root: Path) -> list[Review]:
    return [r for r, _ in _review_lines(reviews_path(root))]


def _review_lines(path: Path) -> list[tuple[Review, str]]:
    """(review, sha256 of its line) for every review in the file; a one-line error naming the line."""
    if not path.is_file():
        return []
    out = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text (byte {err.start}): a damaged reviews file", path) from None
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                out.append((Review.model_validate_json(line), hashlib.sha256(line.encode("utf-8")).hexdigest()))
            except ValueError:
                raise InputError(f"line {n} is not a valid review", path) from None
    return out


def checked_reviews(ws) -> tuple[list[Review], dict]:
    """(the stored reviews a ``review`` audit entry vouches for, how the reviews file stands against the log).

    ``unaudited_reviews``: lines no entry's ``record_sha256`` names (edited after they were saved, or saved
    before session 40, whose entries carry no hash): left out of the reviews returned. ``missing_reviews``
    (and ``missing_review_entries``, which): entries whose line is gone (deleted; an edited line counts here
    too, as its original). Only entries that verify vouch (signature and chain, ``audit.read_checked``):
    ``audit_log_problem`` says where the log stops verifying, None when it is intact. The reviews come in the
    order of the entries that vouch for them (``seq``), not the file's: ``reviews_out_of_audit_order`` counts
    the lines that stand elsewhere in the file (moved: which review of a clinician is the latest is the log's)."""
    from collections import Counter

    from mllm_dr import audit

    stored = _review_lines(reviews_path(ws.root))
    # only verified entries vouch (a second read, session 42: an unsigned entry naming an edited line did)
    logged, intact, why = audit.read_checked(ws.audit_path)
    entries = [e for e in logged if not e.get("tampered") and e.get("event") == "review"
               and isinstance(e.get("record_sha256"), str)]
    lines, vouched = Counter(sha for _, sha in stored), Counter(e["record_sha256"] for e in entries)
    extra, gone = lines - vouched, vouched - lines       # multisets: a line saved twice is vouched for twice
    kept = [(r, sha) for r, sha in stored if not _take(extra, sha)]
    missing = [{k: e.get(k) for k in ("seq", "time", "actor", "participant", "record_sha256")}
               for e in entries if _take(gone, e["record_sha256"])]
    # in the order the log recorded them (session 46): review_stats keeps each key's last review, and in file order
    # two swapped lines made a replaced review count, unflagged
    seqs: dict[str, list[int]] = {}
    for n, e in enumerate(entries):
        seqs.setdefault(e["record_sha256"], []).append(e["seq"] if isinstance(e.get("seq"), int) else n)
    order = [seqs[sha].pop(0) for _, sha in kept]       # each kept line has its entry: the earliest left
    by_log = sorted(range(len(kept)), key=lambda k: order[k])
    return [kept[k][0] for k in by_log], {
        "unaudited_reviews": len(stored) - len(kept), "missing_reviews": len(missing),
        "missing_review_entries": missing,
        "reviews_out_of_audit_order": sum(k != j for j, k in enumerate(by_log)),
        "audit_log_problem": None if intact else why}


def _take(counts, key) -> bool:
    """Take one ``key`` from the multiset ``counts``; False when there is none left."""
    if counts[key] <= 0:
        return False
    counts[key] -= 1
    return True


def _last_entry_names(log: Path, sha: str) -> bool:
    """Whether the audit log's last entry records the review line ``sha`` (it may have been written just
    before an interruption reached ``record_review``)."""
    from mllm_dr import audit

    try:
        return audit.read(log)[-1].get("record_sha256") == sha
    except (OSError, InputError, IndexError):
        return False


def review_stats(reviews: list[Review]) -> dict:
    """The paper's Table 7 rows, labelled as its table has them: I format violations, II agreement of
    the model's item scores with the clinician's, III RMSE/MAE of the totals (model vs clinician),
    IV share of rationale ratings 3/2/1 over the generated rationales (an item that fell back to the
    regression head shows a placeholder, not a rationale; ``IV_rationales_rated`` counts them). (The
    paper's text lists II and III the other way round; the values in its table are read as here: II <= 1,
    III in PHQ points.) A clinician who reviews the same shown score again replaces their earlier review
    (one participant's ratings counted once per clinician and kept score; ``reviews_replaced`` counts them)."""
    latest = {}
    for r in reviews:                      # in the order given (checked_reviews: the audit log's): the last stays
        latest[(r.participant, r.reviewer, r.score_sha256 or r.adapters)] = r
    replaced, reviews = len(reviews) - len(latest), list(latest.values())
    items = [i for r in reviews for i in r.items]
    if not items:
        return {"reviews": 0, "items": 0}
    totals = [(sum(i.model_score for i in r.items), sum(i.clinician_score for i in r.items)) for r in reviews]
    # IV rates rationales: an item whose text broke the format shows a placeholder, not a rationale
    rated = [i for i in items if i.source != "regression"]
    counts = {k: sum(i.rating == k for i in rated) for k in (3, 2, 1)}
    return {
        "reviews": len(reviews), "reviews_replaced": replaced, "items": len(items),
        "I_format_violations": sum(i.source == "regression" for i in items) / len(items),
        "II_agreement": sum(i.corrected_score is None or i.corrected_score == i.model_score
                            for i in items) / len(items),
        "II_binary_agreement": sum(phq.binary(m) == phq.binary(c) for m, c in totals) / len(totals),
        "III_rmse": math.sqrt(sum((m - c) ** 2 for m, c in totals) / len(totals)),
        "III_mae": sum(abs(m - c) for m, c in totals) / len(totals),
        "IV_ratings_3_2_1": {f"{k} {RATINGS[k]}": (counts[k] / len(rated) if rated else None) for k in (3, 2, 1)},
        "IV_rationales_rated": len(rated),
    }


EXCERPT_CHARS = 600
NOT_IN_DIALOGUE = "[the key quote's turn is not in the dialogue this item was scored from: its end is shown]"


def excerpt(inst) -> tuple[str, str]:
    """What a clinician sees beside an item: its key quote and the part of its dialogue around the quote's own
    turn, the question before it included where it fits (the dialogue's end when there is no quote).

    The turn is found as the line ``aspects.build_instances`` rendered for it ("<speaker or question>: <quote>",
    whole or cut to fit), by ``inst.evidence_turns`` where that line can be told among several alike: a search of
    the quote anywhere took "yes." for the start of "yesterday" and showed an excerpt without the item's question
    or answer (a review, session 46). A quote whose turn is not there says so. The dialogue's leading note
    ("[no answer to this item's questions ...]") is always kept: an excerpt without it read as the item's
    own part."""
    if inst is None:
        return "", ""
    quote, text = inst.evidence or "", inst.dialogue
    note = text.split("\n", 1)[0] if text.startswith("[") and text.split("\n", 1)[0].endswith("]") else ""
    at = _turn_line(text, quote, getattr(inst, "evidence_turns", None), getattr(inst, "reduced", True)) \
        if quote else None
    if len(text) <= EXCERPT_CHARS:
        shown = text
    elif at is None:
        shown = text[-EXCERPT_CHARS:]
    else:
        start, end = at
        before = text.rfind("\n", 0, max(start - 1, 0)) + 1 if start else 0     # the question it answers
        begin = min(start - EXCERPT_CHARS // 3, before) if end - before <= EXCERPT_CHARS else start - EXCERPT_CHARS // 3
        begin = max(0, min(begin, len(text) - EXCERPT_CHARS))
        shown = text[begin:begin + EXCERPT_CHARS]
    if quote and at is None:
        shown = f"{NOT_IN_DIALOGUE}\n{shown}"
    if note and not shown.startswith(note):
        shown = f"{note}\n{shown}"
    return quote, shown


def _turn_line(text: str, quote: str, turns: list[int] | None, reduced: bool) -> tuple[int, int] | None:
    """(start, end) of the dialogue line that renders the quote's turn ("<who>: <quote>", or cut to fit and
    marked " [cut]"), None when there is none. Of several alike ("Participant: yes."), the one at the turn's
    own index when the dialogue is every turn one per line (not reduced), else the first."""
    lines, starts, pos = text.split("\n"), [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line) + 1

    def said(line: str) -> str:
        return line.partition(": ")[2] if ": " in line else ""

    def cut_of(s: str) -> bool:
        kept = s[:-len(" [cut]")].rstrip() if s.endswith(" [cut]") else ""
        return bool(kept) and quote.startswith(kept)

    found = [k for k, line in enumerate(lines) if said(line) == quote] or \
        [k for k, line in enumerate(lines) if cut_of(said(line))]
    if not found:
        inline = text.find(": " + quote)          # a dialogue not rendered one turn a line
        return (inline + 2, inline + 2 + len(quote)) if inline >= 0 else None
    k = found[0]
    if len(found) > 1 and turns and not reduced and turns[0] in found:
        k = turns[0]
    return starts[k], starts[k] + len(lines[k])


def record_review(ws, review: Review) -> dict:
    """Store the review on site and audit who reviewed what, with the stored line's sha256: both or
    neither (the reviews file stays locked until the audit entry is written; a failed entry takes the
    line back, and a failed write leaves no half line)."""
    from mllm_dr import audit
    from mllm_dr.atomic import append_whole
    from mllm_dr.private import open_private, private_dir

    path = reviews_path(ws.root)
    private_dir(path.parent)
    line = review.model_dump_json()
    sha = hashlib.sha256(line.encode("utf-8")).hexdigest()
    with open_private(path, "a") as fh:              # clinical records: owner only (0600)
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            size = os.fstat(fh.fileno()).st_size
            if size:                                  # a line cut short by a crash: never glued to this one
                with open(path, "rb") as r:
                    r.seek(size - 1)
                    if r.read(1) != b"\n":
                        raise InputError("its last line was cut short (a write interrupted): move the file "
                                         "aside or remove that line, then review again", path)
            start = append_whole(fh.fileno(), (line + "\n").encode("utf-8"))
            try:
                audit.append(ws.audit_path, "review", actor=review.reviewer, participant=review.participant,
                             adapter_version=review.adapters, engine=review.engine, items=len(review.items),
                             corrected=sum(i.corrected_score is not None for i in review.items),
                             record_sha256=sha,
                             kept_score_sha256=review.score_sha256)
            except BaseException:                     # no clinical record without its audit entry, unless the
                if not _last_entry_names(ws.audit_path, sha):   # entry was written before the interruption
                    os.ftruncate(fh.fileno(), start)
                raise
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return {"participant": review.participant, "reviewer": review.reviewer, "engine": review.engine,
            "items": len(review.items),
            "ratings": {RATINGS[k]: sum(i.rating == k for i in review.items) for k in (3, 2, 1)},
            "model_total": sum(i.model_score for i in review.items),
            "clinician_total": sum(i.clinician_score for i in review.items)}
