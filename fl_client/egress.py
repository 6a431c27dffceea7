"""Egress guard: a Flower client mod that inspects every reply before it leaves the site.

Whatever the handler produced, a reply leaves only if it is exactly what the wire protocol
(``mllm_dr/protocol.py``) lets a reply of its message type carry, and the site's policy allows it:

- records: ``config`` and ``metrics``, and ``arrays`` in a training reply; nothing else;
- keys: the protocol's keys of that reply (``SiteId``, ``HandshakeReply``, ``SecAggKeysReply``, ``TrainReply``,
  ``EvaluateReply``), each allow-listed by the site's policy; a prefixed key (``val-ss-``, ``ss-``, ``fm-``,
  ``dim-``, ``audit-head-``...) only with one of the protocol's names after its prefix (a statistic's field, a
  modality, a moment of a width the same reply declares, an audit-head field), never free text;
- tensors: only names of the global the site received (plus the int8 uplink's ``.absmax`` scales and the
  masked ``secagg.weight``), each of the global's shape (a LoRA factor may differ in the rank this site's
  node trains at) and floating point, or the round's int8 codes or int64 ring elements; allow-listed by name;
- values: every number finite, the site id this site's; the whole message under the size limit, its
  record names, tensor names and keys counted with its values.

Until session 45 the policy's name patterns alone decided: features under an ``lq.*`` name, a prediction under
``ss-pred-303``, a uint8 tensor of text or a transcript in a key left the site. Otherwise the whole reply is
replaced by an error (the center learns only the kinds of problem) and the block is written to the audit log.
It decides whether a round's reply is released, so it settles the round's DP accounting there
(``privacy_mod.settle_charge``): a round whose reply is an error released nothing and its charge is taken back;
a round without DP released at a site with DP charges is marked as unprotected. (Only ``wire_mod``'s packing
lies outside it: a failure there keeps the charge, the patients' side.)
"""

from __future__ import annotations

import math
import re

import numpy as np
from flwr.app import Context, Error, Message

from mllm_dr.protocol import (BLOCKED, EVALUATE, QUERY, SECAGG_KEYS, SITE_ERROR, TRAIN, EvaluateReply,
                              HandshakeQuery, HandshakeReply, SecAggKeysReply, SiteId, TrainInstruction, TrainReply)

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"   # the records of a reply (fl_client/app.py::_reply)
METRIC_PARTS = {QUERY: (HandshakeReply,), TRAIN: (TrainReply,), EVALUATE: (EvaluateReply,)}   # key exchange: none
CONFIG_PARTS = {SECAGG_KEYS: (SiteId, SecAggKeysReply)}    # every other reply: SiteId alone
FLOATING = ("float16", "float32", "float64")              # a plain (fp32 uplink) reply's tensors
PUBLIC_KEY = re.compile(r"[0-9a-f]{64}")                   # an X25519 public key in hex (mllm_dr/secagg.py)

Problem = tuple[str, str]   # (message naming the key: the site's audit log; the kind without it: the center's)


# ----------------------------------------------------------------------------- the checks
def reply_problems(msg: Message, reply: Message, context: Context) -> list[Problem]:
    """Everything wrong with ``reply`` (to ``msg``) as it would leave (empty = it may): the site policy's
    allow-lists, the exact protocol of the message type, the size limit (last)."""
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.workspace import Workspace
    from policies.site import site_policy

    ws = Workspace(node_workspace(context.node_config))
    policy, content, tensors = site_policy(ws), reply.content, _decoded(reply.content)
    return (_policy_problems(content, policy, tensors) + _record_problems(msg, content) + _key_problems(msg, content)
            + _value_problems(content, ws.config.site_id) + _tensor_problems(msg, tensors, context)
            + _size_problems(content, policy))


def _problems(content, policy) -> list[Problem]:
    """The policy's part alone (allow-lists, finite numbers, size), without the message the reply answers
    (``head_mod``'s check of a reply the guard passed, again with its audit head; ``reply_problems`` is the whole
    check)."""
    return _policy_problems(content, policy, _decoded(content)) + _size_problems(content, policy)


def _decoded(content) -> list[tuple[str, object]]:
    """(name, numpy array) of every tensor of the reply as it will be packed (``Array.numpy``: the dtype and
    shape its bytes have, not the ones its header states); None for one that cannot be read."""
    out = []
    for rec in content.array_records.values():
        for name in rec.keys():
            try:
                out.append((name, rec[name].numpy()))
            except Exception:
                out.append((name, None))
    return out


def _policy_problems(content, policy, tensors) -> list[Problem]:
    """Names allow-listed by the site's policy (its fnmatch patterns), numbers finite, config values short scalars."""
    problems: list[Problem] = []
    for name, arr in tensors:
        if not policy.egress.tensor_allowed(name):
            problems.append((f"tensor {name!r} is not allow-listed", "tensor is not allow-listed"))
        elif arr is None:
            problems.append((f"tensor {name!r} cannot be read as an array", "tensor cannot be read as an array"))
        elif arr.dtype.kind in "fc" and not bool(np.isfinite(arr).all()):
            problems.append((f"tensor {name!r} has non-finite values", "tensor has non-finite values"))
    for rec in content.metric_records.values():
        for key, value in rec.items():
            if not policy.egress.metric_allowed(key):
                problems.append((f"metric {key!r} is not allow-listed", "metric is not allow-listed"))
            elif isinstance(value, list) or not math.isfinite(float(value)):
                problems.append((f"metric {key!r} must be one finite number", "metric must be one finite number"))
    for rec in content.config_records.values():
        for key, value in rec.items():
            if not policy.egress.metric_allowed(key):
                problems.append((f"config {key!r} is not allow-listed", "config is not allow-listed"))
            elif isinstance(value, (bytes, list)) or len(str(value)) > 128:
                problems.append((f"config {key!r} must be a short scalar", "config must be a short scalar"))
    return problems


def _record_problems(msg: Message, content) -> list[Problem]:
    """Only the protocol's records: ``config``, ``metrics`` and, answering a training message, ``arrays`` (a
    record's name travels too)."""
    expected = (("config", content.config_records, {CONFIG}), ("metric", content.metric_records, {METRICS}),
                ("tensor", content.array_records, {ARRAYS} if msg.metadata.message_type == TRAIN else set()))
    return [(f"{kind} record {name!r} is not in the protocol's {msg.metadata.message_type} reply",
             f"{kind} record is not in the protocol")
            for kind, records, allowed in expected for name in records if name not in allowed]


def _key_problems(msg: Message, content) -> list[Problem]:
    """Every metric and config key is one of the protocol's for this message type's reply (``protocol_keys``)."""
    mtype, problems = msg.metadata.message_type, []
    for kind, records, parts in (("metric", content.metric_records, METRIC_PARTS.get(mtype, ())),
                                 ("config", content.config_records, CONFIG_PARTS.get(mtype, (SiteId,)))):
        for rec in records.values():
            fixed, prefixed = protocol_keys(parts, rec, msg)
            problems += [(f"{kind} {key!r} is not a key of the protocol's {mtype} reply", f"{kind} is not in the "
                          f"protocol") for key in rec if not _is_protocol_key(key, fixed, prefixed)]
    return problems


def _value_problems(content, site_id: str) -> list[Problem]:
    """The protocol's free strings hold what the protocol says: the site id is this site's, a public key is one
    (each could carry 128 characters of a transcript past the short-scalar rule)."""
    site_key, key_key = SiteId.model_fields["site_id"].alias, SecAggKeysReply.model_fields["public_key"].alias
    problems = []
    for rec in content.config_records.values():
        if site_key in rec and rec[site_key] != site_id:
            problems.append((f"config {site_key!r} is not this site's id", "config site-id is not this site's"))
        if key_key in rec and not (isinstance(rec[key_key], str) and PUBLIC_KEY.fullmatch(rec[key_key])):
            problems.append((f"config {key_key!r} is not a public key", "config public key is not a public key"))
    return problems


def _tensor_problems(msg: Message, tensors, context: Context) -> list[Problem]:
    """Each tensor of a training reply is one the site received in the global, of its shape and of the round's
    wire dtype (``_name_problem``, ``_shape_problem``, ``_dtype_problem``). Other replies carry no arrays
    record (``_record_problems``)."""
    if msg.metadata.message_type != TRAIN:
        return []
    received = msg.content.array_records.get(ARRAYS)
    received = {name: tuple(received[name].shape) for name in received.keys()} if received is not None else {}
    encoding, masked = _wire(msg)
    rank = int(context.node_config.get("lora-rank") or 0)     # the rank this site's node trains LoRA at (app.py)
    shapes = {name: tuple(arr.shape) for name, arr in tensors if arr is not None}
    problems = []
    for name, arr in tensors:
        if arr is None:
            continue                                          # (_policy_problems: cannot be read)
        why = _name_problem(name, shapes, received, encoding, masked) or \
            _shape_problem(name, shapes, received, rank) or _dtype_problem(name, str(arr.dtype), encoding, masked)
        if why:
            detail, kind = why
            problems.append((f"tensor {name!r} {detail}", f"tensor {kind}"))
    return problems


def _size_problems(content, policy) -> list[Problem]:
    """The whole message under ``max_bytes_per_message``: values, and the record names, tensor names and keys
    beside them (a transcript in a key used to travel uncounted)."""
    size = sum(len(name.encode()) for name in content.keys())
    for rec in content.array_records.values():
        size += sum(len(name.encode()) + len(rec[name].data) for name in rec.keys())
    for rec in content.metric_records.values():
        size += sum(len(key.encode()) + 8 * (len(v) if isinstance(v, list) else 1) for key, v in rec.items())
    for rec in content.config_records.values():
        size += sum(len(key.encode()) + (len(v) if isinstance(v, bytes) else len(str(v).encode()))
                    for key, v in rec.items())
    if size <= policy.egress.max_bytes_per_message:
        return []
    over = f"reply is {size} bytes, over the limit of {policy.egress.max_bytes_per_message}"
    return [(over, over)]


# ----------------------------------------------------------------------------- the protocol's keys
def protocol_keys(parts, record, msg: Message) -> tuple[set[str], list[tuple[str, set[str]]]]:
    """The keys the protocol's reply ``parts`` give a ``record``: their fields' wire keys, and each prefixed
    field's prefix with the names that may follow it (``names_after``), longest prefix first (as
    ``Wire.from_record`` reads them: ``ss-maa-is-`` before ``ss-maa-`` before ``ss-``)."""
    fixed, prefixed = set(), []
    for part in parts:
        fixed |= {f.alias or n for n, f in part.model_fields.items() if n not in part.prefixed}
        prefixed += [(prefix, names_after(field, record, msg)) for field, prefix in part.prefixed.items()]
    return fixed, sorted(prefixed, key=lambda p: -len(p[0]))


def _is_protocol_key(key: str, fixed: set[str], prefixed: list[tuple[str, set[str]]]) -> bool:
    """``key`` is a field's wire key, or a prefix followed by one of the names ``protocol_keys`` gives it."""
    if key in fixed:
        return True
    for prefix, names in prefixed:
        if key.startswith(prefix):
            return key[len(prefix):] in names    # the longest prefix decides
    return False


def names_after(field: str, record, msg: Message) -> set[str]:
    """What may follow the prefix of the protocol's prefixed ``field``: the protocol's own names, never free
    text. A prefixed field not named here lets nothing out (``test_egress_s45`` checks every one is)."""
    from mllm_dr.audit_heads import WIRE_FIELDS
    from mllm_dr.config import MODALITIES
    from mllm_dr.grounding import RationaleStats
    from mllm_dr.metrics import ItemStats, SufficientStats

    if field == "audit_head":                                    # SiteId: audit_heads.wire_head's keys
        return {k.replace("_", "-") for k in WIRE_FIELDS}
    if field == "dims":                                          # HandshakeReply: dim-<modality>
        return set(MODALITIES)
    if field == "moments":                                       # HandshakeReply: fm-<modality>-(n|sum-i|sumsq-i)
        return _moment_names(record, msg)
    if field in ("validation", "stats", "head_stats"):           # TrainReply val-ss-, EvaluateReply ss-, ss-maa-
        return set(SufficientStats().to_dict())
    if field in ("item_stats", "head_item_stats"):               # EvaluateReply is-, ss-maa-is-
        return set(ItemStats().to_dict())
    if field == "rationale_stats":                               # EvaluateReply rs-
        return set(RationaleStats().to_dict())
    return set()


def _moment_names(record, msg: Message) -> set[str]:
    """The frame moments' names (``protocol.moments_record``) for the widths the same reply declares (``dim-*``),
    and only when the handshake asked for them (``feature-norms = federated``)."""
    import torch

    from mllm_dr.config import MODALITIES
    from mllm_dr.protocol import moments_record

    try:
        asked = HandshakeQuery.from_record(msg.content[CONFIG]).send_moments
    except Exception:
        asked = False
    if not asked:
        return set()
    dims = {}
    for m in MODALITIES:
        value = record.get(HandshakeReply.prefixed["dims"] + m)
        if isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value == int(value):
            dims[m] = min(int(value), len(record))      # (a width no reply of this size could fill is not built)
    return set(moments_record({m: (0, torch.zeros(d), torch.zeros(d)) for m, d in dims.items()}))


# ----------------------------------------------------------------------------- the tensors' rules
def _wire(msg: Message) -> tuple[str, bool]:
    """(uplink encoding, masked) of the training message: how its reply's tensors travel (``uplink_mod``,
    ``secagg_mod``). An instruction that cannot be read gets the strictest: plain floating point."""
    try:
        t = TrainInstruction.from_record(msg.content[CONFIG])
    except Exception:
        return "fp32", False
    return t.uplink, bool(t.secagg_roster)


def _name_problem(name: str, shapes: dict, received: dict, encoding: str, masked: bool) -> tuple[str, str] | None:
    """A tensor of the global received, the int8 scale of one sent beside it, or the masked weight."""
    from mllm_dr.compression import ABSMAX
    from mllm_dr.secagg import WEIGHT

    codes = name.removesuffix(ABSMAX)
    if name in received or (masked and name == WEIGHT) or \
            (encoding == "int8" and codes != name and codes in received and codes in shapes):
        return None
    why = "is not a tensor of the global this site received"
    return why, why


def _shape_problem(name: str, shapes: dict, received: dict, rank: int) -> tuple[str, str] | None:
    """The global's shape; a LoRA factor at the rank this site's node trains at (A: rank x in, B: out x rank, as
    fl_server's shape check takes them); an int8 scale one value per block of its codes; the masked weight one."""
    from mllm_dr.aggregation import LORA_A, LORA_B
    from mllm_dr.compression import ABSMAX, BLOCK
    from mllm_dr.secagg import WEIGHT

    if name in received:
        want = received[name]
        allowed = [want]
        if rank and len(want) == 2 and f".{LORA_A}." in name:
            allowed.append((rank, want[1]))
        if rank and len(want) == 2 and f".{LORA_B}." in name:
            allowed.append((want[0], rank))
    elif name == WEIGHT:
        allowed = [(1,)]
    else:
        allowed = [(math.ceil(math.prod(shapes[name.removesuffix(ABSMAX)]) / BLOCK),)]
    got = shapes[name]
    if got in allowed:
        return None
    expected = " or ".join(str(list(a)) for a in allowed)
    return f"has shape {list(got)}, expected {expected}", "has another shape than the global's"


def _dtype_problem(name: str, dtype: str, encoding: str, masked: bool) -> tuple[str, str] | None:
    """Floating point (float16/32/64); int64 ring elements when masked; int8 codes with float32 scales under an
    int8 uplink; float16 under fp16. Never bool, uint8 or another integer (a tensor of text bytes)."""
    from mllm_dr.compression import ABSMAX

    if masked:
        allowed = ("int64",)
    elif encoding == "int8":
        allowed = ("float32",) if name.endswith(ABSMAX) else ("int8",)
    elif encoding == "fp16":
        allowed = ("float16",)
    else:
        allowed = FLOATING
    if dtype in allowed:
        return None
    return f"is {dtype}; this round sends {' or '.join(allowed)}", "is not of the round's dtype"


# ----------------------------------------------------------------------------- the mod
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
    from mllm_dr.rehearsal import node_workspace   # a virtual node's workspace: mllm_dr/rehearsal.py
    from mllm_dr.workspace import Workspace

    from mllm_dr.errors import ModelMismatchError
    from mllm_dr.rehearsal import SimulatedDropout
    from mllm_dr.signing import SignatureError

    try:
        reply = call_next(msg, context)
    except (SignatureError, ModelMismatchError, SimulatedDropout):
        raise      # built from the center's own message (signature, base, rank) or a rehearsal's script: no site data
    except Exception as err:    # Flower would send its text to the center: a path, a participant id...
        return site_error_reply(msg, Workspace(node_workspace(context.node_config)), err)
    if reply.has_error():
        return reply
    ws = Workspace(node_workspace(context.node_config))
    found = reply_problems(msg, reply, context)
    if not found:
        return reply
    # the center reads the kinds of problem, never the names: a blocked key may be named after a participant
    return blocked_reply(msg, ws, [message for message, _ in found], ": " + "; ".join(sorted({k for _, k in found})))


def blocked_reply(msg: Message, ws, problems: list[str], summary: str, **extra) -> Message:
    """BLOCKED, audited (``egress_blocked``: the problems, names included, stay in the site's log); the center reads
    how many problems and ``summary`` (their kinds, never the names). ``head_mod`` answers its own blocks so too."""
    from mllm_dr import audit

    entry = audit.append(ws.audit_path, "egress_blocked", message_type=msg.metadata.message_type,
                         problems=problems[:10], n_problems=len(problems), **extra)
    return Message(Error(code=BLOCKED, reason=f"blocked by the site's egress guard ({len(problems)} problem(s)"
                                              f"{summary}; the names stay on site, audit entry {entry['seq']}, "
                                              f"event egress_blocked)"), reply_to=msg)


def site_error_reply(msg: Message, ws, err: Exception, at: str = "") -> Message:
    """SITE_ERROR naming only the error's type (its text may hold a path or a participant id); the text stays in
    the site's audit log (``handler_error``) when that can be written. ``at``: where it happened, if not the
    handler."""
    from mllm_dr import audit

    try:
        entry = audit.append(ws.audit_path, "handler_error", message_type=msg.metadata.message_type,
                             error=f"{at + ': ' if at else ''}{type(err).__name__}: {err}")
        where = f"audit entry {entry['seq']}, event handler_error"
    except Exception:
        where = "the audit log could not be written"
    return Message(Error(code=SITE_ERROR, reason=f"site error ({type(err).__name__}){' at ' + at if at else ''}; "
                                                 f"the details stay on site ({where})"), reply_to=msg)
