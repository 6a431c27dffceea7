"""The one evaluator, used by ``mllmdr-site evaluate``, ``score`` and the federated evaluation.

A split's instances and features are built once; each participant's items are scored in
one batch. The result keeps what may leave a site (sufficient statistics, counts) apart
from what may not (the per-participant rows, which stay in the site's report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mllm_dr import progress as prog
from mllm_dr.adapters import SiteModel
from mllm_dr.config import DEFAULT_SCORING
from mllm_dr.corpus.labels import effective_split
from mllm_dr.dataset import examples, instances_by_split, load_corpus
from mllm_dr.errors import InputError
from mllm_dr.grounding import RationaleStats, load_answer_turns, participant_texts
from mllm_dr.metrics import ItemStats, SufficientStats, compute
from mllm_dr.progress import Progress
from mllm_dr.scoring import checked_head, fallback_score, score_examples, shown_regression, summarize
from mllm_dr.workspace import Workspace


@dataclass
class Evaluation:
    """What an evaluation found. Everything but ``rows`` is sufficient statistics (sums and counts):
    it may leave a site, and pooling sites with ``merge`` is exact."""

    stats: SufficientStats = field(default_factory=SufficientStats)   # participant totals
    violations: int = 0                                              # items that fell back to MAA
    items: int = 0
    item_stats: ItemStats = field(default_factory=ItemStats)          # item-level reading
    rationale_stats: RationaleStats = field(default_factory=RationaleStats)   # grounded / repeated / opposite
    head_stats: SufficientStats = field(default_factory=SufficientStats)  # the MAA head's totals, same people
    head_item_stats: ItemStats = field(default_factory=ItemStats)         # ... and its items (the fallback scores)
    rows: list[dict] = field(default_factory=list)                   # per participant: stays on site

    def merge(self, other: "Evaluation") -> None:
        self.stats = self.stats.merge(other.stats)
        self.violations += other.violations
        self.items += other.items
        self.item_stats = self.item_stats.merge(other.item_stats)
        self.rationale_stats = self.rationale_stats.merge(other.rationale_stats)
        self.head_stats = self.head_stats.merge(other.head_stats)
        self.head_item_stats = self.head_item_stats.merge(other.head_item_stats)

    def head_complete(self) -> bool:
        """Whether the MAA head's statistics cover every participant the totals do (a site replies with both
        or with none: ``protocol.EvaluateReply.evaluation``; pooling a site without them leaves a subset)."""
        return self.head_stats.n == self.stats.n

    def metrics(self) -> dict:
        """The kit's answer (generated, MAA fallback per broken item), and beside it, prefixed ``maa_``,
        what the regression head alone scores for the same participants (every item its fallback)."""
        items = {k: v for k, v in self.item_stats.compute().items() if k != "n_participants"}
        head = {f"maa_{k}": v for k, v in (compute(self.head_stats) | self.head_item_stats.compute()).items()
                if k in ("ccc", "rmse", "mae", "f1", "item_mae", "item_exact", "flat_pred_share")}
        if not self.head_complete():
            # pooled over a subset (a site sent no head statistics) they would not be "the same participants"
            # as the totals beside them: not reported (NaN, null in JSON; a review, session 45)
            head = dict.fromkeys(head, float("nan"))
        # no item scored: no rate (NaN, "n/a"), not a perfect 0.0 (a review, session 45)
        rate = self.violations / self.items if self.items else float("nan")
        return (compute(self.stats) | {"format_violation_rate": rate}
                | items | {f"rationale_{k}": v for k, v in self.rationale_stats.compute().items()} | head)


def rows_text(result: Evaluation, meta: dict) -> str:
    """The per-participant rows and metrics as JSON (``save_evaluation`` writes them beside the report; they stay
    on site), as text: nothing written yet (their hash is audited first: session 44)."""
    from mllm_dr.atomic import json_text

    return json_text({"metrics": result.metrics(), "rows": result.rows, **meta}, indent=1, default=float)


def save_evaluation(audit_path: Path, event: str, path: Path, result: Evaluation, title: str, rows_meta: dict,
                    report: dict, **audited) -> tuple[Path, Path]:
    """An evaluation's markdown report, plot and per-participant rows (``path``, .png and .json beside it),
    audited first: the ``event`` entry (with ``audited``) names their hashes, then they are written, so none
    exists without its entry (they were written first, and an append that failed left them unaudited: a
    review, session 44). ``report``: ``reports.render_report``'s keyword arguments. The one writer of
    `evaluate` (cli) and of a federated run's final evaluation (fl_client). Returns (report, rows) paths."""
    import hashlib

    from mllm_dr import audit
    from mllm_dr.atomic import atomic_write_text
    from mllm_dr.reports import render_report, save_report

    text, png = render_report(path, result.metrics(), result.rows, title, **report)
    rows_path, rows = path.with_suffix(".json"), rows_text(result, rows_meta)

    def sha(data: str | bytes) -> str:
        return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()

    audit.append(audit_path, event, **audited, report=str(path), report_sha256=sha(text), plot_sha256=sha(png),
                 rows_sha256=sha(rows))
    save_report(path, text, png)
    atomic_write_text(rows_path, rows)
    return path, rows_path


def participant_row(participant, total: int, insts: list, scored: list, head: dict[str, int]) -> dict:
    """One participant's row of the report. ``regression_total`` is the regression head's total as the "MAA head
    alone" figures count it, the sum of its item scores (``head``: the fallback scores); it was the raw sum,
    beside figures from rounded items (a review, session 44). The raw sum stays as ``regression_raw_sum``."""
    return {"participant": participant.id, "true": participant.total, "pred": total,
            "regression_total": sum(head.values()),
            "regression_raw_sum": round(sum(s.regression_score for s in scored), 2),
            "items": {s.item: {"true": i.label, "pred": s.score, "source": s.source,
                               "regression": shown_regression(s.regression_score),
                               "rationale": s.rationale}
                      for i, s in zip(insts, scored)}}


def evaluate_split(ws: Workspace, sm: SiteModel, split: str, max_new_tokens: int,
                   progress: Progress = None, engine=None,
                   verbatim_quotes: bool = DEFAULT_SCORING.verbatim_quotes) -> Evaluation:
    """Score every participant of ``split`` with a known total; an empty split gives an empty Evaluation.
    ``engine``, ``verbatim_quotes``: how answers are generated (see scoring.score_examples)."""
    corpus = load_corpus(ws)
    people = [p for p in corpus.participants if effective_split(p.id, p.split) == split and p.total is not None]
    by_participant: dict[str, list] = {}
    for inst in instances_by_split(ws, (split,), corpus=corpus):
        by_participant.setdefault(inst.participant, []).append(inst)
    truth = load_answer_turns(Path(ws.config.corpus_path))     # synthetic corpora only: the true answer turns
    result = Evaluation()
    prog.start(progress, f"evaluating {split}", len(people))
    for p in people:
        insts = by_participant.get(p.id, [])
        scored = score_examples(sm, examples(ws, insts, 2, with_answers=False, corpus=corpus), max_new_tokens, engine,
                                verbatim_quotes)
        total = sum(s.score for s in scored)
        result.violations += sum(s.source == "regression" for s in scored)
        result.items += len(scored)
        result.stats.add(p.total, total)
        true_items = {i.item: i.label for i in insts}
        result.item_stats.add(true_items, {s.item: s.score for s in scored})
        head = {s.item: fallback_score(s.regression_score) for s in scored}
        result.head_stats.add(p.total, sum(head.values()))
        result.head_item_stats.add(true_items, head)
        generated = [(i, s) for i, s in zip(insts, scored) if s.source == "generated"]
        result.rationale_stats.add({s.item: s.rationale for _, s in generated}, {s.item: s.score for _, s in generated},
                                   participant_texts(p.turns), {i.item: i.evidence_turns or [] for i, _ in generated},
                                   truth.get(p.id) if truth else None)
        result.rows.append(participant_row(p, total, insts, scored, head))
        prog.advance(progress)
    return result


def regression_evaluate(ws: Workspace, sm: SiteModel, split: str) -> Evaluation:
    """The cheap check for learning curves: the regression head's item scores (rounded into 0..3), one
    forward pass per participant and no generation. Not the kit's answer; used only to draw curves."""
    import torch

    corpus = load_corpus(ws)
    people = {p.id: p.total for p in corpus.participants if effective_split(p.id, p.split) == split
              and p.total is not None}
    by_participant: dict[str, list] = {}
    for inst in instances_by_split(ws, (split,), corpus=corpus):
        if inst.participant in people:
            by_participant.setdefault(inst.participant, []).append(inst)
    result = Evaluation()
    sm.model.eval()
    with torch.no_grad():
        for pid, insts in by_participant.items():
            reg = sm.model(sm.processor.collate(examples(ws, insts, 2, with_answers=False, corpus=corpus)))["regression"]
            total = sum(fallback_score(checked_head(r, pid, inst.item)) for r, inst in zip(reg.tolist(), insts))
            result.stats.add(people[pid], total)
            result.items += len(insts)
    return result


def corpus_participant(ws: Workspace, participant: str, corpus=None):
    """The corpus's participant of that id; a one-line error naming the corpus when there is none (checked
    by ``score`` before the model loads, and again here)."""
    try:
        return (corpus or load_corpus(ws)).get(participant)
    except KeyError:
        raise InputError(f"participant {participant!r} is not in the workspace's corpus", ws.config.corpus_path) from None


def participant_instances(ws: Workspace, participant: str, corpus=None) -> list:
    """The aspect instances one participant is scored from (and its excerpts shown from); an unknown id is a
    one-line error. ``corpus``: as the caller already read it, else read here."""
    corpus = corpus or load_corpus(ws)
    p = corpus_participant(ws, participant, corpus)
    return instances_by_split(ws, (effective_split(p.id, p.split),), participant, corpus)


def score_participant(ws: Workspace, sm: SiteModel, participant: str, max_new_tokens: int, engine=None, *,
                      corpus=None, instances: list | None = None) -> dict:
    """Score every item of one participant. ``corpus`` and ``instances`` (``participant_instances``): as the
    caller already has them (``score`` reads the corpus once and shows excerpts from the same instances)."""
    corpus = corpus or load_corpus(ws)
    insts = participant_instances(ws, participant, corpus) if instances is None else instances
    exs = examples(ws, insts, 2, with_answers=False, corpus=corpus)
    return summarize(participant, score_examples(sm, exs, max_new_tokens, engine), sm)
