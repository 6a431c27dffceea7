"""`mllmdr-center simulate`: rehearse a large consortium on this machine before hospitals connect."""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from cli.center_run import OWN_OPTION, Aggregation
from cli.common import console, emit_json, err_console, progress, progress_callback, safe_text, stop_on_signals
from mllm_dr.errors import InputError
from mllm_dr.processes import ProcessError


def simulate(sites: int = typer.Option(..., "--sites", "-n", min=1, help="Number of virtual sites."),
             base_model: str = typer.Option("tiny-random", "--base-model", help="tiny-random | smollm2 | a folder."),
             participants: int = typer.Option(4, "--participants", min=4,
                                              help="Synthetic participants per virtual site (>= 4: train, dev, test)."),
             stage1_rounds: int = typer.Option(1, "--stage1-rounds", min=0),
             stage2_rounds: int = typer.Option(1, "--stage2-rounds", min=0),
             dropout_rate: float = typer.Option(0.0, "--dropout-rate", min=0.0, max=0.99,
                                                help="Share of the sites that fail each round (drawn per round)."),
             min_sites: int = typer.Option(2, "--min-sites", min=1, help="Fewest usable updates a round accepts."),
             aggregation: Aggregation = typer.Option(Aggregation.exact_lora, "--aggregation",
                                                     help="ffa-lora for a --policy with secure aggregation."),
             policy: Optional[Path] = typer.Option(None, "--policy", help="The run's required policy (JSON)."),
             site_policy: Optional[Path] = typer.Option(None, "--site-policy",
                                                        help="A policy some virtual sites hold as their own."),
             site_policy_share: float = typer.Option(0.0, "--site-policy-share", min=0.0, max=1.0,
                                                     help="Share of the sites holding --site-policy."),
             evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Pooled evaluation at the end."),
             eval_max_new_tokens: int = typer.Option(16, "--eval-max-new-tokens", min=8),
             actors: int = typer.Option(2, "--actors", min=1, help="ClientApps running at a time (Ray actors)."),
             seed: int = typer.Option(0, "--seed", help="Seed of the corpus, the dropouts and the round-0 adapters."),
             set_: Optional[List[str]] = typer.Option(None, "--set", help="Any other run-plan key (fl_server/plan.py), "
                                                      "e.g. --set feature-norms=site under a DP --policy; validated."),
             dir: Optional[Path] = typer.Option(None, "--dir", "-d", help="Rehearsal folder (kept; reused when its "
                                                "sites were prepared with the same --sites, --participants, --seed "
                                                "and site policies). Default: a new temporary folder."),
             timeout: float = typer.Option(3600, "--timeout", help="Give up (and stop everything) after this long."),
             json_out: bool = typer.Option(False, "--json")):
    """Run the real ServerApp and ClientApp under Flower's simulation engine with N virtual sites.

    Each virtual site is a real workspace (a synthetic corpus split N ways, features extracted,
    enrolled with a rehearsal center folder). Rehearses rounds, dropouts and policies; needs the
    optional extra 'simulation' (Ray). Every process it starts is stopped when it returns.

    Example: mllmdr-center simulate --sites 10 --base-model tiny-random --dropout-rate 0.2 --json
    """
    from fl_server.simulation import check_plan, rehearse, stray_text
    from mllm_dr.rehearsal import policy_holders
    from policies.schema import load_policy

    run_policy = load_policy(policy)
    strict = load_policy(site_policy).model_dump() if site_policy else None
    holders = policy_holders(sites, site_policy_share, strict)
    plan = {**set_keys(set_), "run-name": f"rehearsal-{datetime.now():%Y%m%d-%H%M%S}", "base-model": base_model,
            "stage1-rounds": stage1_rounds, "stage2-rounds": stage2_rounds, "min-sites": min_sites,
            "aggregation": aggregation.value,
            "policy": run_policy.model_dump_json(), "evaluate": evaluate, "eval-max-new-tokens": eval_max_new_tokens,
            "seed": seed}
    # the plan is checked before a temporary folder is made: a refused one left an empty folder (session 44)
    check_plan(dir or Path(tempfile.gettempdir()) / "mllmdr-rehearsal", sites, plan, dropout_rate, seed, actors,
               timeout)
    root = dir or Path(tempfile.mkdtemp(prefix="mllmdr-rehearsal-"))
    try:
        # SIGTERM/SIGHUP raise Stopped (session 46: a killed rehearsal left its SuperLink, flwr-simulation and
        # Ray running, in their own session): `rehearse` stops them in its `finally`
        with stop_on_signals(), progress() as bar:
            out = rehearse(root, sites, plan, participants, seed, dropout_rate, actors, {s: strict for s in holders},
                           timeout, progress_callback(bar), _warn)
    except BaseException:
        if dir is None:
            _drop_or_keep(root)
        raise
    if json_out:
        emit_json(out)
    else:
        _print(out)
    stray = stray_text(out["stray_pids"]) if out["stray_pids"] else None
    if out["flower_status"] != "finished:completed" or out["status"] != "completed":
        raise InputError(f"rehearsal {out['run']} {out['flower_status']}: {out['error'] or 'see the log'}"
                         + (f"; {stray}" if stray else ""), out["log"])
    if stray:                          # session 46: returned, and ignored (exit 0)
        raise ProcessError(stray)


def _warn(text: str) -> None:
    err_console.print(f"warning: {safe_text(text)}", highlight=False, soft_wrap=True)


def _drop_or_keep(root: Path) -> None:
    """A temporary rehearsal folder the command made, when the rehearsal ended in an error: removed unless a
    run started there (its log and history are what the error points at; then the output says it is kept).
    Session 46: each failed rehearsal left one in /tmp."""
    runs = root / "center" / "runs"
    if runs.is_dir() and any(runs.iterdir()):
        err_console.print(f"the rehearsal folder is kept (its run's log and history): {safe_text(root)}",
                          highlight=False, soft_wrap=True)
    else:
        shutil.rmtree(root, ignore_errors=True)


# run-plan keys `simulate` sets from its own options (or itself): a --set of them is refused, not overridden
OWN_OPTIONS = {**OWN_OPTION, "base-model": "--base-model", "stage1-rounds": "--stage1-rounds",
               "stage2-rounds": "--stage2-rounds", "min-sites": "--min-sites", "aggregation": "--aggregation",
               "eval-max-new-tokens": "--eval-max-new-tokens", "seed": "--seed",
               "resume": "a new rehearsal (a rehearsal is never resumed)"}


def set_keys(items: list[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` as `mllmdr-center run` takes it (any run-plan key; RunPlan validates the values),
    less the keys `simulate` has an option for. Since session 44: without it a DP --policy could not be
    rehearsed (the plan needs --set feature-norms=site or participant)."""
    from fl_server.plan import RunPlan

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in RunPlan.defaults():
            raise InputError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(RunPlan.defaults())}")
        if key in OWN_OPTIONS:
            raise InputError(f"--set {key}: use {OWN_OPTIONS[key]}")
        out[key] = value
    return out


def _print(out: dict) -> None:
    t = Table(title=f"rehearsal {out['run']}: {out['sites']} virtual sites, {out['base_model']}")
    for col in ("round", "seconds", "failed or rejected"):
        t.add_column(col)
    for (r, rejected), seconds in zip(out["rejected"].items(), out["round_seconds"]):
        t.add_row(r, f"{seconds:.1f}", "; ".join(f"{s}: {why}" for s, why in rejected.items()) or "-")
    console.print(t)
    if out["site_policy_holders"]:
        console.print("--site-policy held by: " + ", ".join(out["site_policy_holders"]))
    for why in out["not_joined"]:
        console.print(f"did not join: {safe_text(why)}", highlight=False, soft_wrap=True)
    console.print(f"{out['joined']} site(s) joined, {len(out['not_joined'])} did not; "
                  f"{out['rounds_per_minute'] or '-'} rounds/min; "
                  f"peak memory {out['peak_memory_bytes'] / 2**30:.2f} GiB ({out['memory_measure']}; "
                  f"resident sum {out['peak_rss_bytes'] / 2**30:.2f} GiB); "
                  f"folder {out['dir']}")
    if out["evaluation"]:
        console.print("pooled held-out: " + json.dumps(out["evaluation"]))
