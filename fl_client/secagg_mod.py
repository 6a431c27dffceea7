"""Secure aggregation as a client mod on training replies (the math is in ``mllm_dr/secagg.py``).

It sits inside the egress guard (the guard inspects the masked reply: the same tensor names
plus ``secagg.weight``) and outside the DP mod (site-level DP noise is added before masking).
A training message with a key roster is answered masked, with the key this site made for the
round at the key exchange; a message without one is refused when the site's or the run's
policy requires secure aggregation: a site that requires it never sends an update in the clear.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord

from mllm_dr.protocol import REFUSED, SECAGG_FAILED, TrainInstruction, TrainReply


def secagg_settings(site_policy, run) -> tuple[bool, float, int]:
    """(required, clip bound, fewest sites) from the site's and the run's policies (``run``: None for the
    default): the stricter of both."""
    on = [p.secagg for p in (site_policy, run) if p is not None and p.secagg.enabled]
    clip = min((s.clip_norm for s in on), default=site_policy.secagg.clip_norm)
    return bool(on), clip, max((s.min_sites for s in on), default=site_policy.secagg.min_sites)


def key_store(ws):
    from mllm_dr.secagg import KeyStore

    return KeyStore(ws.root / "federation" / "secagg")


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    from mllm_dr import audit
    from mllm_dr.federation_policy import read_run_policy, refuse_run
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.secagg import SecAggError, mask_update, parse_roster
    from mllm_dr.workspace import Workspace
    from policies.site import site_policy

    ws = Workspace(node_workspace(context.node_config))
    t = TrainInstruction.from_record(msg.content["config"])
    me, run = ws.config.site_id, json.loads(t.context)["run"]
    run_policy, unreadable = read_run_policy(t.policy)
    if unreadable:      # read here before the handler's check_run: refused as it would, binding for the run
        return Message(Error(code=REFUSED, reason=refuse_run(ws, run, msg.metadata.message_type, [unreadable])),
                       reply_to=msg)
    required, clip, min_sites = secagg_settings(site_policy(ws), run_policy)
    if not t.secagg_roster:
        if not required:
            return call_next(msg, context)
        reason = f"site {me} requires secure aggregation; this training message of run {run} carries no key roster"
        audit.append(ws.audit_path, "secagg_refused", run=run, round=t.round, reason=reason)
        return Message(Error(code=REFUSED, reason=reason), reply_to=msg)
    try:
        roster = parse_roster(t.secagg_roster)
        if len(roster) < min_sites:
            raise SecAggError(f"a masked sum over {len(roster)} site(s); this site's policy requires {min_sites}")
        key = key_store(ws).take(run, t.round)
    except SecAggError as err:
        audit.append(ws.audit_path, "secagg_refused", run=run, round=t.round, reason=str(err))
        return Message(Error(code=SECAGG_FAILED, reason=f"site {me}: {err}"), reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    sent = msg.content["arrays"].to_torch_state_dict()
    update = reply.content["arrays"].to_torch_state_dict()
    metrics = TrainReply.from_record(reply.content["metrics"])
    try:
        if set(update) - set(sent):
            raise SecAggError(f"the reply carries tensors the global state lacks: {sorted(set(update) - set(sent))[:3]}")
        masked, norm = mask_update(update, {n: sent[n] for n in update}, metrics.num_examples, me, key, roster, run,
                                   t.round, clip)
    except SecAggError as err:
        return Message(Error(code=SECAGG_FAILED, reason=f"site {me}: {err}"), reply_to=msg)
    reply.content["arrays"] = ArrayRecord.from_torch_state_dict(masked)
    reply.content["metrics"] = MetricRecord(metrics.model_copy(update={"secagg_clip": clip}).to_record())
    audit.append(ws.audit_path, "secagg_masked", run=run, round=t.round, sites=sorted(roster), clip_norm=clip,
                 update_norm_before_clip=norm, clipped=norm > clip)
    return reply
