"""`mllmdr-site review PARTICIPANT | stats`: a clinician rates each rationale beside its excerpt."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.columns import Columns
from rich.panel import Panel
from rich.table import Table

from cli.common import WorkspaceOpt, console, emit_json, safe_text
from cli.site_model import Adapters, Engine
from mllm_dr.errors import InputError


def review(participant: str = typer.Argument(..., help="Participant id to review, or 'stats' for the summary."),
           workspace: Optional[Path] = WorkspaceOpt,
           user: Optional[str] = typer.Option(None, "--user", help="Clinician id (default: your login name); the "
                                              "same option as for 'score'."),
           reviewer: Optional[str] = typer.Option(None, "--reviewer", hidden=True, help="Old name of --user."),
           ratings: Optional[str] = typer.Option(None, "--ratings", help="Non-interactive: one of 3/2/1 per item, "
                                                 "comma separated, in the order shown; needs --score."),
           corrections: Optional[str] = typer.Option(None, "--corrections", help="Non-interactive, with --ratings: "
                                                     "ITEM=score,... (interactively, correct at the prompts)."),
           adapters: Optional[Adapters] = typer.Option(None, "--adapters", help="Check that the kept score came "
                                                       "from these adapters (local or federated)."),
           engine: Optional[Engine] = typer.Option(None, "--engine", help="Check that the kept score came from "
                                                   "this engine."),
           score_sha256: Optional[str] = typer.Option(None, "--score", help="The kept score rated: its id "
                                                      "(kept_score_sha256, or a prefix of 8+ characters) as 'score' "
                                                      "printed it and its HTML page shows it. Required with --ratings "
                                                      "(no one else's later scoring is rated); else a check."),
           json_out: bool = typer.Option(False, "--json")):
    """Review a participant's item scores and rationales beside the interview excerpts they rest on.

    Rate each rationale 3 (fully agree) / 2 (reasonable) / 1 (disagree), optionally correct the score.
    'review stats' prints the paper's Table 7 figures over all reviews.

    The scores reviewed are the ones 'score' last showed for the participant (kept on site with the
    engine, adapters and warnings they came with); nothing is scored again. The review records which
    kept score it rated (its sha256), and its audit entry the review's own hash. --ratings needs --score:
    the id 'score' printed ("kept for review: score 3f2a9c1d0b7e") and its HTML page shows.

    Example: mllmdr-site review 303 --workspace /srv/mllmdr
    Example: mllmdr-site review 303 --score 3f2a9c1d0b7e --ratings 3,3,2,3,3,2,3,3 --json
    Example: mllmdr-site review stats --workspace /srv/mllmdr --json
    """
    from mllm_dr.audit import login_name
    from mllm_dr.clinician import kept_score, kept_score_path, self_harm_alert
    from mllm_dr.review import ItemReview, Review, parse_corrections, parse_ratings, record_review
    from mllm_dr.workspace import resolve_workspace

    ws = resolve_workspace(workspace)
    if participant == "stats":
        return _stats(ws, json_out)
    _check_corrections(ratings, corrections)
    if not ratings and json_out:    # --json prints no panels: nobody should rate what they have not seen
        raise InputError("--json shows no scores or rationales to rate: pass --ratings (and optionally "
                         "--corrections), or review without --json")
    kept, kept_sha = kept_score(ws, participant)
    view = kept["view"]
    scored = f"scored {kept['scored_at']} by {kept.get('scored_by') or 'an unnamed user'}"
    for asked, was, what in ((engine and engine.value, kept["engine"], "engine"),
                             (adapters and adapters.value, kept["adapters_kind"], "adapters")):
        if asked not in (None, "auto", was):
            raise InputError(f"the kept score of participant {participant} came from {what} {was}, not {asked}: "
                             f"score again with --{what} {asked} to review that", kept_score_path(ws, participant))
    items = [it["item"] for it in view["items"]]
    given = parse_ratings(ratings, items) if ratings else None
    fixes = parse_corrections(corrections, items)
    if given is not None and score_sha256 is None:   # else a colleague's later scoring would be rated unseen
        raise InputError(f"--ratings needs --score: the id of the score being rated, as 'score' printed it (\"kept "
                         f"for review: score ...\") and its HTML page shows it (the score kept for participant "
                         f"{participant} now was {scored})", kept_score_path(ws, participant))
    if score_sha256 is not None and len(score_sha256) < 8:     # not "the kept score is ...": it may be that one
        raise InputError(f"--score needs at least 8 characters of the id ({score_sha256[:12]!r} has "
                         f"{len(score_sha256)}), as 'score' printed it (\"kept for review: score 3f2a9c1d0b7e\")")
    if score_sha256 is not None and not kept_sha.startswith(score_sha256.lower()):
        raise InputError(f"the kept score of participant {participant} is {kept_sha[:12]} ({scored}), not "
                         f"{score_sha256[:12]}: review that one, or score again", kept_score_path(ws, participant))
    if given is None and not os.isatty(0):
        raise InputError("not a terminal: pass --ratings with --score (and optionally --corrections)")
    # a self-harm score above 0 heads the review, kept scores from before session 46 included (session 46)
    alert = view.get("safety_alert") or self_harm_alert(view["items"])
    if not json_out:       # what the clinician was told beside the scores when they were shown (text, never markup)
        if alert:
            console.print(f"[bold red]SAFETY ALERT:[/bold red] [bold]{safe_text(alert)}[/bold]", highlight=False)
        console.print(safe_text(f"participant {participant}: score {kept_sha[:12]}, shown {kept['scored_at']} to "
                                f"{kept.get('scored_by') or 'an unnamed user'}, {kept['adapters_kind']} adapters "
                                f"{view['adapters']} ({kept['engine']}); total {view['total']} ({view['band']})"),
                      highlight=False)
        for w in view.get("warnings", []):
            if w != alert:
                console.print(f"[yellow]warning:[/yellow] {safe_text(w)}", highlight=False)
    reviewed = []
    for k, it in enumerate(view["items"]):
        quote, dialogue = kept["excerpts"].get(it["item"], ("", ""))
        if not json_out:
            console.print(Columns([
                Panel(f"[bold]score {it['score']}[/bold] ({safe_text(it['source'])})"
                      + ("\n[yellow]no statement in the interview on this item[/yellow]"
                         if it.get("has_evidence") is False else "") + f"\n\n{safe_text(it['rationale'])}",
                      title=safe_text(it["item"]), width=60),
                Panel((f'[yellow]"{safe_text(quote)}"[/yellow]\n\n' if quote else "")
                      + f"[dim]...{safe_text(dialogue)}[/dim]", title="interview excerpt", width=70)]))
        rating = given[k] if given is not None else _ask(it["item"], fixes)
        reviewed.append(ItemReview(item=it["item"], model_score=it["score"], source=it["source"], rating=rating,
                                   corrected_score=fixes.get(it["item"])))
    summary = record_review(ws, Review(participant=participant, reviewer=user or reviewer or login_name(),
                                       adapters=view["adapters"], engine=kept["engine"], score_sha256=kept_sha,
                                       items=reviewed))
    if alert:
        summary["safety_alert"] = alert
    emit_json(summary) if json_out else console.print(safe_text(" ".join(f"{k}={v}" for k, v in summary.items())),
                                                      highlight=False)


def _check_corrections(ratings: Optional[str], corrections: Optional[str]) -> None:
    """--corrections only with --ratings (both non-interactive). Interactively, pressing Enter at "corrected score
    (Enter keeps the model's)" kept the command line's correction instead, recorded as the clinician's (a
    review, session 44): refused (exit 2) before anything is read or shown."""
    if corrections and not ratings:
        raise InputError("--corrections goes with --ratings (both non-interactive); reviewing interactively, "
                         "correct a score at its prompt")


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
    from mllm_dr.review import checked_reviews, review_stats

    # the figures are over the reviews a signed audit entry vouches for; edited and deleted ones are flagged
    reviews, checked = checked_reviews(ws)
    stats = review_stats(reviews) | checked
    if json_out:
        emit_json(stats)
        return
    table = Table(title=safe_text(f"clinician reviews at {ws.config.site_id} (paper Table 7)"))
    table.add_column("figure")
    table.add_column("value")
    for k, v in stats.items():
        if k != "missing_review_entries":      # named in the warning below
            table.add_row(k, json.dumps(v) if isinstance(v, dict) else f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(table)
    for warning in _integrity_warnings(checked):
        console.print(f"[yellow]warning:[/yellow] {safe_text(warning)}", highlight=False, soft_wrap=True)


def _integrity_warnings(checked: dict) -> list[str]:
    """What ``review stats`` says beside its figures when the reviews file and the audit log disagree."""
    out = []
    if checked["audit_log_problem"]:
        out.append(f"the audit log does not verify ({checked['audit_log_problem']}): only the entries before that "
                   "vouch for reviews; 'mllmdr-site audit verify' says more")
    if n := checked["unaudited_reviews"]:
        out.append(f"{n} stored review{' matches' if n == 1 else 's match'} no audit entry (edited since it was "
                   "saved, or saved before session 40): left out of the figures")
    if n := checked["missing_reviews"]:
        which = "; ".join(f"participant {e['participant']} by {e['actor']} at {e['time']} (audit seq {e['seq']})"
                          for e in checked["missing_review_entries"])
        out.append(f"{n} review{' the audit log records is' if n == 1 else 's the audit log records are'} missing "
                   f"from the reviews file (deleted or edited): {which}")
    if n := checked.get("reviews_out_of_audit_order"):
        out.append(f"{n} stored reviews stand in another order in the reviews file than the audit log recorded them "
                   "(lines moved): the figures take each clinician's latest review by the audit log's order")
    return out
