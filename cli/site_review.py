"""`mllmdr-site review PARTICIPANT | stats`: a clinician rates each rationale beside its excerpt."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.columns import Columns
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from cli.common import WorkspaceOpt, console, emit_json, set_threads
from cli.site_model import Adapters, Engine, EngineOpt, load_model
from mllm_dr.config import DEFAULT_SCORING
from mllm_dr.errors import InputError


def review(participant: str = typer.Argument(..., help="Participant id to review, or 'stats' for the summary."),
           workspace: Optional[Path] = WorkspaceOpt,
           user: Optional[str] = typer.Option(None, "--user", help="Clinician id (default: your login name); the "
                                              "same option as for 'score'."),
           reviewer: Optional[str] = typer.Option(None, "--reviewer", hidden=True, help="Old name of --user."),
           ratings: Optional[str] = typer.Option(None, "--ratings", help="Non-interactive: one of 3/2/1 per item, "
                                                 "comma separated, in the order shown."),
           corrections: Optional[str] = typer.Option(None, "--corrections", help="Non-interactive: ITEM=score,..."),
           adapters: Adapters = typer.Option(Adapters.auto, "--adapters"),
           max_new_tokens: int = typer.Option(DEFAULT_SCORING.max_new_tokens, "--max-new-tokens", min=8),
           engine: Engine = EngineOpt,
           json_out: bool = typer.Option(False, "--json")):
    """Review a participant's item scores and rationales beside the interview excerpts they rest on.

    Rate each rationale 3 (fully agree) / 2 (reasonable) / 1 (disagree), optionally correct the score.
    'review stats' prints the paper's Table 7 figures over all reviews.

    The scores come from the engine given (the one the clinician scored with: --engine, as for 'score');
    the review records it.

    Example: mllmdr-site review 303 --workspace /srv/mllmdr
    Example: mllmdr-site review stats --workspace /srv/mllmdr --json
    """
    from mllm_dr.base_model import pick_device
    from mllm_dr.clinician import participant_excerpts
    from mllm_dr.evaluation import score_participant
    from mllm_dr.onnx_engine import check_engine, make_engine
    from mllm_dr.review import ItemReview, Review, parse_corrections, parse_ratings, record_review
    from mllm_dr.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    if participant == "stats":
        return _stats(ws, json_out)
    if not ratings and json_out:    # --json prints no panels: nobody should rate what they have not seen
        raise InputError("--json shows no scores or rationales to rate: pass --ratings (and optionally "
                         "--corrections), or review without --json")
    check_engine(engine.value)
    set_threads()
    sm = load_model(ws, adapters, None, pick_device("auto"))
    eng = make_engine(engine.value, sm, ws.checkpoints_dir / "onnx")
    result = score_participant(ws, sm, participant, max_new_tokens, eng)
    excerpts = participant_excerpts(ws, participant)
    items = [it["item"] for it in result["items"]]
    given = parse_ratings(ratings, items) if ratings else None
    fixes = parse_corrections(corrections, items)
    if given is None and not os.isatty(0):
        raise InputError("not a terminal: pass --ratings (and optionally --corrections)")
    reviewed = []
    for k, it in enumerate(result["items"]):
        quote, dialogue = excerpts.get(it["item"], ("", ""))
        if not json_out:
            console.print(Columns([
                Panel(f"[bold]score {it['score']}[/bold] ({it['source']})\n\n{escape(it['rationale'])}",
                      title=it["item"], width=60),
                Panel((f'[yellow]"{escape(quote)}"[/yellow]\n\n' if quote else "") + f"[dim]...{escape(dialogue)}[/dim]",
                      title="interview excerpt", width=70)]))
        rating = given[k] if given is not None else _ask(it["item"], fixes)
        reviewed.append(ItemReview(item=it["item"], model_score=it["score"], source=it["source"], rating=rating,
                                   corrected_score=fixes.get(it["item"])))
    from mllm_dr.audit import login_name

    summary = record_review(ws, Review(participant=participant, reviewer=user or reviewer or login_name(),
                                       adapters=result["adapters"], engine=engine.value, items=reviewed))
    emit_json(summary) if json_out else console.print(" ".join(f"{k}={v}" for k, v in summary.items()))


def _ask(item: str, fixes: dict[str, int]) -> int:
    """Interactive rating (and optional correction) of one item."""
    import click

    rating = int(typer.prompt("rating: 3 fully agree / 2 reasonable / 1 disagree", type=click.Choice(("3", "2", "1"))))
    fix = typer.prompt("corrected score (Enter keeps the model's)", type=click.Choice(("", "0", "1", "2", "3")),
                       default="", show_default=False, show_choices=False)   # a typo asks again, never dropped
    if fix:
        fixes[item] = int(fix)
    return rating


def _stats(ws, json_out: bool) -> None:
    from mllm_dr.review import load_reviews, review_stats

    stats = review_stats(load_reviews(ws.root))
    if json_out:
        emit_json(stats)
        return
    table = Table(title=f"clinician reviews at {ws.config.site_id} (paper Table 7)")
    table.add_column("figure")
    table.add_column("value")
    for k, v in stats.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else (f"{v:.3f}" if isinstance(v, float) else str(v)))
    console.print(table)
