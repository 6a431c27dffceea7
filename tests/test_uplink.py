"""The compressed uplink wired through a site's real mod chain (egress guard -> uplink mod -> handler)
and decoded as the center decodes it: delta + error feedback, the egress guard, masked rounds."""

from __future__ import annotations

import json

import pytest
import torch

from mllm_dr.compression import BLOCK, ErrorFeedback, wire_bytes
from mllm_dr.uplink import decode_update, encode_update, residual_path

A, B = "lora.l.q_proj.lora_A.weight", "lora.l.q_proj.lora_B.weight"


def _global(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(2, 64, generator=g), B: torch.randn(64, 2, generator=g), "maa.v": torch.randn(130, generator=g)}


def _site_app(handler_update, called: list):
    """A ClientApp whose train handler returns ``handler_update(received)`` as the trained tensors."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_client.egress import egress_guard
    from fl_client.uplink_mod import uplink_mod
    from mllm_dr.adapters import state_bytes
    from mllm_dr.protocol import TrainReply

    app = ClientApp()

    @app.train(mods=[egress_guard, uplink_mod])
    def train(msg, context):
        called.append(1)
        update = handler_update(msg.content["arrays"].to_torch_state_dict())
        reply = TrainReply(num_examples=3, lora_scaling=2.0, bytes_out=state_bytes(update))
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(update),
                                   "metrics": MetricRecord(reply.to_record())}), reply_to=msg)

    return app


def _train_msg(state, round_, uplink, roster=""):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from mllm_dr.protocol import TrainInstruction

    t = TrainInstruction(context=json.dumps({"run": "r1", "round": round_ - 1}), signature="s", round=round_, stage=2,
                         local_epochs=1, batch_size=2, lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3, uplink=uplink,
                         secagg_roster=roster)
    return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),
                              "config": ConfigRecord(t.to_record())}), dst_node_id=7, message_type="train")


@pytest.fixture
def ws(tmp_path):
    from mllm_dr.workspace import Workspace

    return Workspace.init(tmp_path / "ws", "site1")


def _ctx(ws):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})


def test_site_sends_the_encoded_delta_and_carries_its_residual_to_the_next_round(ws, flower_task):
    """Each round the site trains by the same small delta; the center decodes and adds its global back."""
    g = torch.Generator().manual_seed(1)
    delta = {n: 0.05 * torch.randn(t.shape, generator=g) for n, t in _global().items()}
    delta["maa.v"][1] = 0.4 * 0.05 / 127             # below half an int8 step of its block: lost without feedback
    delta["maa.v"][0] = 0.05                         # ... whose absmax is this
    delta["maa.v"][2:BLOCK] = 0.0
    app = _site_app(lambda received: {n: received[n] + delta[n] for n in delta}, called := [])
    state, sent_sum = _global(), {n: torch.zeros_like(t) for n, t in delta.items()}
    for round_ in (1, 2, 3, 4):
        reply = app(_train_msg(state, round_, "int8"), _ctx(ws))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        wire = reply.content["arrays"].to_torch_state_dict()
        assert sorted(wire) == sorted([*delta, *(n + ".absmax" for n in delta)])
        assert all(wire[n].dtype == torch.int8 for n in delta)
        assert reply.content["metrics"]["bytes-out"] == wire_bytes(wire) < 0.3 * 4 * sum(t.numel() for t in delta.values())
        decoded = decode_update(wire, state, "int8")             # the center's view: global + decoded delta
        for n in delta:
            step = wire[n + ".absmax"].max() / 254
            assert (decoded[n] - (state[n] + delta[n])).abs().max() <= 2 * step + 1e-6, n   # delta + one residual
            sent_sum[n] += decoded[n] - state[n]
        state = decoded
    true_sum = {n: 4 * t for n, t in delta.items()}
    residual = ErrorFeedback.load(residual_path(ws.root, "r1")).residual
    for n in delta:   # error feedback: what the center summed is the true sum minus the last residual, exactly
        assert torch.allclose(sent_sum[n], true_sum[n] - residual[n], atol=1e-5), n
    assert float(sent_sum["maa.v"][1]) > 0.5 * float(true_sum["maa.v"][1])      # the small value got through
    assert float(encode_update({"v": delta["maa.v"]}, {}, "int8", None)["v"][1]) == 0   # plain int8 drops it
    events = [json.loads(ln)["event"] for ln in ws.audit_path.read_text().splitlines()]
    assert events.count("uplink_encoded") == 4 and len(called) == 4


def test_fp32_uplink_is_the_reply_as_trained_and_keeps_no_file(ws, flower_task):
    app = _site_app(lambda received: {n: t + 0.1 for n, t in received.items()}, [])
    reply = app(_train_msg(_global(), 1, "fp32"), _ctx(ws))
    wire = reply.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(wire[n], t + 0.1) for n, t in _global().items())
    assert not residual_path(ws.root, "r1").exists()


def test_egress_guard_passes_int8_replies_and_blocks_stray_names(ws, flower_task):
    from mllm_dr import audit
    from mllm_dr.protocol import BLOCKED

    reply = _site_app(lambda received: {n: t * 1.1 for n, t in received.items()}, [])(
        _train_msg(_global(), 1, "fp16"), _ctx(ws))
    assert not reply.has_error() and reply.content["arrays"][B].dtype == "float16"
    stray = _site_app(lambda received: {**received, "features.audio": torch.ones(5, 4)}, [])
    reply = stray(_train_msg(_global(), 1, "int8"), _ctx(ws))
    assert reply.has_error() and reply.error.code == BLOCKED and "tensor is not allow-listed" in reply.error.reason
    assert "features.audio" not in reply.error.reason                  # the name stays on site, in its audit log
    assert "features.audio" in [e for e in audit.read(ws.audit_path) if e["event"] == "egress_blocked"][-1]["problems"][0]
    # a site policy that allows only the codes (no .absmax companions) blocks an int8 reply: its choice
    policy = json.loads((__import__("policies").default_policy_path()).read_text())
    policy["egress"]["tensor_patterns"] = [p for p in policy["egress"]["tensor_patterns"] if "absmax" not in p]
    (ws.root / "policy.json").write_text(json.dumps(policy))
    reply = _site_app(lambda received: dict(received), [])(_train_msg(_global(), 1, "int8"), _ctx(ws))
    assert reply.has_error() and reply.error.code == BLOCKED and "tensor is not allow-listed" in reply.error.reason
    assert ".absmax" in [e for e in audit.read(ws.audit_path) if e["event"] == "egress_blocked"][-1]["problems"][0]


def test_a_masked_round_with_a_compressed_uplink_is_refused_before_training(ws, flower_task):
    from mllm_dr.protocol import REFUSED

    called = []
    reply = _site_app(lambda received: dict(received), called)(
        _train_msg(_global(), 1, "int8", roster="site1=00;site2=11;site3=22"), _ctx(ws))
    assert reply.has_error() and reply.error.code == REFUSED and "fp32" in reply.error.reason and not called


def test_the_run_plan_refuses_a_compressed_uplink_with_secure_aggregation():
    from pydantic import ValidationError

    from fl_server.plan import RunPlan
    from policies.schema import HERE

    plan = {"center-dir": "/c", "run-name": "r", "aggregation": "ffa-lora",
            "policy": (HERE / "demo-secagg.json").read_text()}
    assert RunPlan.model_validate(plan).uplink == "fp32"
    with pytest.raises(ValidationError, match="secure aggregation.*fp32"):
        RunPlan.model_validate(plan | {"uplink": "int8"})


def test_residual_files_are_one_per_run_and_never_outside_the_workspace(tmp_path):
    from mllm_dr.errors import InputError

    assert residual_path(tmp_path, "run-7") == tmp_path / "federation" / "uplink" / "run-7.safetensors"
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(InputError):
            residual_path(tmp_path, bad)


def test_center_refuses_a_reply_not_in_the_runs_encoding():
    from mllm_dr.errors import InputError

    state = _global()
    with pytest.raises(InputError, match="uplink is int8"):
        decode_update({n: t.half() for n, t in state.items()}, state, "int8")
    with pytest.raises(InputError, match="uplink is fp16"):
        decode_update(dict(state), state, "fp16")
    # a site at its own LoRA rank: shapes differ from the global's, the tensor travelled in full
    own_rank = {A: torch.randn(4, 64)}
    back = decode_update(encode_update(own_rank, state, "fp16", None), state, "fp16")
    assert torch.allclose(back[A], own_rank[A], atol=1e-2)


def test_a_blocked_rounds_residual_is_not_kept_for_the_next_round(ws, flower_task):
    """The uplink mod wrote the round's new error-feedback residual at once, and the egress guard blocked the
    reply after it: the remainder of an update that never left (and, under DP, of a refunded charge) went out
    with the next round (a review, session 44; repro: a value below half an int8 step, blocked in round 1,
    delivered whole in round 2). Now the residual waits (``.pending``) and is kept only when the reply leaves."""
    from mllm_dr.uplink import pending_path

    g = _global()
    secret = 0.4 * 0.05 / 127                     # below half an int8 step: lost by the code, kept in the residual
    d1 = {n: torch.zeros_like(t) for n, t in g.items()}
    d1["maa.v"][0], d1["maa.v"][1] = 0.05, secret
    ctx, path = _ctx(ws), residual_path(ws.root, "r1")
    blocked = _site_app(lambda rec: {**{n: rec[n] + d1[n] for n in d1}, "features.audio": torch.ones(2)}, [])(
        _train_msg(g, 1, "int8"), ctx)
    assert blocked.has_error()
    assert not path.exists() and not pending_path(path).exists(), "a blocked round's residual was kept"
    released = _site_app(lambda rec: dict(rec), [])(_train_msg(g, 2, "int8"), ctx)    # nothing new trained
    assert not released.has_error(), released.error
    step = decode_update(released.content["arrays"].to_torch_state_dict(), g, "int8")
    assert float((step["maa.v"][1] - g["maa.v"][1]).abs()) < 1e-9, "the blocked round's remainder went out"
    # a released round keeps its residual for the next one, as before
    _site_app(lambda rec: {n: rec[n] + d1[n] for n in d1}, [])(_train_msg(g, 3, "int8"), ctx)
    assert path.is_file() and not pending_path(path).exists()
    assert float(ErrorFeedback.load(path).residual["maa.v"][1]) == pytest.approx(secret, rel=1e-3)
    assert len(ctx.state) == 0
