"""The site's signed audit head goes on a reply last.

The center keeps every reply's head (``mllm_dr.audit_heads``): a site log cut or rolled back later
shows against it. This mod sits outside the egress guard and every mod that writes an audit entry
about the reply (``uplink_mod``: ``uplink_encoded``; ``secagg_mod``: ``secagg_masked``; ``dp_mod``:
``dp_round``; the egress guard itself, which settles the round's DP accounting as it releases the
reply: ``dp_refund``, ``dp_unprotected_round``), so the head a reply carries covers every entry
about it: its ``audit-head-entries`` is the log's length as the reply leaves. Until session 40 the
handler took the head before those mods wrote; until session 45 the head went on inside the guard,
so the entry voiding a site's DP guarantee was covered only by the site's next reply.

Being outside the guard, it applies the guard's checks itself: before the message is handled, that the
site's policy allows the head's keys (else every reply would be blocked: nothing is trained or charged),
and after, the guard's policy checks over the reply as it leaves, head included. A block at that last
check comes after the guard settled the round as released: its DP charge stays, the safe side; only a
policy edited mid-message or a reply within a few hundred bytes of the size limit gets there. An error
reply carries no head (Flower's Error has no records).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message

from mllm_dr.audit_heads import WIRE_FIELDS
from mllm_dr.protocol import AUDIT_HEAD

HEAD_KEYS = [AUDIT_HEAD + k.replace("_", "-") for k in WIRE_FIELDS]   # as audit_heads.wire_head names them


def head_mod(msg: Message, context: Context, call_next) -> Message:
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.workspace import Workspace
    from policies.site import site_policy

    ws = Workspace(node_workspace(context.node_config))
    try:
        refused = [k for k in HEAD_KEYS if not site_policy(ws).egress.metric_allowed(k)]
    except Exception as err:      # outside the guard: Flower would send the center the exception's text (a path)
        return _failed(msg, ws, err)
    if refused:
        return _blocked(msg, ws, [f"config {k!r} is not allow-listed" for k in refused])
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        return _with_head(msg, reply, ws)
    except Exception as err:      # outside the guard: Flower would send the center the exception's text (a path)
        return _failed(msg, ws, err)


def _with_head(msg: Message, reply: Message, ws) -> Message:
    """``reply`` with the log's signed head as it is now, if the egress guard's checks still pass over the
    whole reply (the head adds a few hundred bytes); else the BLOCKED error."""
    from fl_client.egress import _problems   # the guard's own checks, over what leaves
    from mllm_dr import audit
    from mllm_dr.audit_heads import wire_head
    from policies.site import site_policy

    config = reply.content.config_records.get("config") or ConfigRecord()
    for key in [k for k in config if k.startswith(AUDIT_HEAD)]:
        del config[key]
    for key, value in wire_head(audit.head(ws.audit_path)).items():
        config[AUDIT_HEAD + key] = value
    reply.content["config"] = config
    found = _problems(reply.content, site_policy(ws))
    return _blocked(msg, ws, [message for message, _ in found]) if found else reply


def _blocked(msg: Message, ws, problems: list[str]) -> Message:
    """The guard's answer to a reply its policy does not let out, audited as the guard audits (``egress_blocked``)."""
    from fl_client.egress import blocked_reply

    return blocked_reply(msg, ws, problems, " with the reply's audit head or size", at="audit head")


def _failed(msg: Message, ws, err: Exception) -> Message:
    """SITE_ERROR naming only the error's type; its text stays in the site's audit log when that can be written."""
    from fl_client.egress import site_error_reply

    return site_error_reply(msg, ws, err, at="the reply's audit head")
