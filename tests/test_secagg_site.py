"""A site's side of secure aggregation through the real ClientApp: keys, masking, the egress guard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mllm_dr import secagg as sa
from policies.schema import SitePolicy, load_policy
from test_policy_privacy import _handshake, _refused


def _policy(**secagg) -> SitePolicy:
    pol = load_policy().model_dump() | {"min_participants": 2}
    pol["secagg"].update({"enabled": True, "min_sites": 3, "clip_norm": 2.0} | secagg)
    return SitePolicy.model_validate(pol)


def _context(ws):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})


def _keys(ws, run_policy: SitePolicy, run="r1", round_=1, local_epochs=None):
    from flwr.app import ConfigRecord, Message, RecordDict

    from fl_client.app import app
    from mllm_dr.base_model import base_info
    from mllm_dr.protocol import SECAGG_KEYS, SecAggKeysQuery

    q = SecAggKeysQuery(run=run, round=round_, base_sha256=base_info("tiny-random").sha256,
                        policy=run_policy.model_dump_json(), local_epochs=local_epochs)
    return app(Message(RecordDict({"config": ConfigRecord(q.to_record())}), dst_node_id=7, message_type=SECAGG_KEYS),
               _context(ws))


def _train(ws, handler_tensors, roster: str, run_policy: SitePolicy, run="r1", round_=1):
    """A training message through the real mods (egress guard outside, secagg inside) to a stub trainer."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_client.egress import egress_guard
    from fl_client.head_mod import head_mod
    from fl_client.secagg_mod import secagg_mod
    from mllm_dr.protocol import TrainInstruction

    app = ClientApp()

    @app.train(mods=[head_mod, egress_guard, secagg_mod])         # the real app's order (TRAIN_MODS)
    def train(msg, context):
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(handler_tensors),
                                   "metrics": MetricRecord({"num-examples": 16, "lora-scaling": 2.0})}), reply_to=msg)

    t = TrainInstruction(context=json.dumps({"run": run, "round": round_ - 1}), signature="", round=round_, stage=2,
                         local_epochs=1, batch_size=1, lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3,
                         policy=run_policy.model_dump_json(), secagg_roster=roster)
    sent = ArrayRecord.from_torch_state_dict({n: torch.zeros_like(t) for n, t in handler_tensors.items()})
    return app(Message(RecordDict({"arrays": sent, "config": ConfigRecord(t.to_record())}), dst_node_id=7,
                       message_type="train"), _context(ws))


def test_a_secagg_site_joins_masks_and_the_guard_sees_only_allowed_names(site_ws, flower_task):
    from mllm_dr import audit, audit_heads
    from mllm_dr.protocol import REFUSED, SECAGG_FAILED

    (site_ws.root / "policy.json").write_text(_policy().model_dump_json())
    run_policy = _policy()
    assert not _handshake(site_ws, run_policy).has_error()                 # refused before this issue
    assert _refused(_handshake(site_ws, _policy(enabled=False), run="plain"), "secure aggregation")
    assert _refused(_handshake(site_ws, _policy(min_sites=2), run="two"), "secure aggregation over 2 site(s)")

    keys = _keys(site_ws, run_policy)
    public = keys.content["config"]["secagg-public-key"]
    head = audit_heads.from_fields(keys.content["config"])          # like every reply: the site's signed head
    assert head and head["entries"] == len(audit.read(site_ws.audit_path)) and audit.verify_head(head)
    peers = {s: sa.public_hex(X25519PrivateKey.generate()) for s in ("site2", "site3")}
    roster = sa.format_roster(peers | {"site1": public})
    update = {"maa.w": torch.full((64,), 0.01), "lora.l.q_proj.lora_B.weight": torch.full((8, 2), 0.02)}
    reply = _train(site_ws, update, roster, run_policy)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    arrays = reply.content["arrays"].to_torch_state_dict()
    assert sorted(arrays) == sorted(update) + [sa.WEIGHT]                 # the names the guard allowed
    assert all(t.dtype == torch.int64 for t in arrays.values())
    plain = sa.encode(16 * np.full(64, 0.01))
    assert not np.array_equal(arrays["maa.w"].numpy().view(np.uint64), plain)
    assert reply.content["metrics"]["secagg-clip"] == 2.0
    # the reply's signed head covers the round's own entry (secagg_masked): until session 40 the head was
    # taken in the handler, before the mods wrote, so the center's record missed a round's last entries
    log = audit.read(site_ws.audit_path)
    head = audit_heads.from_fields(reply.content["config"])
    assert log[-1]["event"] == "secagg_masked" and head["entries"] == len(log) and audit.verify_head(head)
    from fl_client.app import EVALUATE_MODS, QUERY_MODS, TRAIN_MODS
    from fl_client.egress import egress_guard
    from fl_client.head_mod import head_mod
    writers = [m for m in TRAIN_MODS if m.__name__ in ("uplink_mod", "secagg_mod", "dp_mod")]
    assert len(writers) == 3 and all(TRAIN_MODS.index(head_mod) + 1 == TRAIN_MODS.index(egress_guard)
                                     < TRAIN_MODS.index(m) for m in writers)     # the head outside the guard (s45)
    assert all(mods.index(head_mod) + 1 == mods.index(egress_guard) for mods in (QUERY_MODS, EVALUATE_MODS))

    # the key was used: a second masked reply for the same round is refused, not sent in the clear
    again = _train(site_ws, update, roster, run_policy)
    assert again.has_error() and again.error.code == SECAGG_FAILED
    # masked or not, a stray tensor name is still stopped by the guard
    _keys(site_ws, run_policy, round_=2)
    pub2 = [e for e in audit.read(site_ws.audit_path) if e["event"] == "secagg_keys"][-1]["public_key"]
    stray = _train(site_ws, update | {"features.audio": torch.zeros(3)}, sa.format_roster(peers | {"site1": pub2}),
                   run_policy, round_=2)
    assert stray.has_error() and "tensor is not allow-listed" in stray.error.reason
    assert "features.audio" in [e for e in audit.read(site_ws.audit_path) if e["event"] == "egress_blocked"][-1][
        "problems"][0]
    # a site that requires secure aggregation never answers a training message without a roster
    unmasked = _train(site_ws, update, "", run_policy, round_=3)
    assert unmasked.has_error() and unmasked.error.code == REFUSED
    # a roster smaller than the site's minimum is refused
    _keys(site_ws, run_policy, round_=4)
    pub4 = [e for e in audit.read(site_ws.audit_path) if e["event"] == "secagg_keys"][-1]["public_key"]
    small = _train(site_ws, update, sa.format_roster({"site1": pub4, "site2": peers["site2"]}), run_policy, round_=4)
    assert small.has_error() and "requires 3" in small.error.reason
    events = [e["event"] for e in audit.read(site_ws.audit_path)]
    assert events.count("secagg_masked") == 2 and events.count("egress_blocked") == 1   # the stray one: masked, blocked
    assert events.count("secagg_refused") == 3


def test_a_site_whose_dp_budget_is_spent_stays_out_of_the_masked_rounds_roster(site_ws, flower_task):
    """Session 41 (a privacy review): the key exchange checked the run, not the DP budget, so a site that
    had spent its budget joined the roster, then refused the training message: it counted as dropped after
    the key exchange and failed the round for every site, at every resume. Now it answers the key exchange
    with BUDGET_SPENT (the center leaves it out of that round's roster) and makes no key. (Site-level DP
    with secure aggregation is refused at the join: its noise would be clipped away.)"""
    from mllm_dr import audit
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.protocol import BUDGET_SPENT

    pol = _policy().model_dump()
    pol["dp"].update({"enabled": True, "unit": "patient", "noise_multiplier": 1.0, "clip_norm": 1.0,
                      "sample_rate": 0.25, "epsilon_budget": 18.0})
    run_policy = SitePolicy.model_validate(pol)
    (site_ws.root / "policy.json").write_text(run_policy.model_dump_json())
    ledger = PrivacyLedger.of(site_ws.root, "patient")
    assert not _keys(site_ws, run_policy, run="r9", round_=1).has_error()     # one epoch: epsilon 11.3 of 18
    ledger.record("earlier", 1, 1.0, 1.0, 1e-5, 0.25, 32)                    # one epoch spent: two give 15.9
    two = _keys(site_ws, run_policy, run="r9", round_=2, local_epochs=2)     # a round of 2 epochs: 19.7 > 18
    assert two.has_error() and two.error.code == BUDGET_SPENT
    assert not _keys(site_ws, run_policy, run="r9", round_=2).has_error()
    ledger.record("earlier", 2, 1.0, 1.0, 1e-5, 0.25, 32)                    # three would give 19.7 > 18
    spent = _keys(site_ws, run_policy, run="r9", round_=3)
    assert spent.has_error() and spent.error.code == BUDGET_SPENT and "budget" in spent.error.reason
    log = audit.read(site_ws.audit_path)
    assert log[-1]["event"] == "privacy_budget_spent" and log[-1]["round"] == 3
    assert [e["round"] for e in log if e["event"] == "secagg_keys" and e["run"] == "r9"] == [1, 2]
    # site-level DP with secure aggregation: refused at the join, named
    pol["dp"]["unit"] = "site"
    site_dp = SitePolicy.model_validate(pol)
    (site_ws.root / "policy.json").write_text(site_dp.model_dump_json())
    assert _refused(_keys(site_ws, site_dp, run="r10"), "site-level differential privacy with secure aggregation")
    from pydantic import ValidationError

    from fl_server.plan import RunPlan

    with pytest.raises(ValidationError, match="site-level differential privacy with secure aggregation"):
        RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "aggregation": "ffa-lora",
                                "policy": site_dp.model_dump_json(), "feature-norms": "site"})
