"""The site's outermost mod on train and evaluate messages: unpack the center's tensors before
anything reads them, pack the reply's tensors after everything (egress guard included) has seen
them by name. The format is ``fl_server/wire.py``'s; a message whose tensors this site cannot use
(not packed, not safetensors, a dtype Flower's records cannot hold) is refused with one line naming
the problem, and audited."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Error, Message

from fl_server.wire import ARRAYS, packed_record, unpacked
from mllm_dr.errors import InputError
from mllm_dr.protocol import REFUSED


def wire_mod(msg: Message, context: Context, call_next) -> Message:
    if ARRAYS in msg.content.array_records:
        what = f"{msg.metadata.message_type} message from the center"
        try:
            msg.content[ARRAYS] = ArrayRecord.from_torch_state_dict(unpacked(msg.content[ARRAYS], what))
        except Exception as err:     # outside the egress guard: Flower would send the center its own text
            reason = str(err) if isinstance(err, InputError) else \
                f"{what}: its tensors cannot be used here ({type(err).__name__}: {err})"
            return _refused(msg, context, (reason.splitlines() or [what])[0][:400])
    reply = call_next(msg, context)
    if not reply.has_error() and ARRAYS in reply.content.array_records:
        reply.content[ARRAYS] = packed_record(reply.content[ARRAYS].to_torch_state_dict())
    return reply


def _refused(msg: Message, context: Context, reason: str) -> Message:
    """The REFUSED reply to a message whose tensors this site cannot use, written to the site's audit log
    (``center_message_refused``; the reason describes only the center's own message)."""
    from mllm_dr import audit
    from mllm_dr.rehearsal import node_workspace
    from mllm_dr.workspace import Workspace

    try:
        ws = Workspace(node_workspace(context.node_config))
    except InputError:       # no site workspace behind this node (a bare test harness): no log to write to
        ws = None
    if ws is not None:
        audit.append(ws.audit_path, "center_message_refused", message_type=msg.metadata.message_type, reason=reason)
    return Message(Error(code=REFUSED, reason=reason), reply_to=msg)
