"""`mllmdr-site policy show | check`: the site's policy (egress, DP, secure aggregation, limits)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import WorkspaceOpt, console, emit_json, safe_text

policy_app = typer.Typer(help="The site's policy (egress allow-list, DP, secure aggregation, limits).\n\n"
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
        return f"epsilon spent so far {who}: {led['error']}"
    if "void" in led:
        return f"epsilon spent so far {who}: infinite: {led['void']}"
    delta = f"delta {led['delta']:g}" + ("" if led.get("delta_recorded", True) else ", the policy's: none recorded")
    return f"epsilon spent so far {who}: {led['epsilon']:.3f} ({delta}, the site's budget {budget:g})"


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
