"""The site's outermost mod on train and evaluate messages: unpack the center's tensors before
anything reads them, pack the reply's tensors after everything (egress guard included) has seen
them by name. The format is ``fl_server/wire.py``'s; a message whose tensors are not packed is
answered with an error naming the problem."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Error, Message

from fl_server.wire import ARRAYS, packed_record, unpacked
from mllm_dr.errors import InputError
from mllm_dr.protocol import REFUSED


def wire_mod(msg: Message, context: Context, call_next) -> Message:
    if ARRAYS in msg.content.array_records:
        try:
            tensors = unpacked(msg.content[ARRAYS], f"{msg.metadata.message_type} message from the center")
        except InputError as err:
            return Message(Error(code=REFUSED, reason=str(err)), reply_to=msg)
        msg.content[ARRAYS] = ArrayRecord.from_torch_state_dict(tensors)
    reply = call_next(msg, context)
    if not reply.has_error() and ARRAYS in reply.content.array_records:
        reply.content[ARRAYS] = packed_record(reply.content[ARRAYS].to_torch_state_dict())
    return reply
