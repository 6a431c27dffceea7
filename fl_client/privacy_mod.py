"""Differential privacy as a client mod on training replies only (evaluate replies carry
sufficient statistics, not tensors), for either privacy unit of the site's policy:

- ``dp.unit = "site"``: the mod clips and noises the reply's tensors against the global state
  the center sent (one Gaussian mechanism per round);
- ``dp.unit = "patient"``: the trainer runs DP-SGD (``patient_dp`` hands it the settings); the
  mod accounts the round's steps.

Either way the mod keeps the site's (epsilon, delta) ledger for that unit, refuses to train once
the next round would pass the budget (charging each round before it trains, under a lock), reports epsilon in the reply and the audit log, and
withholds the reply's loss, validation statistics and training time (the epsilon does not cover them).
"""

from __future__ import annotations

import json
import uuid

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord

from mllm_dr.protocol import BUDGET_SPENT, REFUSED, TrainInstruction, TrainReply


def effective_dp(run_policy_json: str, site_policy):
    """The strictest of the site's and the run's DP settings: a run never weakens a site's DP."""
    from policies.schema import SitePolicy

    run = SitePolicy.model_validate_json(run_policy_json) if run_policy_json else None
    return site_policy.dp.strictest(run.dp if run is not None else None)


def round_mechanism(dp, ws, local_epochs: int) -> tuple[float, int]:
    """(sampling rate, steps) one round of ``local_epochs`` charges to the ledger of ``dp.unit``: the
    trainer's DP-SGD steps for a patient, the whole update once for a site."""
    if dp.unit == "patient":
        return dp.sample_rate, local_epochs * trainer_dp(dp, ws).steps_per_epoch
    return 1.0, 1


def budget_refusal(ws, run_policy_json: str, local_epochs: int = 1) -> str | None:
    """Why this site's DP budget cannot cover a round of ``local_epochs``, else None. Asked at a masked
    round's key exchange: a site that would refuse the training message must stay out of the roster, or
    its refusal (after the key exchange) fails the round for every site (a privacy review, session 41)."""
    from mllm_dr.privacy import BudgetSpent, PrivacyLedger
    from policies.site import site_policy

    dp = effective_dp(run_policy_json, site_policy(ws))
    if not dp.enabled:
        return None
    rate, steps = round_mechanism(dp, ws, local_epochs)
    try:
        PrivacyLedger.of(ws.root, dp.unit).check(dp.noise_multiplier, dp.delta, dp.epsilon_budget, rate, steps)
    except BudgetSpent as err:
        return str(err)
    return None


def trainer_dp(dp, ws):
    """The trainer's DP-SGD settings for these effective DP settings when they protect each patient,
    else None. A step trains one of the questionnaire's items when ``dp.step = "item"``."""
    from mllm_dr.dataset import load_corpus
    from mllm_dr.training import PatientDP

    if not (dp.enabled and dp.unit == "patient"):
        return None
    items = tuple(load_corpus(ws).item_names) if dp.step == "item" else None
    return PatientDP(dp.clip_norm, dp.noise_multiplier, dp.sample_rate, items, optimizer=dp.optimizer)


def patient_dp(instruction: TrainInstruction, ws):
    """The trainer's DP-SGD settings when the site's DP protects each patient, else None."""
    from policies.site import site_policy

    return trainer_dp(effective_dp(instruction.policy, site_policy(ws)), ws)


def dp_mod(msg: Message, context: Context, call_next) -> Message:
    from mllm_dr import audit
    from mllm_dr.privacy import BudgetSpent, PrivacyLedger, clip_and_noise
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.workspace import Workspace
    from policies.site import site_policy

    ws = Workspace(node_workspace(context.node_config))
    t = TrainInstruction.from_record(msg.content["config"])
    dp = effective_dp(t.policy, site_policy(ws))
    if not dp.enabled:
        return call_next(msg, context)
    ledger = PrivacyLedger.of(ws.root, dp.unit)
    rate, steps = round_mechanism(dp, ws, t.local_epochs)   # the steps the trainer will take, from its settings
    run, charge = json.loads(t.context)["run"], uuid.uuid4().hex
    try:      # charged before training: two runs at once cannot both pass the check on the same history
        eps_round, eps_total = ledger.spend(run, t.round, dp.noise_multiplier, dp.clip_norm, dp.delta,
                                            dp.epsilon_budget, rate, steps, charge)
    except BudgetSpent as err:
        audit.append(ws.audit_path, "privacy_budget_spent", unit=dp.unit, epsilon=ledger.spent(dp.delta),
                     budget=dp.epsilon_budget)
        return Message(Error(code=BUDGET_SPENT, reason=str(err)), reply_to=msg)
    try:
        reply = call_next(msg, context)
    except BaseException:
        ledger.refund(charge, dp.delta)      # nothing of this round left the site
        raise
    if reply.has_error():
        ledger.refund(charge, dp.delta)
        return reply
    norm = None
    if dp.unit == "site":
        sent = msg.content["arrays"].to_torch_state_dict()
        update = reply.content["arrays"].to_torch_state_dict()
        other = [n for n in update if n in sent and update[n].shape != sent[n].shape]
        if other:          # a site at its own LoRA rank: a difference of factors of other shapes means nothing
            ledger.refund(charge, dp.delta)
            return Message(Error(code=REFUSED, reason=(
                f"site-level DP clips the update's difference from the global, and this site trains LoRA at its "
                f"own rank ({other[0]}: {tuple(update[other[0]].shape)} against {tuple(sent[other[0]].shape)}); "
                f"remove the site's lora-rank, or protect patients (dp.unit = patient)")), reply_to=msg)
        private, norm = clip_and_noise(update, {n: sent[n] for n in update}, dp.clip_norm, dp.noise_multiplier)
        reply.content["arrays"] = ArrayRecord.from_torch_state_dict(private)
    metrics = TrainReply.from_record(reply.content["metrics"]).model_copy(
        update={"epsilon": eps_round, "epsilon_total": eps_total, "clip_norm": dp.clip_norm,
                "train_loss": 0.0, "lm_loss": 0.0, "mse": 0.0, "validation": {},
                "train_seconds": 0.0})   # under DP-SGD the time follows how many patients the draws sampled
    reply.content["metrics"] = MetricRecord(metrics.to_record())
    audit.append(ws.audit_path, "dp_round", run=run, round=t.round, unit=dp.unit, epsilon_round=eps_round,
                 epsilon_total=eps_total, delta=dp.delta, clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier,
                 sample_rate=rate, steps=steps, **({"update_norm_before_clip": norm} if norm is not None else {}))
    return reply
