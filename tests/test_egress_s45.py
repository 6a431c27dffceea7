"""Session 45's review of the site's egress guard and of secure aggregation at the site (each test fails on the
code before it unless marked).

1. The egress guard checked reply names by the policy's fnmatch patterns alone: features under an ``lq.*`` name,
   a per-patient prediction under ``ss-``/``val-ss-``/``fm-``, a uint8 tensor of text, a transcript in a key or a
   tensor name (uncounted by the size limit) left the site. Now a reply carries exactly the wire protocol of its
   message type (``mllm_dr/protocol.py``) and tensors of the global it received, of its shapes and the round's
   dtypes.
2. A site masked an update trained from one signed global again under another roster (a failed masked round
   re-keyed by ``--resume`` with one site fewer): the center subtracted the two sums and read that site's update.
   Now each masked release is recorded per run, and a second one for other sites is refused, binding for the run.
"""

from __future__ import annotations

import json

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mllm_dr import secagg as sa

A, B = "lora.l.q_proj.lora_A.weight", "lora.l.q_proj.lora_B.weight"


# ----------------------------------------------------------------------------- messages as the kit builds them
def _global() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"lq.audio.query": torch.randn(4, 8, generator=g), A: torch.randn(8, 16, generator=g),
            B: torch.zeros(32, 8), "maa.head.weight": torch.randn(21, generator=g)}


@pytest.fixture
def ws(tmp_path):
    from mllm_dr.workspace import Workspace

    return Workspace.init(tmp_path / "ws", "site1")


def _limit(ws, max_bytes: int) -> None:
    policy = json.loads((__import__("policies").default_policy_path()).read_text())
    policy["egress"]["max_bytes_per_message"] = max_bytes
    (ws.root / "policy.json").write_text(json.dumps(policy))


def _context(ws, **node):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root), **node}, state=RecordDict(),
                   run_config={})


def _train_msg(state: dict, uplink="fp32", roster="", run="r1", round_=1, signed_round=None):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from mllm_dr.protocol import TrainInstruction

    signed = round_ - 1 if signed_round is None else signed_round
    t = TrainInstruction(context=json.dumps({"run": run, "round": signed}), signature="s", round=round_, stage=2,
                         local_epochs=1, batch_size=2, lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3, uplink=uplink,
                         secagg_roster=roster)
    return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),
                               "config": ConfigRecord(t.to_record())}), dst_node_id=7, message_type="train")


def _query_msg(message_type="query", feature_norms="federated"):
    from flwr.app import ConfigRecord, Message, RecordDict

    from mllm_dr.protocol import SECAGG_KEYS, HandshakeQuery, SecAggKeysQuery

    q = SecAggKeysQuery(run="r1", round=1, base_sha256="x") if message_type == SECAGG_KEYS else \
        HandshakeQuery(run="r1", base_model="tiny-random", base_sha256="x", feature_norms=feature_norms)
    return Message(RecordDict({"config": ConfigRecord(q.to_record())}), dst_node_id=7, message_type=message_type)


def _evaluate_msg(state: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from mllm_dr.protocol import EvaluateInstruction

    e = EvaluateInstruction(context=json.dumps({"run": "r1", "round": 3}), signature="s", max_new_tokens=8)
    return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),
                               "config": ConfigRecord(e.to_record())}), dst_node_id=7, message_type="evaluate")


def _train_metrics(**extra) -> dict:
    from mllm_dr.protocol import TrainReply

    return TrainReply(num_examples=3, lora_scaling=2.0).to_record() | extra


def _content(tensors=None, metrics=None, config=None, **records) -> dict:
    """A reply's records as a handler writes them (``fl_client/app.py::_reply``)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    out = {"config": ConfigRecord({"site-id": "site1"} if config is None else config),
           "metrics": MetricRecord(metrics if metrics is not None else _train_metrics())}
    if tensors is not None:
        out["arrays"] = ArrayRecord.from_torch_state_dict(tensors) if isinstance(tensors, dict) else tensors
    return out | records


def _through(ws, msg, content: dict, mods=None, **node):
    """``msg`` through the egress guard (and ``mods`` inside it) to a handler answering ``content``."""
    from flwr.app import Message, RecordDict
    from flwr.client.mod.utils import make_ffn

    from fl_client.egress import egress_guard

    def handler(m, c):
        return Message(RecordDict(content(m) if callable(content) else content), reply_to=m)

    return make_ffn(handler, [egress_guard, *(mods or [])])(msg, _context(ws, **node))


def _blocked(reply, *kinds) -> bool:
    from mllm_dr.protocol import BLOCKED

    return reply.has_error() and reply.error.code == BLOCKED and all(k in reply.error.reason for k in kinds)


def _last_block(ws) -> list[str]:
    from mllm_dr import audit

    return [e for e in audit.read(ws.audit_path) if e["event"] == "egress_blocked"][-1]["problems"]


# ----------------------------------------------------------------------------- 1. the egress guard: the protocol
def test_features_under_an_allowed_name_leave_only_as_a_tensor_of_the_global(ws, flower_task):
    """`lq.*` allowed any tensor under the LQ-formers' names: a participant's feature frames left as
    `lq.audio.participant_303`, or in place of the global's `lq.audio.query` at their own shape."""
    g, frames = _global(), torch.randn(50, 25)
    new_name = _through(ws, _train_msg(g), _content(g | {"lq.audio.participant_303": frames}))
    assert _blocked(new_name, "tensor is not a tensor of the global this site received")
    assert "participant_303" not in new_name.error.reason and "participant_303" in _last_block(ws)[0]
    reshaped = _through(ws, _train_msg(g), _content(g | {"lq.audio.query": frames}))
    assert _blocked(reshaped, "tensor has another shape than the global's")
    assert "[50, 25], expected [4, 8]" in _last_block(ws)[0]
    assert not _through(ws, _train_msg(g), _content({n: t + 0.1 for n, t in g.items()})).has_error()


def test_a_lora_factor_differs_from_the_global_only_in_the_rank_this_sites_node_trains_at(ws, flower_task):
    """exact-lora: a site at its own rank (`--lora-rank`, its node config) sends A r x in and B out x r; any
    other shape (or that one from a node without its own rank) is blocked."""
    g = _global()
    at_4 = g | {A: torch.randn(4, 16), B: torch.randn(32, 4)}
    assert not _through(ws, _train_msg(g), _content(at_4), **{"lora-rank": 4}).has_error()
    assert _blocked(_through(ws, _train_msg(g), _content(at_4)), "another shape")                  # node rank: none
    at_5 = g | {A: torch.randn(5, 16), B: torch.randn(32, 5)}
    assert _blocked(_through(ws, _train_msg(g), _content(at_5), **{"lora-rank": 4}), "another shape")
    wide = g | {A: torch.randn(4, 17)}                                                             # not the rank's axis
    assert _blocked(_through(ws, _train_msg(g), _content(wide), **{"lora-rank": 4}), "another shape")


def test_a_tensor_of_text_bytes_or_integers_leaves_only_as_the_rounds_encoding(ws, flower_task):
    """A uint8 tensor of text (or bool, int64) at a global tensor's name and shape left: the guard read names only.
    Integers travel only as the round's int8 codes or, masked, int64 ring elements."""
    g = _global()
    text = torch.tensor(list(b"PHQ 303: 17, suicidal"), dtype=torch.uint8)
    assert text.shape == g["maa.head.weight"].shape
    reply = _through(ws, _train_msg(g), _content(g | {"maa.head.weight": text}))
    assert _blocked(reply, "tensor is not of the round's dtype") and "uint8" in _last_block(ws)[0]
    for dtype in (torch.bool, torch.int64, torch.int8):
        odd = g | {"maa.head.weight": torch.ones(21, dtype=dtype)}
        assert _blocked(_through(ws, _train_msg(g), _content(odd)), "dtype"), dtype
    # an int8 round: int8 codes with float32 scales, never a float tensor or another integer in their place
    codes = {n: torch.zeros(t.shape, dtype=torch.int8) for n, t in g.items()}
    scales = {n + ".absmax": torch.ones((t.numel() + 63) // 64) for n, t in g.items()}
    assert not _through(ws, _train_msg(g, "int8"), _content(codes | scales)).has_error()
    assert _blocked(_through(ws, _train_msg(g, "int8"), _content(codes | scales | {"maa.head.weight": text})), "dtype")
    assert _blocked(_through(ws, _train_msg(g, "int8"), _content(codes | scales | {A + ".absmax": torch.ones(50)})),
                    "another shape")
    # a masked round: int64 only (a float tensor there is an update in the clear)
    ring = {n: torch.zeros(t.shape, dtype=torch.int64) for n, t in g.items()}
    ring[sa.WEIGHT] = torch.zeros(1, dtype=torch.int64)
    roster = "site1=00;site2=11;site3=22"
    assert not _through(ws, _train_msg(g, roster=roster), _content(ring)).has_error()
    assert _blocked(_through(ws, _train_msg(g, roster=roster), _content(ring | {B: g[B] + 1})), "dtype")
    unmasked_weight = _through(ws, _train_msg(g), _content(g | {sa.WEIGHT: torch.zeros(1)}))
    assert _blocked(unmasked_weight, "not a tensor of the global")


def test_per_patient_values_under_allowed_prefixes_are_blocked(ws, flower_task):
    """`ss-*`, `val-ss-*`, `fm-*`, `dim-*`, `audit-head-*` allowed anything after the prefix: a prediction left
    as `ss-pred-303`. Now only the protocol's names follow a prefix, in the reply type that has them."""
    g = _global()
    for key in ("ss-pred-303", "val-ss-pred-304", "fm-audio-303-phq", "val-ss-n-303", "pred-303"):
        reply = _through(ws, _train_msg(g), _content(g, _train_metrics(**{key: 14.0})))
        assert _blocked(reply, "metric is not in the protocol"), key
        assert "303" not in reply.error.reason and "304" not in reply.error.reason
    validation = _train_metrics(**{"val-ss-n": 4, "val-ss-sxy": 1.5})
    assert not _through(ws, _train_msg(g), _content(g, validation)).has_error()
    assert _blocked(_through(ws, _train_msg(g), _content(g, config={"site-id": "site1", "audit-head-pid-303": "x"})),
                    "config is not in the protocol")
    # an evaluation reply: ss-/is-/rs-/ss-maa- followed by the statistics' own fields only
    from mllm_dr.evaluation import Evaluation
    from mllm_dr.protocol import EvaluateReply

    real = EvaluateReply.of(Evaluation()).to_record()
    assert not _through(ws, _evaluate_msg(g), _content(metrics=real)).has_error()
    for key in ("ss-pred-303", "ss-maa-pred-303", "is-303", "rs-quote-303", "ss-maa-is-303", "train-loss"):
        assert _blocked(_through(ws, _evaluate_msg(g), _content(metrics=real | {key: 1.0})), "metric is not"), key
    assert _blocked(_through(ws, _evaluate_msg(g), _content(g, metrics=real)), "tensor record is not in the protocol")


def test_the_handshake_sends_the_moments_it_was_asked_for_of_the_widths_it_declares(ws, flower_task):
    """`fm-*` allowed any key: `fm-audio-303-phq` left at the handshake. Now: the moments' own names
    (`protocol.moments_record`) of the widths the reply declares, and only when the run asked for them."""
    from mllm_dr.protocol import HandshakeReply, moments_record

    moments = moments_record({"audio": (120, torch.ones(3), 2 * torch.ones(3))})
    real = HandshakeReply(num_examples=16, dims={"audio": 3, "visual": 5}, moments=moments).to_record()
    assert not _through(ws, _query_msg(), _content(metrics=real)).has_error()
    for key in ("fm-audio-303-phq", "fm-audio-sum-3", "fm-text-n", "dim-text", "fm-audio-sum-01"):
        reply = _through(ws, _query_msg(), _content(metrics=real | {key: 1.0}))
        assert _blocked(reply, "metric is not in the protocol"), key
    # a run normalising per site or per participant asks for no moments: none leave
    assert _blocked(_through(ws, _query_msg(feature_norms="site"), _content(metrics=real)), "metric is not")
    plain = HandshakeReply(num_examples=16, dims={"audio": 3}).to_record()
    assert not _through(ws, _query_msg(feature_norms="site"), _content(metrics=plain)).has_error()


def test_a_transcript_in_a_key_a_tensor_name_or_a_record_name_is_blocked_and_counted(ws, flower_task):
    """A 130 kB transcript in a metric key went out under a 100 kB limit (keys and names were not counted);
    one in a tensor name too. Now names and keys are protocol names and count toward the limit."""
    from flwr.app import ConfigRecord

    _limit(ws, 100_000)
    g = _global()
    transcript = "participant_303_said_I_feel_tired_all_the_time_and_cannot_sleep_" * 2000
    in_key = _through(ws, _train_msg(g), _content(g, _train_metrics(**{"ss-" + transcript: 1.0})))
    assert _blocked(in_key, "metric is not in the protocol", "over the limit")
    assert "tired" not in in_key.error.reason
    in_name = _through(ws, _train_msg(g), _content(g | {"maa." + transcript: torch.zeros(1)}))
    assert _blocked(in_name, "not a tensor of the global", "over the limit")
    notes = {"participant-303-notes": ConfigRecord({"site-id": "site1"})}
    in_record = _through(ws, _train_msg(g), _content(g, **notes))
    assert _blocked(in_record, "config record is not in the protocol") and "303" not in in_record.error.reason
    in_site_id = _through(ws, _train_msg(g), _content(g, config={"site-id": "I feel tired all the time"}))
    assert _blocked(in_site_id, "config site-id is not this site's")
    from mllm_dr.protocol import SECAGG_KEYS

    in_key = _content(metrics={}, config={"site-id": "site1", "secagg-public-key": "I feel tired all the time"})
    assert _blocked(_through(ws, _query_msg(SECAGG_KEYS), in_key), "config public key is not a public key")


def test_names_count_toward_the_size_limit(ws, flower_task):
    """The size limit counted tensor bytes only: a reply whose names alone pass the limit left. Here the names
    are the center's own (a global tensor with a 120 kB name, sent back): only the size blocks it."""
    _limit(ws, 100_000)
    long = {"maa." + "x" * 120_000: torch.zeros(2)}
    reply = _through(ws, _train_msg(long), _content(long))
    assert _blocked(reply, "over the limit") and len(_last_block(ws)) == 1


def test_the_kits_own_replies_pass_the_guard(ws, flower_task):
    """What the kit's mods and handlers send (marked: passes before this change too): a DP'd training reply with
    its validation statistics, an int8 and an fp16 uplink (the real uplink mod), a masked reply (the real secagg
    mod), a key exchange, a handshake with moments, an evaluation."""
    from fl_client.secagg_mod import key_store, secagg_mod
    from fl_client.uplink_mod import uplink_mod
    from mllm_dr.metrics import SufficientStats
    from mllm_dr.protocol import SECAGG_KEYS, SecAggKeysReply, TrainReply, stats_record

    g = _global()
    trained = {n: t + 0.01 for n, t in g.items()}
    dp = TrainReply(num_examples=3, lora_scaling=2.0, epsilon=0.5, epsilon_total=1.5, clip_norm=1.0, bytes_out=10,
                    train_seconds=2.0, validation=stats_record(SufficientStats(n=4, sx=3.0))).to_record()
    assert not _through(ws, _train_msg(g), _content(trained, dp)).has_error()
    from mllm_dr import audit
    from mllm_dr.audit_heads import wire_head
    from mllm_dr.protocol import AUDIT_HEAD

    audit.append(ws.audit_path, "test_entry")
    head = {AUDIT_HEAD + k: v for k, v in wire_head(audit.head(ws.audit_path)).items()}   # as head_mod adds it
    assert not _through(ws, _train_msg(g), _content(trained, config={"site-id": "site1"} | head)).has_error()
    for uplink in ("int8", "fp16"):
        reply = _through(ws, _train_msg(g, uplink), lambda m: _content(trained), [uplink_mod])
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    public = key_store(ws).new("r1", 1)
    roster = sa.format_roster({"site1": public} | {s: sa.public_hex(X25519PrivateKey.generate())
                                                   for s in ("site2", "site3")})
    masked = _through(ws, _train_msg(g, roster=roster), lambda m: _content(trained), [secagg_mod])
    assert not masked.has_error(), masked.error.reason if masked.has_error() else ""
    assert sorted(masked.content["arrays"].keys()) == sorted([*g, sa.WEIGHT])
    keys = _content(metrics={}, config={"site-id": "site1"} | SecAggKeysReply(public_key=public).to_record())
    assert not _through(ws, _query_msg(SECAGG_KEYS), keys).has_error()


def test_every_prefixed_field_of_the_protocol_has_its_names_at_the_guard(flower_task):
    """A prefixed field the guard does not know lets nothing out (``names_after`` answers no name): a new one in
    mllm_dr/protocol.py must be named there, or its replies are blocked (marked: a guard for later changes)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fl_client.egress import names_after
    from mllm_dr.protocol import SITE_REPLIES, HandshakeQuery

    asked = Message(RecordDict({"config": ConfigRecord(HandshakeQuery(run="r", base_model="b", base_sha256="x",
                                                                      feature_norms="federated").to_record())}),
                    dst_node_id=7, message_type="query")
    for part in SITE_REPLIES:
        for field in part.prefixed:
            assert names_after(field, {"dim-audio": 2}, asked), f"{part.__name__}.{field}"


# ----------------------------------------------------------------------------- 2. one masked release per signed global
def _sites(tmp_path, names=("site-a", "site-b", "site-c", "site-d")):
    from mllm_dr.workspace import Workspace

    return {s: Workspace.init(tmp_path / s, s) for s in names}


UPDATES = {"site-a": 0.01, "site-b": 0.02, "site-c": 0.03, "site-d": 0.04, "site1": 0.05}   # each site's training
WEIGHTS = {"site-a": 8, "site-b": 24, "site-c": 40, "site-d": 16, "site1": 12}
GLOBAL = {"maa.v": torch.zeros(50)}


def _masked(wss, site, roster, round_=5, signed_round=4):
    """``site``'s answer to a masked training message of run r1 carrying the global signed as ``signed_round``; its
    training is deterministic (the same update from the same global, as without DP)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from fl_client.secagg_mod import secagg_mod
    from mllm_dr.protocol import TrainReply

    msg = _train_msg(GLOBAL, roster=sa.format_roster(roster), round_=round_, signed_round=signed_round)

    def trained(m, c):
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict({"maa.v": torch.full((50,),
                                                                                                   UPDATES[site])}),
                                   "metrics": MetricRecord(TrainReply(num_examples=WEIGHTS[site],
                                                                      lora_scaling=1.0).to_record())}), reply_to=m)

    return secagg_mod(msg, _context(wss[site]), trained)


def _attempt(wss, sites, round_=5, signed_round=4):
    """A key exchange for (r1, ``round_``) among ``sites``, then each one's masked answer."""
    from fl_client.secagg_mod import key_store

    roster = {s: key_store(wss[s]).new("r1", round_) for s in sites}
    return {s: _masked(wss, s, roster, round_, signed_round) for s in sites}


def test_a_site_masks_an_update_from_one_signed_global_for_one_roster_only(tmp_path, flower_task):
    """The review's replay: round 5 masked over A, B, C, D (the center holds all four replies; say C's is rejected
    and the round fails), then re-keyed with A, B, D from the same signed global. Before: every site masked again
    and the two sums gave C's update. Now each site that released refuses (the release record refuses every such
    try: the refusal itself is for the message only, since it comes before the signature is verified)."""
    from mllm_dr import audit
    from mllm_dr.protocol import REFUSED

    wss = _sites(tmp_path)
    first = _attempt(wss, ["site-a", "site-b", "site-c", "site-d"])
    assert not any(r.has_error() for r in first.values())
    again = _attempt(wss, ["site-a", "site-b", "site-d"])
    for site, reply in again.items():
        assert reply.has_error() and reply.error.code == REFUSED, site
        assert "already released a masked update trained from the global signed as round 4" in reply.error.reason
        refusal = audit.read(wss[site].audit_path)[-1]
        assert refusal["event"] == "secagg_refused" and refusal["run"] == "r1"
    # site-c, whose reply the center rejected, is never asked again; nothing of the second attempt was released
    assert not [e for e in audit.read(wss["site-a"].audit_path) if e["event"] == "secagg_masked"][1:]


def test_the_same_sites_re_keyed_are_answered_and_each_release_is_recorded(tmp_path, flower_task):
    """A round re-keyed with the same sites (a SuperLink that crashed mid-round, then --resume) is answered: its
    sum is the one the center could already decode (marked: answered before too). Each masked release is recorded
    in the workspace before the reply leaves, with the signed round, the global's digest and the sites."""
    from fl_client.secagg_mod import release_path
    from mllm_dr import audit
    from mllm_dr.signing import state_digest

    wss = _sites(tmp_path, ("site-a", "site-b", "site-c"))
    for _ in range(2):
        replies = _attempt(wss, list(wss))
        assert not any(r.has_error() for r in replies.values())
    record = json.loads(release_path(wss["site-a"], "r1").read_text())
    assert record == {"4": {"sites": ["site-a", "site-b", "site-c"], "round": 5,
                            "global_sha256": state_digest(GLOBAL, {"run": "r1", "round": 4}).hex()}}
    masked = [e for e in audit.read(wss["site-a"].audit_path) if e["event"] == "secagg_masked"]
    assert [(e["round"], e["signed_round"]) for e in masked] == [(5, 4), (5, 4)]
    assert masked[0]["global_sha256"] == record["4"]["global_sha256"]


@pytest.mark.parametrize("how", ["deleted", "rolled back", "rewritten"])
def test_a_deleted_or_rolled_back_release_record_is_rebuilt_from_the_audit_log(tmp_path, flower_task, how):
    """The record is anchored to the signed audit log's secagg_masked entries (session 46): deleting it (or
    writing back an older copy) let every site mask the same signed global for a roster one site short, and the
    two sums gave that site's update."""
    from fl_client.secagg_mod import release_path
    from mllm_dr.protocol import REFUSED, SECAGG_FAILED

    wss = _sites(tmp_path)
    assert not any(r.has_error() for r in _attempt(wss, ["site-a", "site-b", "site-c", "site-d"]).values())
    for site in ("site-a", "site-b", "site-d"):
        path = release_path(wss[site], "r1")
        if how == "deleted":
            path.unlink()
        elif how == "rolled back":
            path.write_text(json.dumps({"3": {"sites": ["site-a", "site-b"], "round": 4, "global_sha256": "00"}}))
        else:                  # the same signed round, the roster one site short: the log's entry disagrees
            path.write_text(json.dumps({"4": {"sites": ["site-a", "site-b", "site-d"], "round": 5,
                                              "global_sha256": "00"}}))
    again = _attempt(wss, ["site-a", "site-b", "site-d"])
    for site, reply in again.items():
        assert reply.has_error(), site
        if how == "rewritten":
            assert reply.error.code == SECAGG_FAILED and "names other sites" in reply.error.reason
        else:
            assert reply.error.code == REFUSED
            assert "already released a masked update trained from the global signed as round 4" in reply.error.reason


def test_a_training_message_whose_round_is_not_the_one_after_its_signed_global_is_refused(tmp_path, flower_task):
    """The unsigned round was never compared with the signed one: a center could re-key "round 6" with the round-4
    global (the key, masks and release record follow the unsigned round). Refused, binding, before training."""
    from mllm_dr.protocol import REFUSED

    wss = _sites(tmp_path, ("site-a", "site-b", "site-c"))
    replies = _attempt(wss, list(wss), round_=6, signed_round=4)
    for site, reply in replies.items():
        assert reply.has_error() and reply.error.code == REFUSED, site
        assert "for round 6 and carries the global signed as round 4" in reply.error.reason


def test_an_unreadable_release_record_masks_nothing(tmp_path, flower_task):
    """A damaged record cannot tell a second release from a first: the site masks nothing until it is restored."""
    from fl_client.secagg_mod import release_path
    from mllm_dr.protocol import SECAGG_FAILED

    wss = _sites(tmp_path, ("site-a", "site-b", "site-c"))
    release_path(wss["site-a"], "r1").parent.mkdir(parents=True)
    release_path(wss["site-a"], "r1").write_text("{not json")
    reply = _attempt(wss, list(wss))["site-a"]
    assert reply.has_error() and reply.error.code == SECAGG_FAILED and "cannot be read" in reply.error.reason
    assert str(wss["site-a"].root) not in reply.error.reason


def test_a_second_release_is_refused_at_every_try_without_binding_the_run(site_ws, flower_task):
    """A site refuses a second masked release of one signed global for other sites at every try (its release
    record), but the refusal does not bind the run: it comes before the message's signature is verified, and an
    unsigned message must not make a site quit a run (a second read, session 45)."""
    from fl_client.secagg_mod import key_store
    from mllm_dr.federation_policy import check_run

    wss = {"site1": site_ws}
    peers = {s: sa.public_hex(X25519PrivateKey.generate()) for s in ("site2", "site3", "site4")}
    for others in (("site2", "site3"), ("site2", "site4"), ("site3", "site4")):
        roster = {"site1": key_store(site_ws).new("r1", 5)} | {s: peers[s] for s in others}
        reply = _masked(wss, "site1", roster)
    assert reply.has_error() and "already released" in reply.error.reason     # the third try too
    assert check_run(site_ws, "r1", "", "x", "train") is None
    assert not [e for e in audit_events(site_ws) if e == "federation_refused"]


def audit_events(ws) -> list[str]:
    from mllm_dr import audit

    return [e["event"] for e in audit.read(ws.audit_path)]


def test_an_unsigned_message_cannot_make_a_site_quit_a_run(tmp_path, flower_task):
    """A training message with a round that does not follow its (unverified) signed global is refused, for that
    message only: it bound the run before the signature was checked, so anyone reaching the center's port could
    make every site quit any run name (a second read, session 45)."""
    from mllm_dr.protocol import REFUSED

    wss = _sites(tmp_path, ("site-a", "site-b", "site-c"))
    replies = _attempt(wss, list(wss), round_=7, signed_round=4)
    for site, ws in wss.items():
        assert replies[site].has_error() and replies[site].error.code == REFUSED
        assert "federation_refused" not in audit_events(ws)     # what check_run would hold to for the run
        assert list((ws.root / "federation" / "secagg").glob("r1-round*"))    # its key for the round is kept
