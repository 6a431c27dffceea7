"""Compressed uplink as a client mod on training replies (the logic is in ``mllm_dr/uplink.py``).

It sits inside the egress guard (the guard inspects the encoded reply: int8 codes and their
``.absmax`` scales, which the site's policy must allow) and outside the DP mod (site-level DP
noise goes in before quantization: encoding is post-processing, the epsilon holds). The run's
encoding comes with the training message (``TrainInstruction.uplink``); the site's
error-feedback residual is kept in ``federation/uplink/<run>.safetensors`` of its workspace.
A masked (secure-aggregation) round cannot be compressed: the site refuses it before training.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord

from mllm_dr.protocol import REFUSED, TrainInstruction, TrainReply


def uplink_mod(msg: Message, context: Context, call_next) -> Message:
    from mllm_dr import audit
    from mllm_dr.compression import wire_bytes
    from mllm_dr.rehearsal import node_workspace
    from mllm_dr.uplink import encode_update, residual_path
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
    wire = encode_update(update, received, t.uplink, residual_path(ws.root, run))
    metrics = TrainReply.from_record(reply.content["metrics"])
    reply.content["arrays"] = ArrayRecord.from_torch_state_dict(wire)
    reply.content["metrics"] = MetricRecord(metrics.model_copy(update={"bytes_out": wire_bytes(wire)}).to_record())
    audit.append(ws.audit_path, "uplink_encoded", run=run, round=t.round, encoding=t.uplink,
                 bytes_before=metrics.bytes_out, bytes_out=wire_bytes(wire), tensor_names=sorted(wire))
    return reply
