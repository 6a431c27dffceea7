"""The site's signed audit head goes on a reply last.

The center keeps every reply's head (``mllm_dr.audit_heads``): a site log cut or rolled back later
shows against it. This mod sits just inside the egress guard and outside every mod that writes an
audit entry about the reply (``uplink_mod``: ``uplink_encoded``; ``secagg_mod``: ``secagg_masked``;
``dp_mod``: ``dp_round``), so the head a reply carries covers the round's own entries. Until session
40 the handler took the head before those mods wrote, and a round's last entries were covered only
by the site's next reply. An error reply carries no head (Flower's Error has no records).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message


def head_mod(msg: Message, context: Context, call_next) -> Message:
    from mllm_dr import audit
    from mllm_dr.audit_heads import wire_head
    from mllm_dr.protocol import AUDIT_HEAD
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.workspace import Workspace

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    ws = Workspace(node_workspace(context.node_config))
    config = reply.content.config_records.get("config") or ConfigRecord()
    for key in [k for k in config if k.startswith(AUDIT_HEAD)]:
        del config[key]
    for key, value in wire_head(audit.head(ws.audit_path)).items():
        config[AUDIT_HEAD + key] = value
    reply.content["config"] = config
    return reply
