"""Compressed uplink as a client mod on training replies (the logic is in ``mllm_dr/uplink.py``).

It sits inside the egress guard (the guard inspects the encoded reply: int8 codes and their
``.absmax`` scales, which the site's policy must allow) and outside the DP mod (site-level DP
noise goes in before quantization: encoding is post-processing, the epsilon holds). The run's
encoding comes with the training message (``TrainInstruction.uplink``); the site's
error-feedback residual is kept in ``federation/uplink/<run>.safetensors`` of its workspace; a round's
new residual waits beside it (``.pending``) until the egress guard lets the reply out
(``settle_residual``): a blocked or failed round keeps nothing (session 44: its residual, of an update
never released and, under DP, of a refunded charge, went out with the next round).
A masked (secure-aggregation) round cannot be compressed: the site refuses it before training.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord

from mllm_dr.protocol import REFUSED, TrainInstruction, TrainReply

PENDING = "uplink-pending"    # context.state: the run whose new residual waits for the reply's release


def uplink_mod(msg: Message, context: Context, call_next) -> Message:
    from mllm_dr import audit
    from mllm_dr.compression import wire_bytes
    from mllm_dr.rehearsal import node_workspace
    from mllm_dr.uplink import encode_update, pending_path, residual_path
    from mllm_dr.workspace import Workspace

    t = TrainInstruction.from_record(msg.content["config"])
    if t.uplink == "fp32":
        return call_next(msg, context)
    ws = Workspace(node_workspace(context.node_config))   # a real SuperNode's, or a rehearsal's virtual site
    run = json.loads(t.context)["run"]
    if t.secagg_roster:
        reason = (f"a masked (secure-aggregation) round cannot carry a {t.uplink} uplink: masks are int64 ring "
                  f"elements; run {run} must use --uplink fp32")
        audit.append(ws.audit_path, "uplink_refused", run=run, round=t.round, reason=reason)
        return Message(Error(code=REFUSED, reason=reason), reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    received = msg.content["arrays"].to_torch_state_dict()
    update = reply.content["arrays"].to_torch_state_dict()
    residual = residual_path(ws.root, run)
    wire = encode_update(update, received, t.uplink, residual, save_to=pending_path(residual))
    context.state[PENDING] = ConfigRecord({"run": run})
    metrics = TrainReply.from_record(reply.content["metrics"])
    reply.content["arrays"] = ArrayRecord.from_torch_state_dict(wire)
    reply.content["metrics"] = MetricRecord(metrics.model_copy(update={"bytes_out": wire_bytes(wire)}).to_record())
    audit.append(ws.audit_path, "uplink_encoded", run=run, round=t.round, encoding=t.uplink,
                 bytes_before=metrics.bytes_out, bytes_out=wire_bytes(wire), tensor_names=sorted(wire))
    return reply


def settle_residual(context: Context, released: bool) -> str | None:
    """Called by the outermost mod (the egress guard) with the fate of the reply it lets out: the round's new
    error-feedback residual replaces the run's when the reply is released, and is dropped when it is not
    (blocked, failed, refused by the privacy ledger). Never raises: the reason the residual could not be
    kept, else None (a release whose residual is lost sends a little less than the site trained; nothing
    more leaves)."""
    import os

    from mllm_dr import audit
    from mllm_dr.rehearsal import node_workspace
    from mllm_dr.uplink import pending_path, residual_path
    from mllm_dr.workspace import Workspace

    rec = context.state.pop(PENDING, None)
    if rec is None:
        return None
    ws = Workspace(node_workspace(context.node_config))
    try:
        residual = residual_path(ws.root, str(rec["run"]))
        if released:
            os.replace(pending_path(residual), residual)
        else:
            pending_path(residual).unlink(missing_ok=True)
    except Exception as err:           # never the exception's text to the center
        audit.append(ws.audit_path, "uplink_residual_failed", run=str(rec["run"]), released=released,
                     error=f"{type(err).__name__}: {err}")
        return f"{type(err).__name__}"
    return None
