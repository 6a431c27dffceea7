"""Differential privacy as a client mod on training replies only (evaluate replies carry
sufficient statistics, not tensors), for either privacy unit of the site's policy:

- ``dp.unit = "site"``: the mod clips and noises the reply's tensors against the global state
  the center sent (one Gaussian mechanism per round);
- ``dp.unit = "patient"``: the trainer runs DP-SGD (``charged_dp`` hands it the settings charged); the
  mod accounts the round's steps.

Either way the mod keeps the site's (epsilon, delta) ledger for that unit, refuses to train once
the next round would pass the budget (charging each round before it trains, under a lock), reports epsilon in the reply and the audit log, and
withholds the reply's loss, validation statistics and training time (the epsilon does not cover them).
A round trained without DP at a site whose ledgers hold charges is marked in them as unprotected (the
guarantee is void) when its reply is released. A charge is taken back when nothing of its round leaves
the site: here when the handler fails, and by the egress guard (``settle_charge``) when the final reply
is an error; what is to be settled travels in ``context.state``.
"""

from __future__ import annotations

import json
import uuid

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord

from mllm_dr.protocol import BUDGET_SPENT, REFUSED, TrainInstruction, TrainReply

CHARGE = "dp-charge"       # context.state: the ConfigRecord naming this message's charge, for settle_charge
MECHANISM = "dp-mechanism"  # context.state: the patient-level DP-SGD settings charged, for the trainer (charged_dp)
UNPROTECTED = "dp-unprotected"   # context.state: a round without DP to mark in the ledgers when released


def effective_dp(run_policy_json: str, site_policy):
    """The strictest of the site's and the run's DP settings: a run never weakens a site's DP. A run policy
    this site cannot read is an InputError (``read_run_policy``, the one reading of it)."""
    from mllm_dr.errors import InputError
    from mllm_dr.federation_policy import read_run_policy

    run, unreadable = read_run_policy(run_policy_json)
    if unreadable:
        raise InputError(unreadable)
    return site_policy.dp.strictest(run.dp if run is not None else None)


def round_mechanism(dp, trainer, local_epochs: int) -> tuple[float, int]:
    """(sampling rate, steps) one round of ``local_epochs`` charges to the ledger of ``dp.unit``: the
    trainer's DP-SGD steps for a patient (``trainer``: ``trainer_dp``), the whole update once for a site."""
    if trainer is not None:
        return dp.sample_rate, local_epochs * trainer.steps_per_epoch
    return 1.0, 1


def budget_refusal(ws, run_policy_json: str, local_epochs: int = 1) -> str | None:
    """Why this site's DP budget cannot cover a round of ``local_epochs``, else None. Asked at a masked
    round's key exchange: a site that would refuse the training message must stay out of the roster, or
    its refusal (after the key exchange) fails the round for every site (a privacy review, session 41)."""
    from mllm_dr.errors import InputError
    from mllm_dr.privacy import BudgetSpent, PrivacyLedger
    from policies.site import site_policy

    mine = site_policy(ws)
    try:
        dp = effective_dp(run_policy_json, mine)
        if not dp.enabled:
            return None
        rate, steps = round_mechanism(dp, trainer_dp(dp, ws), local_epochs)
        PrivacyLedger.of(ws.root, dp.unit).check(dp.noise_multiplier, dp.delta, dp.epsilon_budget, rate, steps)
    except BudgetSpent as err:
        return str(err)
    except InputError as err:     # the detail stays on site: it can name a participant or a folder (session 45)
        return _unchecked_budget(ws, err)
    return None


BUDGET_UNCHECKED = ("this site cannot check its privacy budget for the round (the reason is in its audit log, "
                    "event privacy_budget_unchecked)")


def _unchecked_budget(ws, err) -> str:
    """The fixed reason the center reads when the budget cannot be checked (an unreadable ledger, corpus or run
    policy); the error itself goes to the site's audit log. Its message used to go to the center: a corpus with
    two folders of one participant named that participant and the folders."""
    from mllm_dr import audit

    audit.append(ws.audit_path, "privacy_budget_unchecked", error=str(err))
    return BUDGET_UNCHECKED


def trainer_dp(dp, ws):
    """The trainer's DP-SGD settings for these effective DP settings when they protect each patient,
    else None. A step trains one of the questionnaire's items when ``dp.step = "item"``."""
    from mllm_dr.dataset import load_corpus
    from mllm_dr.training import PatientDP

    if not (dp.enabled and dp.unit == "patient"):
        return None
    items = tuple(load_corpus(ws).item_names) if dp.step == "item" else None
    return PatientDP(dp.clip_norm, dp.noise_multiplier, dp.sample_rate, items, optimizer=dp.optimizer)


def charged_dp(context: Context):
    """(the trainer's DP-SGD settings, the steps charged) exactly as ``dp_mod`` charged this message's round,
    or (None, None) when the round has no patient-level DP. Built once, at the charge: the handler re-read the
    site's policy and corpus after loading the model, so a policy edited in between trained another mechanism
    (8x the steps with ``step`` switched to item) than the one the ledger was charged for (a DP-path review,
    session 43)."""
    from mllm_dr.training import PatientDP

    rec = context.state.get(MECHANISM)
    if rec is None:
        return None, None
    items = tuple(str(i) for i in rec["items"]) if rec["items"] else None
    return (PatientDP(float(rec["clip_norm"]), float(rec["noise_multiplier"]), float(rec["sample_rate"]), items,
                      optimizer=str(rec["optimizer"])), int(rec["steps"]))


def _charge_mechanism(context: Context, dp, steps: int) -> None:
    """Hand the trainer the patient-level mechanism this round was charged for (``charged_dp``)."""
    context.state[MECHANISM] = ConfigRecord({
        "clip_norm": float(dp.clip_norm), "noise_multiplier": float(dp.noise_multiplier),
        "sample_rate": float(dp.sample_rate), "items": list(dp.items or []), "optimizer": dp.optimizer,
        "steps": int(steps)})


def settle_charge(context: Context, released: bool) -> str | None:
    """Called by the outermost mod with the reply it is about to let out. The charge ``dp_mod`` made for this
    message (``CHARGE`` in ``context.state``) is taken back when that reply is an error (``released`` False:
    blocked by the egress guard, an uplink or masking error after the charge; audited, its ``dp_round`` entry
    being written); a round without DP at a site with DP charges (``UNPROTECTED``) is marked in its ledgers
    when it is released, never before. Both are cleared either way (a Context's state outlives the message).
    Never raises: the reason the ledger could not record a release, else None (the caller then sends
    nothing: a release the ledger does not hold must not leave)."""
    from mllm_dr import audit
    from mllm_dr.privacy import PrivacyLedger, refund_charge
    from mllm_dr.rehearsal import node_workspace

    context.state.pop(MECHANISM, None)
    charged, unprotected = context.state.pop(CHARGE, None), context.state.pop(UNPROTECTED, None)
    root = node_workspace(context.node_config)
    try:
        if charged is not None and not released:
            refund_charge(root, str(charged["charge"]), "the reply that left the site was an error", audited=True)
        if unprotected is not None and released:
            for unit in unprotected["units"]:
                PrivacyLedger.of(root, str(unit)).mark_unprotected(str(unprotected["run"]), int(unprotected["round"]),
                                                                  float(unprotected["delta"]))
    except Exception as err:          # outside the guard's own handling: never the exception's text to the center
        audit.append(PrivacyLedger.of(root, "site").audit_path, "dp_settle_failed", error=f"{type(err).__name__}: {err}")
        return f"the privacy ledger could not record the round ({type(err).__name__}; see the site's audit log)"
    return None


def _await_release(context: Context, charge: str) -> None:
    """Name this message's charge in ``context.state``, for the outermost mod's ``settle_charge``."""
    context.state[CHARGE] = ConfigRecord({"charge": charge})


def _charged_call(msg: Message, context: Context, call_next, ws, charge: str) -> Message:
    """``call_next`` for a charged round: the charge is taken back here when the handler or a mod inside
    fails or answers an error (nothing of the round left the site), else by ``settle_charge`` when the
    reply is blocked later."""
    from mllm_dr.privacy import refund_charge

    _await_release(context, charge)
    try:
        reply = call_next(msg, context)
    except BaseException as err:
        refund_charge(ws.root, charge, f"the round's training failed ({type(err).__name__})")
        context.state.pop(CHARGE, None)
        raise
    if reply.has_error():
        refund_charge(ws.root, charge, f"the round was answered with error {reply.error.code}")
        context.state.pop(CHARGE, None)
    return reply


def _unprotected_round(msg: Message, context: Context, call_next, ws, run: str, round_: int, delta: float) -> Message:
    """A round without DP: where the workspace's ledgers hold charges, the same patients' data leaves
    unprotected, so each such ledger marks the round when its reply leaves (``settle_charge``; its epsilon
    becomes infinite: ``PrivacyLedger.mark_unprotected``). The ledgers are read before training: one that
    cannot be read refuses the round at once, not after it trained."""
    from mllm_dr import audit
    from mllm_dr.errors import InputError
    from mllm_dr.privacy import ledgers

    try:
        charged = [led.unit for led in ledgers(ws.root) if led.own()]
    except InputError as err:          # the path stays in the site's audit log, the center reads the reason only
        audit.append(ws.audit_path, "dp_ledger_unreadable", error=str(err))
        return Message(Error(code=REFUSED, reason=f"site {ws.config.site_id} refuses to train: {err.message}"),
                       reply_to=msg)
    reply = call_next(msg, context)
    if charged and not reply.has_error():
        context.state[UNPROTECTED] = ConfigRecord({"units": charged, "run": run, "round": int(round_),
                                                   "delta": float(delta)})
    return reply


def _site_level_noise(msg: Message, reply: Message, dp) -> tuple[Message, float | None]:
    """The reply with its tensors clipped and noised against the global the center sent, and the update's
    norm before clipping; an error reply for a site at its own LoRA rank. An update that is not finite
    raises NonFiniteUpdate before any noise (``clip_and_noise``)."""
    from mllm_dr.privacy import clip_and_noise

    sent = msg.content["arrays"].to_torch_state_dict()
    update = reply.content["arrays"].to_torch_state_dict()
    other = [n for n in update if n in sent and update[n].shape != sent[n].shape]
    if other:          # a site at its own LoRA rank: a difference of factors of other shapes means nothing
        return Message(Error(code=REFUSED, reason=(
            f"site-level DP clips the update's difference from the global, and this site trains LoRA at its "
            f"own rank ({other[0]}: {tuple(update[other[0]].shape)} against {tuple(sent[other[0]].shape)}); "
            f"remove the site's lora-rank, or protect patients (dp.unit = patient)")), reply_to=msg), None
    private, norm = clip_and_noise(update, {n: sent[n] for n in update}, dp.clip_norm, dp.noise_multiplier)
    reply.content["arrays"] = ArrayRecord.from_torch_state_dict(private)
    return reply, norm


def dp_mod(msg: Message, context: Context, call_next) -> Message:
    from mllm_dr import audit
    from mllm_dr.federated import trains_in
    from mllm_dr.privacy import BudgetSpent, PrivacyLedger, json_epsilon
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.workspace import Workspace
    from policies.site import site_policy

    ws = Workspace(node_workspace(context.node_config))
    t = TrainInstruction.from_record(msg.content["config"])
    for key in (MECHANISM, UNPROTECTED):          # never an earlier message's (a Context's state outlives it)
        context.state.pop(key, None)
    dp = effective_dp(t.policy, site_policy(ws))
    ctx = json.loads(t.context)
    run = ctx["run"]
    if not trains_in(ctx, t.stage):      # an empty update: no mechanism runs, nothing is charged (session 44)
        return call_next(msg, context)
    if not dp.enabled:
        return _unprotected_round(msg, context, call_next, ws, run, t.round, dp.delta)
    ledger = PrivacyLedger.of(ws.root, dp.unit)
    trainer = trainer_dp(dp, ws)                # what the trainer runs (patient level): built once, here
    rate, steps = round_mechanism(dp, trainer, t.local_epochs)
    charge = uuid.uuid4().hex
    try:      # charged before training: two runs at once cannot both pass the check on the same history
        eps_round, eps_total = ledger.spend(run, t.round, dp.noise_multiplier, dp.clip_norm, dp.delta,
                                            dp.epsilon_budget, rate, steps, charge)
    except BudgetSpent as err:
        audit.append(ws.audit_path, "privacy_budget_spent", unit=dp.unit, epsilon=json_epsilon(ledger.spent(dp.delta)),
                     budget=dp.epsilon_budget)
        return Message(Error(code=BUDGET_SPENT, reason=str(err)), reply_to=msg)
    norms = []

    def train_and_noise(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if dp.unit != "site" or reply.has_error():
            return reply
        reply, norm = _site_level_noise(m, reply, dp)
        norms.append(norm)
        return reply

    if trainer is not None:
        _charge_mechanism(context, trainer, steps)
    reply = _charged_call(msg, context, train_and_noise, ws, charge)
    if reply.has_error():
        return reply
    metrics = TrainReply.from_record(reply.content["metrics"]).model_copy(
        update={"epsilon": eps_round, "epsilon_total": eps_total, "clip_norm": dp.clip_norm,
                "train_loss": 0.0, "lm_loss": 0.0, "mse": 0.0, "validation": {},
                "train_seconds": 0.0})   # under DP-SGD the time follows how many patients the draws sampled
    reply.content["metrics"] = MetricRecord(metrics.to_record())
    audit.append(ws.audit_path, "dp_round", run=run, round=t.round, unit=dp.unit, epsilon_round=eps_round,
                 epsilon_total=eps_total, delta=dp.delta, clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier,
                 sample_rate=rate, steps=steps, **({"update_norm_before_clip": norms[0]} if norms else {}))
    return reply
