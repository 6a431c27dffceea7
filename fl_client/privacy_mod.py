"""Differential privacy as a client mod on training replies only (evaluate replies carry
sufficient statistics, not tensors). The mod clips and noises the reply's tensors against
the global state the center sent, keeps the site's (epsilon, delta) ledger and refuses to
train once the budget is spent."""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, Context, Error, Message

BUDGET_SPENT = 4032


def effective_dp(msg: Message, site_policy):
    """The strictest of the site's and the run's DP settings: a run never weakens a site's DP."""
    from policies.schema import SitePolicy

    raw = str(msg.content["config"].get("policy", "") or "")
    run = SitePolicy.model_validate_json(raw) if raw else None
    return site_policy.dp.strictest(run.dp if run is not None else None)


def dp_mod(msg: Message, context: Context, call_next) -> Message:
    from mllm_dr import audit
    from mllm_dr.privacy import BudgetSpent, PrivacyLedger, clip_and_noise
    from mllm_dr.workspace import Workspace
    from policies.site import site_policy

    ws = Workspace(str(context.node_config["workspace"]))
    dp = effective_dp(msg, site_policy(ws))
    if not dp.enabled:
        return call_next(msg, context)
    ledger = PrivacyLedger(ws.root / "privacy.json")
    try:
        ledger.check(dp.noise_multiplier, dp.delta, dp.epsilon_budget)
    except BudgetSpent as err:
        audit.append(ws.audit_path, "privacy_budget_spent", epsilon=ledger.spent(dp.delta), budget=dp.epsilon_budget)
        return Message(Error(code=BUDGET_SPENT, reason=str(err)), reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    sent = msg.content["arrays"].to_torch_state_dict()
    update = reply.content["arrays"].to_torch_state_dict()
    private, norm = clip_and_noise(update, {n: sent[n] for n in update}, dp.clip_norm, dp.noise_multiplier)
    ctx = json.loads(str(msg.content["config"]["context"]))
    eps_round, eps_total = ledger.record(ctx["run"], int(msg.content["config"]["train-round"]), dp.noise_multiplier,
                                         dp.clip_norm, dp.delta)
    reply.content["arrays"] = ArrayRecord.from_torch_state_dict(private)
    m = reply.content["metrics"]
    m["epsilon"], m["epsilon-total"], m["clip-norm"] = eps_round, eps_total, dp.clip_norm
    audit.append(ws.audit_path, "dp_round", run=ctx["run"], round=int(msg.content["config"]["train-round"]),
                 epsilon_round=eps_round, epsilon_total=eps_total, delta=dp.delta, clip_norm=dp.clip_norm,
                 noise_multiplier=dp.noise_multiplier, update_norm_before_clip=norm)
    return reply
