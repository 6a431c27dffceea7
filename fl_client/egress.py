"""Egress guard: a Flower client mod that inspects every reply before it leaves the site.

Whatever the handler produced, a reply leaves only if every tensor name and every metric
or config key is allow-listed by the site's policy, every number is finite, and the
message is under the size limit. Otherwise the whole reply is replaced by an error (the
center learns only that it was blocked) and the block is written to the audit log. It decides
whether a round's reply is released, so it settles the round's DP accounting there
(``privacy_mod.settle_charge``): a round whose reply is an error released nothing and its charge is
taken back; a round without DP released at a site with DP charges is marked as unprotected. (Only
``wire_mod``'s packing lies outside it: a failure there keeps the charge, the patients' side.)
"""

from __future__ import annotations

import math

from flwr.app import Context, Error, Message

from mllm_dr.protocol import BLOCKED, SITE_ERROR


def _problems(content, policy) -> list[tuple[str, str]]:
    """Everything wrong with a reply's RecordDict under ``policy`` (empty = may leave), each as (message
    naming the key: the site's audit log; the same without the name: what the center may read)."""
    problems: list[tuple[str, str]] = []
    size = 0
    for rname, rec in content.array_records.items():
        for name in rec.keys():
            arr = rec[name]
            size += len(arr.data)
            if not policy.egress.tensor_allowed(name):
                problems.append((f"tensor {name!r} is not allow-listed", "tensor is not allow-listed"))
            elif not bool(__import__("numpy").isfinite(arr.numpy()).all()):
                problems.append((f"tensor {name!r} has non-finite values", "tensor has non-finite values"))
    for rname, rec in content.metric_records.items():
        for key, value in rec.items():
            size += 8 * (len(value) if isinstance(value, list) else 1)
            if not policy.egress.metric_allowed(key):
                problems.append((f"metric {key!r} is not allow-listed", "metric is not allow-listed"))
            elif isinstance(value, list) or not math.isfinite(float(value)):
                problems.append((f"metric {key!r} must be one finite number", "metric must be one finite number"))
    for rname, rec in content.config_records.items():
        for key, value in rec.items():
            size += len(str(value))
            if not policy.egress.metric_allowed(key):
                problems.append((f"config {key!r} is not allow-listed", "config is not allow-listed"))
            elif isinstance(value, (bytes, list)) or len(str(value)) > 128:
                problems.append((f"config {key!r} must be a short scalar", "config must be a short scalar"))
    if size > policy.egress.max_bytes_per_message:
        over = f"reply is {size} bytes, over the limit of {policy.egress.max_bytes_per_message}"
        problems.append((over, over))
    return problems


def egress_guard(msg: Message, context: Context, call_next) -> Message:
    """The outermost mod: the reply as it may leave (``_guarded``), then what the round kept waiting for its
    fate is settled: its DP charge (``settle_charge``) and its uplink residual (``settle_residual``, session 44),
    kept only when the reply is released."""
    from fl_client.privacy_mod import settle_charge
    from fl_client.uplink_mod import settle_residual

    try:
        reply = _guarded(msg, context, call_next)
    except BaseException:
        settle_charge(context, released=False)     # nothing of the round left the site
        settle_residual(context, released=False)
        raise
    problem = settle_charge(context, released=not reply.has_error())
    settle_residual(context, released=not reply.has_error() and not problem)
    if problem:              # a release the privacy ledger does not hold never leaves
        return Message(Error(code=SITE_ERROR, reason=f"site error: {problem}"), reply_to=msg)
    return reply


def _guarded(msg: Message, context: Context, call_next) -> Message:
    """The reply as it may leave the site: the handler's, or an error (a failure, a block)."""
    from mllm_dr import audit
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.workspace import Workspace
    from policies.site import site_policy

    from mllm_dr.errors import ModelMismatchError
    from mllm_dr.rehearsal import SimulatedDropout
    from mllm_dr.signing import SignatureError

    try:
        reply = call_next(msg, context)
    except (SignatureError, ModelMismatchError, SimulatedDropout):
        raise      # built from the center's own message (signature, base, rank) or a rehearsal's script: no site data
    except Exception as err:    # Flower would send its text to the center: a path, a participant id...
        ws = Workspace(node_workspace(context.node_config))
        entry = audit.append(ws.audit_path, "handler_error", message_type=msg.metadata.message_type,
                             error=f"{type(err).__name__}: {err}")
        return Message(Error(code=SITE_ERROR, reason=f"site error ({type(err).__name__}); the details stay on site "
                                                     f"(audit entry {entry['seq']}, event handler_error)"), reply_to=msg)
    if reply.has_error():
        return reply
    ws = Workspace(node_workspace(context.node_config))
    found = _problems(reply.content, site_policy(ws))
    if not found:
        return reply
    problems = [message for message, _ in found]
    entry = audit.append(ws.audit_path, "egress_blocked", message_type=msg.metadata.message_type,
                         problems=problems[:10], n_problems=len(problems))
    # the center reads the kinds of problem, never the names: a blocked key may be named after a participant
    kinds = sorted({kind for _, kind in found})
    return Message(Error(code=BLOCKED, reason=f"blocked by the site's egress guard ({len(problems)} problem(s): "
                                              f"{'; '.join(kinds)}; the names stay on site, audit entry "
                                              f"{entry['seq']}, event egress_blocked)"), reply_to=msg)
