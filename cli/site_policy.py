"""`mllmdr-site policy show | check | reset-ledger`: the site's policy (egress, DP, secure aggregation, limits)
and its DP ledgers."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cli.common import WorkspaceOpt, console, emit_json, safe_text

policy_app = typer.Typer(help="The site's policy (egress allow-list, DP, secure aggregation, limits) and its DP "
                              "ledgers.\n\n"
                              "Example: mllmdr-site policy show --workspace /srv/mllmdr", no_args_is_help=True)


@policy_app.command("show")
def policy_show(workspace: Optional[Path] = WorkspaceOpt, json_out: bool = typer.Option(False, "--json")):
    """Print the policy in force (workspace policy.json, else the default) and where it comes from.

    Example: mllmdr-site policy show --workspace /srv/mllmdr --json
    """
    from mllm_dr.privacy import ledger_reports
    from mllm_dr.workspace import resolve_workspace
    from policies.schema import default_policy_path
    from policies.site import site_policy, site_policy_path

    ws = resolve_workspace(workspace)
    pol = site_policy(ws)
    src = site_policy_path(ws) or default_policy_path()
    ledgers = ledger_reports(ws.root, pol.dp.delta, pol.dp.unit)     # every unit a run's DP charged
    first = ledgers[0] if ledgers else {"unit": pol.dp.unit, "epsilon": 0.0}
    if json_out:
        emit_json({"source": str(src), "policy": pol.model_dump(), "epsilon_spent": first.get("epsilon"),
                   "epsilon_unit": first["unit"], "ledgers": ledgers})
        return
    console.print(f"policy from {src}")
    console.print_json(pol.model_dump_json())
    for led in ledgers or [first | {"delta": pol.dp.delta}]:
        console.print(safe_text(ledger_line(led, pol.dp.epsilon_budget)), highlight=False)


def ledger_line(led: dict, budget: float) -> str:
    """One ledger of ``privacy.ledger_reports`` as `policy show` and `status` say it."""
    who = "per patient" if led["unit"] == "patient" else "for the site's whole contribution"
    if "error" in led:
        return f"epsilon spent so far {who}: {led['error']}{reset_note(led)}"
    if "void" in led:
        return f"epsilon spent so far {who}: infinite: {led['void']}{reset_note(led)}"
    delta = f"delta {led['delta']:g}" + ("" if led.get("delta_recorded", True) else ", the policy's: none recorded")
    return f"epsilon spent so far {who}: {led['epsilon']:.3f} ({delta}, the site's budget {budget:g}){reset_note(led)}"


def reset_note(led: dict) -> str:
    """What a ledger's last reset (``privacy.PrivacyLedger.report``) adds to its line: the epsilon shown covers
    the period since then only."""
    r = led.get("reset")
    if not r:
        return ""
    if r.get("unfinished"):
        return (f"; a ledger reset at {r.get('time')} was interrupted before the empty ledger was written (epsilon is "
                f"the old ledger's): run 'mllmdr-site policy reset-ledger --unit {'both' if led['unit'] == 'site' else led['unit']}' again")
    return f"; counted since the ledger's reset at {r.get('time')} by {r.get('actor')} (reason: {r.get('reason')})"


class Unit(str, Enum):
    site = "site"
    patient = "patient"
    both = "both"


@policy_app.command("reset-ledger")
def policy_reset_ledger(workspace: Optional[Path] = WorkspaceOpt,
                        unit: Unit = typer.Option(..., "--unit", help="The ledger of a new privacy period: site "
                                                  "(privacy.json), patient (privacy-patient.json) or both (a site "
                                                  "ledger holding rounds is reset only with the per-patient one, "
                                                  "which counts them: give both)."),
                        reason: str = typer.Option("", "--reason", help="Why (required; kept in the audit log): the "
                                                   "DPO's decision and the new cohort, never patient data."),
                        yes: bool = typer.Option(False, "--yes", help="Confirm the reset (required)."),
                        json_out: bool = typer.Option(False, "--json")):
    """Start a new privacy period for one DP ledger (the DPO's decision, for a cohort whose data was never in
    training): the ledger is archived beside itself (NAME.<UTC time>.retired.json, kept), the reset is signed
    into the audit log (dp_ledger_reset: epsilon, rounds and void at the reset, the reason, the archive's
    sha256), then an empty ledger starts: this ledger's own rounds count from 0 (a per-patient ledger still
    counts the site-level ledger's rounds and either ledger's unprotected rounds, so a site-level ledger holding
    any is reset only with it: --unit both, one audit entry per unit). Refused while the site's SuperNode runs or another command holds the
    workspace (stop it first), and for a ledger that is missing or rolled back (restore it first).

    Example: mllmdr-site policy reset-ledger --workspace /srv/mllmdr --unit patient --reason "DPO decision 2025-07: new cohort" --yes
    """
    from mllm_dr.errors import InputError
    from mllm_dr.privacy import UNIT_FILES, reset_ledger, reset_reason
    from mllm_dr.workspace import resolve_workspace
    from policies.site import site_policy

    ws = resolve_workspace(workspace)
    reason = reset_reason(reason)
    files = " and ".join(UNIT_FILES.values()) if unit.value == "both" else UNIT_FILES[unit.value]
    if not yes:
        raise InputError(f"a reset archives {files}, records the reset in the audit log and starts an empty ledger "
                         f"in which this ledger's own rounds count from 0 (for data never in training); add --yes to confirm")
    done = reset_ledger(ws.root, unit.value, reason, site_policy(ws).dp.delta)
    if json_out:
        emit_json(done)
        return
    for one in done.get("resets", [done]):
        _print_reset(one, site_policy(ws).dp.epsilon_budget)


def _print_reset(done: dict, budget: float) -> None:
    was = "infinite (guarantee void)" if done["void_at_reset"] else f"{done['epsilon_at_reset']:.3f}"
    console.print(safe_text(f"{done['unit']}-level ledger reset (audit entry seq {done['audit_seq']}); the old one is "
                            f"kept as {done['archive']} (sha256 {done['archive_sha256'][:16]}...): epsilon {was} "
                            f"over {done['rounds_at_reset']} round(s) at the reset"), highlight=False)
    console.print(safe_text("now: " + ledger_line(done["now"], budget)), highlight=False)


@policy_app.command("check")
def policy_check(workspace: Optional[Path] = WorkspaceOpt,
                 against: Optional[Path] = typer.Option(None, "--against", help="A run's policy file: would this "
                                                        "site join a run with it?"),
                 json_out: bool = typer.Option(False, "--json")):
    """Validate the site's policy file (exit 2 naming the field when invalid); with --against, say
    whether a run with that policy would be joined or refused, and why (exit 1 when refused): the
    checks the site makes at a run's first message, but for the base model (not named here).

    Example: mllmdr-site policy check --workspace /srv/mllmdr --against center-policy.json
    """
    from mllm_dr.dataset import labelled_training_counts
    from mllm_dr.errors import InputError
    from mllm_dr.workspace import resolve_workspace
    from policies.schema import join_refusals, load_policy
    from policies.site import site_policy

    ws = resolve_workspace(workspace)
    mine = site_policy(ws)
    reasons = []
    if against:     # the join's own checks (session 41: it compared the policies only, missing the rest)
        try:
            participants = labelled_training_counts(ws)[0]
        except InputError:                 # no corpus yet: counted when there is one
            participants = mine.min_participants
        any_base = mine.allowed_base_sha256[0] if mine.allowed_base_sha256 else ""
        reasons = join_refusals(mine, load_policy(against), any_base, participants)
    res = {"valid": True, "joins": not reasons, "reasons": reasons}
    if json_out:
        emit_json(res)
    else:
        console.print("policy valid" + ("" if not against else ("; would join" if not reasons else
                                                                 "; would REFUSE: " + "; ".join(reasons))))
    if reasons:
        raise SystemExit(1)
