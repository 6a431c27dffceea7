"""Federation pieces without processes: aggregation, pooled metrics, signatures, resume, egress."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from mllm_dr.aggregation import exact_lora, resize_lora, screen_updates, weighted_average
from mllm_dr.metrics import SufficientStats, compute, evaluate_totals


def _lora_site(r: int, d_out=24, d_in=20, seed=0, prefix="lora.layer0.q_proj"):
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.lora_A.weight": torch.randn(r, d_in, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(d_out, r, generator=g)}


def _product(state, scaling, prefix="lora.layer0.q_proj"):
    return scaling * state[f"{prefix}.lora_B.weight"].double() @ state[f"{prefix}.lora_A.weight"].double()


def test_exact_lora_is_the_true_average_and_naive_is_not():
    sites = [_lora_site(4, seed=s) for s in range(3)]
    weights, scaling = [10.0, 30.0, 60.0], 2.0
    target = sum(w / 100 * _product(s, scaling) for s, w in zip(sites, weights))
    naive = weighted_average(sites, weights)
    naive_err = float((_product(naive, scaling) - target).norm() / target.norm())
    exact = exact_lora(sites, weights, [scaling] * 3, rank=12, global_scaling=scaling)
    exact_err = float((_product(exact.state, scaling) - target).norm() / target.norm())
    print(f"relative error of the aggregated update: naive A/B averaging {naive_err:.3f}, exact {exact_err:.2e}")
    assert naive_err > 0.5
    assert exact_err < 1e-6 and exact.residual < 1e-7       # float32 round-off only


def test_exact_lora_at_a_smaller_rank_is_the_best_low_rank_average():
    sites = [_lora_site(4, seed=s) for s in range(3)]
    target = sum(_product(s, 2.0) / 3 for s in sites)
    res = exact_lora(sites, [1, 1, 1], [2.0] * 3, rank=4, global_scaling=2.0)
    u, s, vh = torch.linalg.svd(target)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(_product(res.state, 2.0), best, atol=1e-5)
    assert res.residual == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-6)


def test_sites_with_different_ranks_and_other_tensors():
    ranks, scal = [2, 4, 8], [16.0, 8.0, 4.0]           # alpha = 32 at every rank
    sites = [_lora_site(r, seed=r) | {"maa.fc.weight": torch.full((3,), float(r))} for r in ranks]
    res = exact_lora(sites, [1, 1, 2], scal, rank=16, global_scaling=2.0)
    target = sum(w / 4 * _product(s, sc) for s, w, sc in zip(sites, [1, 1, 2], scal))
    assert torch.allclose(_product(res.state, 2.0), target, atol=1e-5)
    assert torch.allclose(res.state["maa.fc.weight"], torch.full((3,), (2 + 4 + 16) / 4))
    # a site at rank 8 gets the global update re-expressed at its rank, exactly when the rank allows
    small = resize_lora(_lora_site(4, seed=9), 8, 2.0, 4.0)
    assert torch.allclose(_product(small, 4.0), _product(_lora_site(4, seed=9), 2.0), atol=1e-5)
    # session 41 (a privacy review): the directions the product does not use came back zero in A and B, so
    # their gradients were zero for good; a zero global (B = 0, the first stage-2 round) gave a site at its
    # own rank nothing to learn with. Now A gets fresh rows there, B zero columns: the product unchanged
    a_name = next(n for n in small if "lora_A" in n)
    b_name = a_name.replace("lora_A", "lora_B")
    assert (small[a_name].norm(dim=1) > 0).all() and int((small[b_name].norm(dim=0) > 0).sum()) == 4
    zero = {n: torch.zeros_like(t) if "lora_B" in n else t for n, t in _lora_site(16, seed=3).items()}
    fresh = resize_lora(zero, 8, 2.0, 4.0)
    assert (fresh[a_name].norm(dim=1) > 0).all() and float(fresh[b_name].abs().max()) == 0.0
    assert float(fresh[a_name].abs().max()) <= 1 / math.sqrt(fresh[a_name].shape[1])     # peft's LoRA A init bound


def test_screening_rejects_non_finite_and_outliers_by_index():
    ref = {"w": torch.zeros(10)}
    ups = [{"w": torch.full((10,), 0.1 * (i + 1))} for i in range(4)]
    ups.append({"w": torch.full((10,), 50.0)})
    ups.append({"w": torch.tensor([float("nan")] * 10)})
    res = screen_updates(ups, ref, outlier_factor=3.0)
    assert res.accepted == [0, 1, 2, 3]
    assert "non-finite" in res.rejected[5] and "median" in res.rejected[4]


def test_a_round_of_two_sites_is_screened_by_the_runs_absolute_norm_bound(tmp_path, flower_task):
    """The median screen needs 3 updates: with 2 sites an update of any size was averaged in (a review,
    session 42). The run plan's max-update-norm bounds one site's distance to the global at any count."""
    def run(folder, **plan_keys):
        strat = _strategy(folder, min_sites=1, **plan_keys)
        strat.aggregate_train(1, _replies({11: {"lq.audio.w": torch.full((6,), 0.1)},
                                           12: {"lq.audio.w": torch.full((6,), 1e4)}}))
        return json.loads((folder / "runs" / "r" / "history.json").read_text())["rounds"][0]["rejected"]

    assert "site-b" not in run(tmp_path / "none")          # no bound set: nothing can screen a round of 2
    rejected = run(tmp_path / "bound", **{"max-update-norm": 5.0})
    assert "site-a" not in rejected and "max-update-norm 5" in rejected["site-b"]
    res = screen_updates([{"w": torch.ones(4)}, {"w": torch.full((4,), 3.0)}], {"w": torch.zeros(4)}, max_norm=2.5)
    assert res.accepted == [0] and res.norms == pytest.approx([2.0, 6.0])


def test_pooled_metrics_equal_the_pooled_computation():
    rng = random.Random(4)
    true = [rng.randint(0, 24) for _ in range(37)]
    pred = [min(24, max(0, t + rng.randint(-6, 6))) for t in true]
    cuts = [0, 9, 20, 37]
    site_stats = []
    for a, b in zip(cuts, cuts[1:]):
        s = SufficientStats()
        for t, p in zip(true[a:b], pred[a:b]):
            s.add(t, p)
        site_stats.append(s)
    pooled = compute(site_stats[0].merge(site_stats[1]).merge(site_stats[2]))
    direct = evaluate_totals(true, pred)
    for k in direct:
        assert pooled[k] == pytest.approx(direct[k], abs=1e-12), k
    mean_of_sites = sum(compute(s)["ccc"] for s in site_stats) / 3
    assert abs(mean_of_sites - direct["ccc"]) > 1e-6  # averaging per-site CCCs would not be the pooled CCC


# ----------------------------------------------------------------------------- signatures
def _ctx(round_=1):
    from mllm_dr.config import ModelConfig

    return {"round": round_, "stage": 1, "base_model": "tiny-random", "base_sha256": "ab" * 32, "run": "r",
            "model": ModelConfig().to_dict(), "dims": {"audio": 25}}


def test_signed_checkpoint_round_trip_and_every_tampering_refused(tmp_path):
    from mllm_dr.signing import SignatureError, load_private, new_signing_key, read_checkpoint, write_checkpoint

    pub = new_signing_key(tmp_path / "k" / "signing.key")
    key = load_private(tmp_path / "k" / "signing.key")
    state = {"lq.audio.q": torch.randn(4, 3), "maa.fc.0.weight": torch.randn(2, 2)}
    write_checkpoint(tmp_path / "ck", key, state, _ctx())
    got, meta = read_checkpoint(tmp_path / "ck", pub, "ab" * 32)
    assert all(torch.equal(got[k], state[k]) for k in state) and meta["round"] == 1

    with pytest.raises(SignatureError, match="base model"):
        read_checkpoint(tmp_path / "ck", pub, "cd" * 32)
    other = new_signing_key(tmp_path / "other" / "signing.key")
    with pytest.raises(SignatureError, match="does not verify"):
        read_checkpoint(tmp_path / "ck", other)
    meta_path = tmp_path / "ck" / "checkpoint.json"
    m = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(m | {"round": 2}))
    with pytest.raises(SignatureError):
        read_checkpoint(tmp_path / "ck", pub)
    meta_path.write_text(json.dumps(m))
    blob = tmp_path / "ck" / "global.safetensors"
    for offset in (-1, len(blob.read_bytes()) // 2):
        write_checkpoint(tmp_path / "ck", key, state, _ctx())
        data = bytearray(blob.read_bytes())
        data[offset] ^= 0x01
        blob.write_bytes(bytes(data))
        with pytest.raises(SignatureError):
            read_checkpoint(tmp_path / "ck", pub)


def test_run_feature_norms_are_signed_and_a_checkpoint_without_them_verifies_as_before(tmp_path):
    import hashlib

    from mllm_dr.signing import (SIGNED_FIELDS, SignatureError, load_private, new_signing_key, read_checkpoint,
                                 state_digest, write_checkpoint)

    state = {"lq.audio.q": torch.randn(4, 3)}
    # the digest of a context without norms is the one written before the field existed
    old = hashlib.sha256(json.dumps({k: _ctx().get(k) for k in SIGNED_FIELDS}, sort_keys=True).encode())
    old.update(f"lq.audio.q|{state['lq.audio.q'].dtype}|(4, 3)|".encode() + state["lq.audio.q"].view(torch.uint8)
               .numpy().tobytes())
    assert state_digest(state, _ctx() | {"feature_norms": {}}) == old.digest()

    pub = new_signing_key(tmp_path / "k" / "signing.key")
    norms = {"audio": {"mean": [0.5] * 25, "std": [2.0] * 25}}
    write_checkpoint(tmp_path / "ck", load_private(tmp_path / "k" / "signing.key"), state,
                     _ctx() | {"feature_norms": norms})
    assert read_checkpoint(tmp_path / "ck", pub)[1]["feature_norms"] == norms
    meta_path = tmp_path / "ck" / "checkpoint.json"
    m = json.loads(meta_path.read_text())
    m["feature_norms"]["audio"]["mean"][3] = 0.6          # a shifted norm changes every score: refused
    meta_path.write_text(json.dumps(m))
    with pytest.raises(SignatureError):
        read_checkpoint(tmp_path / "ck", pub)


def test_the_sites_moments_travel_exactly_and_sum_to_the_pooled_norms():
    from mllm_dr.federated import RunSpec, run_feature_norms
    from mllm_dr.processor import frame_moments, norms_from_moments
    from mllm_dr.protocol import HandshakeReply, moments_from_record, moments_record

    class _Ex:   # what frame_moments reads of an example: its participant and its feature frames
        def __init__(self, pid, x):
            self.instance, self.features = type("I", (), {"participant": pid})(), {"audio": x}

    gen = torch.Generator().manual_seed(0)
    sites = [[_Ex(f"{k}-{i}", torch.randn(5 + 3 * i + k, 4, generator=gen) * (k + 1) + k) for i in range(3)]
             for k in range(3)]
    sites[0].append(_Ex("0-0", sites[0][0].features["audio"]))      # a participant's 2nd item: counted once
    wire = [HandshakeReply.from_record(HandshakeReply(num_examples=1, dims={"audio": 4}, moments=moments_record(
        frame_moments(s, ("audio",)))).to_record()) for s in sites]
    parts = [moments_from_record(r.moments, r.dims) for r in wire]
    spec = RunSpec("r", "b", "ab", {"audio": 4}, feature_norms=run_feature_norms(parts))
    frames = torch.cat([ex.features["audio"] for s in sites for ex in s[:3]])
    mean, std = spec.norms()["audio"]
    assert torch.allclose(mean, frames.mean(0), atol=1e-5) and torch.allclose(std, frames.std(0), atol=1e-5)
    own = norms_from_moments([frame_moments(sites[2], ("audio",))])["audio"]
    assert not torch.allclose(own[0], mean, atol=0.1)               # a site's own norms are not the run's
    with pytest.raises(ValueError, match="incomplete"):
        moments_from_record({k: v for k, v in wire[0].moments.items() if k != "audio-sum-2"}, {"audio": 4})
    with pytest.raises(ValueError, match="widths other than"):
        moments_from_record(wire[0].moments, {"audio": 3})


def test_resume_starts_after_the_last_verified_checkpoint(tmp_path):
    from mllm_dr.federated import round_lr_factor, stage_of_round
    from mllm_dr.run_folder import RunFolder
    from mllm_dr.signing import SignatureError, load_private, new_signing_key, read_checkpoint, write_checkpoint

    pub = new_signing_key(tmp_path / "signing.key")
    key = load_private(tmp_path / "signing.key")
    folder = RunFolder(tmp_path / "runs", "r")
    for r in range(3):
        write_checkpoint(folder.checkpoint(r), key, {"w": torch.full((2,), float(r))}, _ctx(r))
    folder.checkpoint(3).with_name("round-0003.partial").mkdir()   # a crash mid-write
    assert folder.last_checkpoint() == 2
    state, meta = read_checkpoint(folder.checkpoint(2), pub)
    assert meta["round"] == 2 and float(state["w"][0]) == 2.0
    (folder.checkpoint(2) / "global.safetensors").write_bytes(b"garbage")
    with pytest.raises(SignatureError):
        read_checkpoint(folder.checkpoint(2), pub)
    # the schedule continues where it stopped: stage and learning-rate factor depend on the absolute round
    assert [stage_of_round(r, 2) for r in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert round_lr_factor(3, 2, 3) == 1.0 and round_lr_factor(5, 2, 3) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- egress guard
def test_egress_guard_blocks_a_misbehaving_handler(tmp_path, flower_task):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_client.egress import BLOCKED, egress_guard
    from mllm_dr import audit
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    policy = json.loads((__import__("policies").default_policy_path()).read_text())
    policy["egress"]["max_bytes_per_message"] = 100_000
    (ws.root / "policy.json").write_text(json.dumps(policy))
    payloads = {
        "features": {"arrays": ArrayRecord.from_torch_state_dict({"lq.audio.w": torch.zeros(4),
                                                                   "features.audio.303": torch.randn(50, 25)})},
        "predictions": {"metrics": MetricRecord({"num-examples": 3, "pred-303": 14.0, "pred-O'Neil-303": 9.0})},
        "oversize": {"arrays": ArrayRecord.from_torch_state_dict({"lq.audio.w": torch.zeros(200_000)})},
        "non-finite": {"arrays": ArrayRecord.from_torch_state_dict({"maa.fc.w": torch.tensor([1.0, float("inf")])})},
        "transcript": {"config": ConfigRecord({"site-id": "I feel tired all the time and cannot sleep, " * 5})},
        "fine": {"arrays": ArrayRecord.from_torch_state_dict({"lq.audio.w": torch.zeros(4)}),
                 "metrics": MetricRecord({"num-examples": 3, "train-loss": 0.5})},
    }
    app = ClientApp()
    which = {}

    @app.train(mods=[egress_guard])
    def misbehave(msg, context):
        return Message(RecordDict(payloads[which["k"]]), reply_to=msg)

    ctx = Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})
    for k in payloads:
        which["k"] = k
        received = ArrayRecord.from_torch_state_dict({"lq.audio.w": torch.zeros(4)})   # the global it answers
        reply = app(Message(RecordDict({"config": ConfigRecord({"x": 1}), "arrays": received}), dst_node_id=7,
                            message_type="train"), ctx)
        if k == "fine":
            assert not reply.has_error() and list(reply.content.array_records["arrays"].keys()) == ["lq.audio.w"]
        else:
            assert reply.has_error() and reply.error.code == BLOCKED, k
            assert not reply.has_content(), k         # nothing of the payload leaves
            assert "303" not in reply.error.reason, k  # nor a blocked key's name (here a participant id)
    blocks = [json.loads(ln) for ln in ws.audit_path.read_text().splitlines()]
    assert [b["event"] for b in blocks] == ["egress_blocked"] * 5
    assert "features.audio.303" in blocks[0]["problems"][0] and "pred-303" in blocks[1]["problems"][0]
    assert "over the limit" in blocks[2]["problems"][-1] and "non-finite" in blocks[3]["problems"][0]
    assert audit.verify(ws.audit_path)[0]


def test_a_handlers_exception_text_stays_on_site(tmp_path, flower_task):
    """Flower sends an exception's text to the center as the error reply's reason, outside the egress
    guard: 'participant P-4711 has no features' and the workspace's path left the site. Now the reason
    names the error's type only and the text goes to the site's audit log."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    from fl_client.egress import egress_guard
    from mllm_dr import audit
    from mllm_dr.errors import InputError
    from mllm_dr.protocol import SITE_ERROR
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    app = ClientApp()

    @app.train(mods=[egress_guard])
    def fails(msg, context):
        raise InputError("participant P-4711 has no features; run 'mllmdr-site extract'", ws.features_dir)

    ctx = Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})
    reply = app(Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=7, message_type="train"), ctx)
    assert reply.has_error() and reply.error.code == SITE_ERROR and "InputError" in reply.error.reason
    assert "P-4711" not in reply.error.reason and str(ws.root) not in reply.error.reason
    entry = audit.read(ws.audit_path)[-1]
    assert entry["event"] == "handler_error" and "P-4711" in entry["error"] and f"entry {entry['seq']}" in \
        reply.error.reason


# ----------------------------------------------------------------------------- robust aggregation at the center
def _reply(node: int, content: dict, message_type: str = "train"):
    """A real Flower reply message from ``node`` (to a message the center sent it) holding ``content``."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.node_id = 0
    sent = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=message_type)
    TaskIdentity.node_id = node
    return Message(RecordDict(content), reply_to=sent)


def _replies(updates: dict[int, dict], examples=10, extra_metrics: dict | None = None):
    """Real Flower reply messages, as sites ``node -> update`` would send them."""
    from flwr.app import MetricRecord

    from fl_server.wire import packed_record

    return [_reply(node, {"arrays": packed_record(update),      # as a site's wire_mod sends it
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "lora-scaling": 2.0,
                                                   **(extra_metrics or {})})})
            for node, update in updates.items()]


def _strategy(tmp_path, min_sites=2, **plan_keys):
    from fl_server.plan import RunPlan
    from fl_server.strategy import AdapterFedAvg
    from mllm_dr.federated import RunSpec
    from mllm_dr.run_folder import RunFolder
    from mllm_dr.signing import load_private, new_signing_key

    new_signing_key(tmp_path / "signing.key")
    plan = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r", "min-sites": min_sites,
                                   "stage1-rounds": 1, "stage2-rounds": 1, **plan_keys})
    spec = RunSpec("r", "tiny-random", "ab" * 32, {"audio": 4}, plan.architecture())
    state = {"lq.audio.w": torch.zeros(6), "maa.v": torch.zeros(2),
             "lora.l.q_proj.lora_A.weight": torch.zeros(2, 3), "lora.l.q_proj.lora_B.weight": torch.zeros(3, 2)}
    sites = {11: "site-a", 12: "site-b", 13: "site-c", 14: "site-d", 15: "site-e"}
    folder = RunFolder(tmp_path / "runs", "r")
    return AdapterFedAvg(plan, spec, load_private(tmp_path / "signing.key"), folder, state, 0, sites, 1000)


def test_center_rejects_nan_outlier_and_stray_updates_by_site_and_carries_on(tmp_path, flower_task):
    from mllm_dr.signing import read_checkpoint

    strat = _strategy(tmp_path)
    replies = _replies({11: {"lq.audio.w": torch.full((6,), 0.1)}, 12: {"lq.audio.w": torch.full((6,), 0.3)},
                        13: {"lq.audio.w": torch.full((6,), float("nan"))}, 14: {"lq.audio.w": torch.full((6,), 90.0)}},
                       extra_metrics={"epsilon": 4.73, "epsilon-total": 4.73})
    replies += _replies({15: {"lq.audio.w": torch.zeros(6), "features.audio": torch.zeros(3)}})
    arrays, metrics = strat.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    assert torch.allclose(new["lq.audio.w"], torch.full((6,), 0.2))       # mean of the two honest sites
    round1 = json.loads((tmp_path / "runs" / "r" / "history.json").read_text())["rounds"][0]
    assert round1["sites"]["site-a"]["epsilon_total"] == 4.73      # what `mllmdr-center status` shows
    rejected = round1["rejected"]
    assert set(rejected) == {"site-c", "site-d", "site-e"}
    assert "non-finite" in rejected["site-c"] and "median" in rejected["site-d"] and "features.audio" in rejected["site-e"]
    state, meta = read_checkpoint(tmp_path / "runs" / "r" / "checkpoints" / "round-0001", strat.key.public_key())
    assert meta["round"] == 1 and torch.equal(state["lq.audio.w"], new["lq.audio.w"])


@pytest.mark.parametrize("aggregation", ["exact-lora", "fedavg", "ffa-lora"])
def test_center_decodes_int8_uplinks_before_screening_and_aggregation(tmp_path, flower_task, aggregation):
    """A stage-2 round with int8 replies (delta to the global + error feedback) aggregates to what the same
    sites' fp32 replies give, within the codec's bound; the history records the bytes that travelled."""
    from mllm_dr.federated import allowed
    from mllm_dr.uplink import encode_update

    def run(uplink, folder):
        strat = _strategy(folder, aggregation=aggregation, uplink=uplink, **{"lora-rank": 2})
        g = torch.Generator().manual_seed(3)
        shapes = {"lq.audio.w": (6,), "maa.v": (300,), "lora.l.q_proj.lora_A.weight": (2, 64),
                  "lora.l.q_proj.lora_B.weight": (64, 2)}
        strat.state = {n: torch.randn(shape, generator=g) for n, shape in shapes.items()}   # a non-zero global
        trained = {node: {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in strat.state.items()
                          if allowed(n, 2, strat.spec.config)} for node in (11, 12, 13)}
        sent = {node: encode_update(up, strat.state, uplink, folder / f"ef-{node}.safetensors")
                for node, up in trained.items()}
        if uplink != "fp32":
            sent[14] = {n: t.clone() for n, t in trained[11].items()}      # a site that ignored the run's encoding
        arrays, _ = strat.aggregate_train(2, _replies(sent))
        history = json.loads((folder / "runs" / "r" / "history.json").read_text())
        step = max(float((t - strat.state[n]).abs().max()) for up in trained.values() for n, t in up.items()) / 254
        return arrays.to_torch_state_dict(), history["rounds"][0], sorted(trained[11]), step

    exact, h32, travelled, step = run("fp32", tmp_path / "fp32")
    got, h8, _, _ = run("int8", tmp_path / "int8")
    lora = [n for n in exact if n.startswith("lora.")]
    product = (lambda s: s[lora[1]] @ s[lora[0]]) if aggregation == "exact-lora" else None
    assert travelled == sorted(lora[aggregation == "ffa-lora":] + ["maa.v"])       # ffa-lora: A stays home
    for n in ["maa.v"] if product else travelled:
        assert 0 < (got[n] - exact[n]).abs().max() <= step, n     # within one int8 half-step of the largest delta
    if product:      # exact-lora re-factors the average: compare the products B @ A
        assert (product(got) - product(exact)).abs().max() < 1e-2
    assert "undecodable uplink" in h8["rejected"]["site-d"] and "uplink is int8" in h8["rejected"]["site-d"]
    up32, up8 = h32["sites"]["site-a"]["bytes_up"], h8["sites"]["site-a"]["bytes_up"]
    assert up32 == 4 * sum(exact[n].numel() for n in travelled) and up8 < 0.5 * up32 and h8["uplink"] == "int8"


@pytest.mark.parametrize("aggregation", ["fedavg", "exact-lora"])
def test_the_new_global_does_not_depend_on_the_order_the_replies_arrived_in(tmp_path, flower_task, aggregation):
    """Float sums are not associative: summed in arrival order, a round check that made one site answer later
    changed the demo's globals (held-out CCC 0.93 vs 0.95 on the same data and seed). The sites' updates
    are combined in site order, so the same run gives the same global bit for bit."""
    from mllm_dr.federated import allowed

    def run(order, folder):
        strat = _strategy(folder, aggregation=aggregation, **{"lora-rank": 2})
        g = torch.Generator().manual_seed(5)
        shapes = {"lq.audio.w": (6,), "maa.v": (300,), "lora.l.q_proj.lora_A.weight": (2, 64),
                  "lora.l.q_proj.lora_B.weight": (64, 2)}
        strat.state = {n: torch.randn(shape, generator=g) for n, shape in shapes.items()}
        trained = {node: {n: t + torch.randn(t.shape, generator=g) for n, t in strat.state.items()
                          if allowed(n, 2, strat.spec.config)} for node in (11, 12, 13)}
        replies = _replies({node: trained[node] for node in order})
        return strat.aggregate_train(2, replies)[0].to_torch_state_dict()

    first, last = run((11, 12, 13), tmp_path / "a"), run((13, 11, 12), tmp_path / "b")
    assert sorted(first) == sorted(last) and all(torch.equal(first[n], last[n]) for n in first)


class _HandshakeGrid:
    """A grid whose sites answer the handshake in ``order``: node -> (widths, frame moments)."""

    def __init__(self, order, answers, extra=None):
        self.order, self.answers, self.extra = order, answers, extra or {}     # extra: node -> more metrics

    def send_and_receive(self, msgs, timeout):
        from flwr.app import ConfigRecord, MetricRecord

        from mllm_dr.protocol import HandshakeReply, SiteId, moments_record

        out = []
        for node in self.order:
            dims, moments = self.answers[node]
            reply = HandshakeReply(num_examples=8, dims=dims, moments=moments_record(moments))
            out.append(_reply(node, {"config": ConfigRecord(SiteId(site_id=f"site-{node}").to_record()),
                                     "metrics": MetricRecord({**reply.to_record(), **self.extra.get(node, {})})},
                              "query"))
        return out


def _frames(n, width=5, generator=None):
    """Frame moments with a large mean and a small spread: the std comes from a difference of large sums."""
    x = 1e6 + torch.randn(n, width, generator=generator or torch.Generator().manual_seed(2), dtype=torch.float64)
    return {"audio": (n, x.sum(0), x.pow(2).sum(0))}


def test_the_runs_feature_norms_do_not_depend_on_the_order_the_handshake_replies_arrived_in(flower_task):
    """The run's feature norms (signed into every checkpoint, every site's input scaling) are sums of the
    sites' frame moments: added in site order, the same sites give the same norms bit for bit."""
    from fl_server.app import handshake
    from fl_server.plan import RunPlan

    g = torch.Generator().manual_seed(2)      # these draws make the sum's last bits depend on the order
    answers = {node: ({"audio": 5}, _frames(1000 + node, generator=g)) for node in (11, 12, 13)}
    plan = RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "min-sites": 3, "feature-norms": "federated"})
    first = handshake(_HandshakeGrid((11, 12, 13), answers), [11, 12, 13], plan, "ab" * 32).feature_norms
    last = handshake(_HandshakeGrid((13, 12, 11), answers), [11, 12, 13], plan, "ab" * 32).feature_norms
    assert first["audio"]["mean"] and first == last


def test_the_site_with_other_feature_widths_is_left_out_whichever_site_answers_first(flower_task):
    """The widths most sites share are the run's: a site with others is named and left out, even when it
    answers first (the first reply used to set the widths, refusing every other site and the run)."""
    from fl_server.app import handshake
    from fl_server.plan import RunPlan

    answers = {11: ({"audio": 4}, _frames(50, 4)), 12: ({"audio": 5}, _frames(60)), 13: ({"audio": 5}, _frames(70))}
    plan = RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "min-sites": 2, "feature-norms": "federated"})
    for order in ((11, 12, 13), (12, 11, 13), (13, 12, 11)):
        joined = handshake(_HandshakeGrid(order, answers), [11, 12, 13], plan, "ab" * 32)
        assert joined.sites == {12: "site-12", 13: "site-13"} and joined.dims == {"audio": 5}, order
        assert len(joined.not_joined) == 1 and joined.not_joined[0].startswith("site site-11: feature widths"), order


def test_feature_moments_no_frames_give_or_far_from_the_other_sites_leave_that_site_out(flower_task):
    """Session 42 (a center review): the run's feature norms (every site's input scaling for the whole run,
    signed into every checkpoint) were summed from the sites' moments unchecked: a NaN sum made them NaN, a
    frame count of inf failed the handshake for every site (OverflowError), a count of 1e12 with large sums
    set the mean to 1e6. Now such a site is left out, named; a site with many real frames keeps its mean
    and spread at a bounded weight (outlier-factor x the median count), a large hospital is not refused."""
    from fl_server.app import handshake
    from fl_server.plan import RunPlan

    def frames(n, mean=0.0, seed=0):
        x = mean + torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return {"audio": (n, x.sum(0), x.pow(2).sum(0))}

    big = 10**12                               # sums of that many frames of mean 1e6, spread 1: consistent
    answers = {11: frames(100, seed=1), 12: frames(120, seed=2), 13: frames(90, seed=3), 14: frames(100, seed=4),
               15: frames(100, seed=5), 16: ({"audio": (big, torch.full((5,), 1e6 * big, dtype=torch.float64),
                                                        torch.full((5,), (1e12 + 1) * big, dtype=torch.float64))}),
               17: frames(100_000, mean=0.5, seed=7)}
    answers = {node: ({"audio": 5}, m) for node, m in answers.items()}
    extra = {14: {"fm-audio-n": float("inf")}, 15: {"fm-audio-sum-0": float("nan")}}
    plan = RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "min-sites": 3, "feature-norms": "federated"})
    joined = handshake(_HandshakeGrid(tuple(answers), answers, extra=extra), list(answers), plan, "ab" * 32)
    assert sorted(joined.sites) == [11, 12, 13, 17]
    why = dict(p.split(": ", 1) for p in joined.not_joined)
    assert "frame count inf is not a whole number" in why["site site-14"]
    assert "a sum is not finite" in why["site site-15"] and "median-site stds" in why["site site-16"]
    mean = torch.tensor(joined.feature_norms["audio"]["mean"])
    std = torch.tensor(joined.feature_norms["audio"]["std"])
    assert mean.abs().max() < 0.3 and (std - 1).abs().max() < 0.3      # 17's 1e5 frames weigh as 3 x 100
    one = {n: answers[n] for n in (11, 12)} | {13: ({"audio": 5}, {"audio": (10, torch.zeros(5, dtype=torch.float64),
                                                                             torch.full((5,), -1.0, dtype=torch.float64))})}
    joined = handshake(_HandshakeGrid(tuple(one), one), list(one), plan.model_copy(update={"min_sites": 2}), "ab" * 32)
    assert "no 10 frames give these sums" in joined.not_joined[0]
    # small-scale features with one dimension dead at two sites: the third, honest, site joins (a second read
    # of session 42 found it excluded at "224 median-site stds")
    from mllm_dr.federated import screen_moments

    def small(seed, dead):
        x = 0.01 * torch.randn(200, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x[:, 0] = 0.0 if dead else x[:, 0]
        return {"audio": (200, x.sum(0), x.pow(2).sum(0))}

    assert screen_moments([small(1, True), small(2, True), small(3, False)], 3.0)[1] == {}


def test_a_site_declaring_no_examples_is_left_out_and_a_resume_cannot_raise_a_sites_weight(flower_task):
    """Session 42 (a center review): a handshake count of 0 (or less) was accepted, then that site's every
    update was refused (under secure aggregation it sat on the key roster and failed every masked round);
    and a resumed run bounded each site's round weight by the new handshake's count, so a site could raise
    its weight at every --resume. Now the count must be >= 1, and a resume keeps the smaller of the count
    the run recorded (history ``site_examples``) and the new one."""
    from fl_server.app import bounded_examples, handshake
    from fl_server.plan import RunPlan
    from mllm_dr.protocol import HandshakeReply

    class Grid(_HandshakeGrid):
        def send_and_receive(self, msgs, timeout):
            out = super().send_and_receive(msgs, timeout)
            for msg in out:
                if msg.metadata.src_node_id == 13:
                    msg.content.metric_records["metrics"]["num-examples"] = 0
            return out

    answers = {node: ({"audio": 5}, _frames(60)) for node in (11, 12, 13)}
    plan = RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "min-sites": 2})
    joined = handshake(Grid((11, 12, 13), answers), [11, 12, 13], plan, "ab" * 32)
    assert sorted(joined.sites) == [11, 12] and joined.not_joined == ["site site-13: declares 0 training examples"]
    assert HandshakeReply(num_examples=8).num_examples == joined.examples[11] == 8
    sites = {11: "site-11", 12: "site-12", 14: "site-14"}
    assert bounded_examples({11: 10**12, 12: 5, 14: 30}, sites, {"site-11": 40, "site-12": 50}) == \
        {11: 40, 12: 5, 14: 30}                   # 14 joins on this resume: its own count
    assert bounded_examples({11: 10**12}, {11: "site-11"}, {}) == {11: 10**12}      # a fresh run


def test_a_handshake_reply_the_center_cannot_read_leaves_that_site_out_named(flower_task):
    """A site on another kit version answering with a key this one does not know used to fail the run's
    handshake for every site (pydantic's error, unnamed); now that site is left out and named."""
    from fl_server.app import handshake
    from fl_server.plan import RunPlan

    answers = {node: ({"audio": 5}, _frames(60)) for node in (11, 12, 13)}
    plan = RunPlan.model_validate({"center-dir": "/c", "run-name": "r", "min-sites": 2})
    joined = handshake(_HandshakeGrid((11, 12, 13), answers, extra={12: {"future-key": 1.0}}), [11, 12, 13], plan,
                       "ab" * 32)
    assert joined.sites == {11: "site-11", 13: "site-13"}
    assert len(joined.not_joined) == 1 and joined.not_joined[0].startswith("node 12: malformed handshake reply")


def test_a_crash_between_history_and_checkpoint_leaves_a_round_resume_runs_again(tmp_path, flower_task, monkeypatch):
    """Session 42 (a center review): the checkpoint of round r was written before its history entry; a crash
    (or a full disk) between the two left round r checkpointed and never in history.json, and a resume
    started after r: `status` and the per-site history disagreed with the checkpoints for good. Now the
    entry comes first: such a crash leaves no checkpoint of r, so a resume runs r again and records it."""
    from mllm_dr.run_folder import RunFolder

    strat = _strategy(tmp_path)
    real, calls = RunFolder.add_round, []

    def full_disk_once(self, entry):
        calls.append(entry["round"])
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(self, entry)

    monkeypatch.setattr(RunFolder, "add_round", full_disk_once)
    ups = {11: {"lq.audio.w": torch.full((6,), 0.1)}, 12: {"lq.audio.w": torch.full((6,), 0.3)}}
    with pytest.raises(OSError):
        strat.aggregate_train(1, _replies(ups))
    assert strat.folder.last_checkpoint() is None            # what --resume starts after: nothing, so r runs again
    strat = _strategy(tmp_path / "resumed")
    strat.folder = RunFolder(tmp_path / "runs", "r")
    strat.aggregate_train(1, _replies(ups))
    assert strat.folder.last_checkpoint() == 1 and [e["round"] for e in strat.folder.history()["rounds"]] == [1]
    # the documented case: the entry written, the checkpoint not (a full disk): resume runs the round again
    import fl_server.strategy as strategy

    real_write, failed = strategy.write_checkpoint, []

    def checkpoint_fails_once(*a, **k):
        if not failed:
            failed.append(1)
            raise OSError(28, "No space left on device")
        return real_write(*a, **k)

    monkeypatch.setattr(strategy, "write_checkpoint", checkpoint_fails_once)
    strat = _strategy(tmp_path / "disk")
    with pytest.raises(OSError):
        strat.aggregate_train(1, _replies(ups))
    assert strat.folder.last_checkpoint() is None and strat.folder.history()["rounds"][-1]["round"] == 1
    strat.aggregate_train(1, _replies(ups))                   # the resumed run's round 1: one entry, checkpointed
    assert strat.folder.last_checkpoint() == 1 and [e["round"] for e in strat.folder.history()["rounds"]] == [1]


def test_center_stops_when_too_few_usable_updates_remain(tmp_path, flower_task):
    from mllm_dr.errors import FederationError

    strat = _strategy(tmp_path, min_sites=3)
    replies = _replies({11: {"lq.audio.w": torch.full((6,), 0.1)}, 12: {"lq.audio.w": torch.full((6,), 0.2)},
                        13: {"lq.audio.w": torch.full((6,), float("inf"))}})
    with pytest.raises(FederationError, match="only 2 usable site update") as err:
        strat.aggregate_train(1, replies)
    assert "site-c" in str(err.value) and "no reply" in str(err.value)     # site-d and site-e never answered
    assert json.loads((tmp_path / "runs" / "r" / "history.json").read_text())["status"] == "failed"


def test_an_update_whose_shapes_cannot_combine_with_the_global_is_rejected_by_name(tmp_path, flower_task):
    """A site at LoRA rank 1 in a fedavg run: its [3, 1] / [1, 3] factors used to broadcast into the rank-2 sum
    (a corrupted global, or a crash of the whole run when it came first). Under exact-lora a LoRA pair may
    come at the site's own rank (combined exactly); any other shape is refused there too."""
    g = torch.Generator().manual_seed(0)

    def update(rank: int, maa: int = 2) -> dict:
        return {"maa.v": torch.randn(maa, generator=g), "lora.l.q_proj.lora_A.weight": torch.randn(rank, 3, generator=g),
                "lora.l.q_proj.lora_B.weight": torch.randn(3, rank, generator=g)}

    strat = _strategy(tmp_path / "fedavg", aggregation="fedavg", **{"lora-rank": 2})
    ups = {11: update(2), 12: update(2), 13: update(1)}
    arrays, _ = strat.aggregate_train(2, _replies(ups))          # round 2 of 1 + 1: stage 2
    new = arrays.to_torch_state_dict()
    rejected = json.loads((tmp_path / "fedavg" / "runs" / "r" / "history.json").read_text())["rounds"][0]["rejected"]
    assert set(rejected) == {"site-c", "site-d", "site-e"} and "shape [1, 3], the global's is [2, 3]" in rejected["site-c"]
    for name in ups[11]:
        assert torch.allclose(new[name], (ups[11][name] + ups[12][name]) / 2), name

    strat = _strategy(tmp_path / "exact", **{"lora-rank": 2})
    ups = {11: update(2), 12: update(1), 13: update(2, maa=3)}
    strat.aggregate_train(2, _replies(ups))
    rejected = json.loads((tmp_path / "exact" / "runs" / "r" / "history.json").read_text())["rounds"][0]["rejected"]
    assert "site-b" not in rejected and "tensor maa.v has shape [3]" in rejected["site-c"]
    strat = _strategy(tmp_path / "pair", **{"lora-rank": 2})
    odd = update(2) | {"lora.l.q_proj.lora_B.weight": torch.randn(3, 1, generator=g)}     # A at rank 2, B at 1
    strat.aggregate_train(2, _replies({11: update(2), 12: update(2), 13: odd}))
    rejected = json.loads((tmp_path / "pair" / "runs" / "r" / "history.json").read_text())["rounds"][0]["rejected"]
    assert "ranks 2 and 1 differ" in rejected["site-c"]
    # rank 0 (A 0 x 3, B 3 x 0): "rank only" and 0 == 0, then alpha / 0 failed the whole run (session 42)
    strat = _strategy(tmp_path / "rank0", **{"lora-rank": 2})
    strat.aggregate_train(2, _replies({11: update(2), 12: update(2), 13: update(0)}))
    rejected = json.loads((tmp_path / "rank0" / "runs" / "r" / "history.json").read_text())["rounds"][0]["rejected"]
    assert set(rejected) >= {"site-c"} and "rank 0 is below 1" in rejected["site-c"]


def test_a_site_at_its_own_rank_is_screened_by_its_products_distance_not_its_whole_factors(tmp_path, flower_task):
    """Session 42 (a center review): under exact-lora the norm screen measured a site at its own rank by its
    whole factors (their shapes differ from the global's, so no difference could be taken): an honest rank-1
    site beside two rank-2 sites, all a small step from the global, was rejected as an outlier every round.
    In a round with such a site every update's LoRA pairs are measured by their product's distance; a site
    whose product moved far is still rejected."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, generator=g), torch.randn(3, 1, generator=g)
    strat = _strategy(tmp_path, aggregation="exact-lora", **{"lora-rank": 2})
    names = ("lora.l.q_proj.lora_A.weight", "lora.l.q_proj.lora_B.weight")
    strat.state = strat.state | {names[0]: torch.cat([a, torch.zeros(1, 3)]), names[1]: torch.cat([b, torch.zeros(3, 1)], 1)}

    def near(rank, step=0.01):
        return {"maa.v": torch.zeros(2), names[0]: strat.state[names[0]][:rank] + step * torch.randn(rank, 3, generator=g),
                names[1]: strat.state[names[1]][:, :rank] + step * torch.randn(3, rank, generator=g)}

    strat.aggregate_train(2, _replies({11: near(2), 12: near(2), 13: near(1)}))
    assert set(strat.folder.history()["rounds"][-1]["rejected"]) == {"site-d", "site-e"}    # no reply: 14, 15
    strat.aggregate_train(2, _replies({11: near(2), 12: near(2), 13: near(1, step=3.0)}))
    assert "exceeds 3 x median" in strat.folder.history()["rounds"][-1]["rejected"]["site-c"]
    from mllm_dr.aggregation import product_distances

    up = near(1, step=0.5)
    dense = float((1.5 * up[names[1]] @ up[names[0]] - 2.0 * strat.state[names[1]] @ strat.state[names[0]]).norm())
    # measured from where a rank-1 site starts: the global re-expressed at rank 1 (the same product here, its
    # second row being zero, up to the float32 SVD of that re-expression: session 45)
    assert product_distances([up], strat.state, [1.5], 2.0)[0] == pytest.approx(dense, rel=1e-5)


def _evaluate_replies(nodes, malformed=()):
    from flwr.app import MetricRecord

    from mllm_dr.evaluation import Evaluation
    from mllm_dr.protocol import EvaluateReply

    record = EvaluateReply.of(Evaluation()).to_record()
    return [_reply(n, {"metrics": MetricRecord({**record, **({"pred-303": 4.0} if n in malformed else {})})},
                   "evaluate") for n in nodes]


def test_only_the_final_round_records_an_evaluation_and_a_malformed_reply_fails_its_site_only(tmp_path, flower_task):
    """Flower calls aggregate_evaluate after every round; the rounds before the last asked nothing, and used
    to record a pooled evaluation of 0 participants with every site 'no reply' (what status showed)."""
    strat = _strategy(tmp_path, **{"stage2-rounds": 2})           # 1 + 2 rounds
    strat._sent = [11, 12, 13]
    assert strat.aggregate_evaluate(1, []) is None and strat.aggregate_evaluate(2, []) is None
    assert "evaluation" not in strat.folder.history()
    strat.aggregate_evaluate(3, _evaluate_replies([11, 12, 13], malformed={12}))
    evaluation = strat.folder.history()["evaluation"]
    assert evaluation["round"] == 3 and sorted(evaluation["sites"]) == ["site-a", "site-c"]
    assert list(evaluation["failed"]) == ["site-b"] and "malformed evaluation reply" in evaluation["failed"]["site-b"]


def test_the_numbers_a_site_declares_beside_its_update_are_bounded_and_an_impossible_one_leaves_it_out(
        tmp_path, flower_task):
    """Session 40 (a center-path review): a site's declared example count (its round weight) and LoRA scaling
    (exact-lora's coefficient) were used as sent: 10**12 examples made the global that site's update, a
    scaling of 200 multiplied its product 100x, a negative count extrapolated; a round-validation record
    missing a key stopped the whole run after the checkpoint was written (KeyError); and impossible
    evaluation statistics (n = -3, tp = 100) were pooled into the run's F1. Each is now left out, named."""
    from flwr.app import MetricRecord

    from mllm_dr.evaluation import Evaluation
    from mllm_dr.metrics import SufficientStats
    from mllm_dr.protocol import EvaluateReply, TrainReply, stats_record

    strat = _strategy(tmp_path, min_sites=2, **{"stage1-rounds": 2})
    strat.examples = {n: 10 for n in strat.sites}                   # what each declared at the handshake
    up = {"lq.audio.w": torch.full((6,), 0.1)}
    replies = _replies({11: up, 12: {"lq.audio.w": torch.full((6,), 0.3)}})
    replies += _replies({13: up}, extra_metrics={"lora-scaling": 200.0})
    replies += _replies({14: {"lq.audio.w": torch.full((6,), 5.0)}}, examples=10**12)
    replies += _replies({15: up}, examples=-3)
    arrays, _ = strat.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["lq.audio.w"], torch.full((6,), 0.2))   # the honest two
    rejected = strat.folder.history()["rounds"][0]["rejected"]
    assert "declares LoRA scaling 200" in rejected["site-c"]
    assert "declares 1000000000000 training examples, 10 at the handshake" in rejected["site-d"]
    assert "declares -3 training examples" in rejected["site-e"]
    # exact-lora: a site training at its own rank declares the scaling that rank gives (2.0 at any rank here)
    lora = _strategy(tmp_path / "lora", min_sites=1, aggregation="exact-lora", **{"stage1-rounds": 0, "lora-rank": 8})
    pair = {"lora.l.q_proj.lora_A.weight": torch.full((4, 3), 0.1), "lora.l.q_proj.lora_B.weight": torch.full((3, 4), 0.1)}
    lora.state = lora.state | {n: torch.zeros(8, 3) if "lora_A" in n else torch.zeros(3, 8) for n in pair}
    own_rank = lora._declared_problem(11, TrainReply(num_examples=8, lora_scaling=2.0), pair)
    tripled = lora._declared_problem(11, TrainReply(num_examples=8, lora_scaling=6.0), pair)
    assert own_rank is None and "declares LoRA scaling 6; rank 4 under the run's gives 2" in tripled
    # a round-validation record without a key: that site left out, the round recorded, the run goes on
    check = stats_record(SufficientStats(n=2, sx=10, sy=9, sxx=52, syy=41, sxy=46, sae=1, tn=2))
    bad = {f"val-ss-{k}": v for k, v in check.items() if k != "sx"}
    replies = _replies({11: up}, extra_metrics={f"val-ss-{k}": v for k, v in check.items()})
    replies += _replies({12: up}, extra_metrics=bad) + _replies({13: up})
    strat.aggregate_train(2, replies)
    second = strat.folder.history()["rounds"][1]
    assert "statistics without sx" in second["rejected"]["site-b"] and second["validation"]["n"] == 2
    # impossible evaluation statistics are not pooled
    strat._sent = [11, 12]
    honest = EvaluateReply.of(Evaluation(SufficientStats(n=2, sx=10, sy=9, sxx=52, syy=41, sxy=46, sae=1, tn=2)))
    forged = honest.to_record() | {"num-examples": 999, "ss-n": -3.0, "ss-tp": 100.0}
    strat.aggregate_evaluate(3, [_reply(11, {"metrics": MetricRecord(honest.to_record())}, "evaluate"),
                                 _reply(12, {"metrics": MetricRecord(forged)}, "evaluate")])
    evaluation = strat.folder.history()["evaluation"]
    assert evaluation["pooled"]["n"] == 2 and list(evaluation["sites"]) == ["site-a"]
    assert "impossible statistics" in evaluation["failed"]["site-b"]


def test_statistics_no_set_of_totals_can_give_are_refused_and_every_real_set_passes():
    """Session 42 (a center review): a block with n = 20, sxx = syy = 2000 and sxy = 10**5 passed every check
    (finite, counts whole) and, pooled with an honest CCC of 0.82, gave a pooled CCC of 80.8. Now the sums
    must satisfy what any real totals do (Cauchy-Schwarz; true totals within 0-27); random honest blocks,
    single or merged, still pass."""
    import random

    from mllm_dr.metrics import SufficientStats, compute
    from mllm_dr.protocol import stats_from_record, stats_record

    rng = random.Random(0)
    merged = SufficientStats()
    for trial in range(400):
        block, exact = SufficientStats(), trial % 5 == 0
        for _ in range(rng.choice([1, 2, 3, 7, 20])):
            true = rng.randint(0, 24)
            block.add(float(true), float(true) if exact else float(rng.randint(0, 27)))
        assert stats_from_record(stats_record(block)) == block
        merged = merged.merge(block)
    assert merged.problem() is None
    honest = SufficientStats(n=2, sx=10, sy=9, sxx=52, syy=41, sxy=46, sae=1, tn=2)
    forged = SufficientStats(n=20, sx=200, sy=200, sxx=2000, syy=2000, sxy=1e5, sae=0, tp=20)
    assert compute(honest.merge(forged))["ccc"] > 1          # what the center pooled before
    with pytest.raises(ValueError, match="impossible statistics: the sums are impossible together"):
        stats_from_record(stats_record(forged))
    for bad in ({"sae": 40.0},                               # |errors| summing above sqrt(n * squared errors)
                {"sx": -1.0, "sxx": 1.0}, {"sx": 60.0, "sxx": 1800.0}):      # true totals outside 0-27
        with pytest.raises(ValueError, match="impossible statistics"):
            stats_from_record(stats_record(SufficientStats(**(honest.to_dict() | bad))))



def pooled_evaluation(tmp_path, honest: dict, others: list[dict]) -> dict:
    """The center's recorded evaluation after site-11 sends ``honest`` and site-12, 13, ... send ``others``
    (evaluation metric records), through the real strategy's ``aggregate_evaluate``."""
    from flwr.app import MetricRecord

    strat = _strategy(tmp_path, min_sites=2)
    nodes = {11: honest} | dict(zip(range(12, 12 + len(others)), others))
    strat.sites = {n: f"site-{n}" for n in nodes}
    strat._sent = list(nodes)
    strat.aggregate_evaluate(2, [_reply(n, {"metrics": MetricRecord(r)}, "evaluate") for n, r in nodes.items()])
    return strat.folder.history()["evaluation"]

def test_impossible_item_and_rationale_counts_in_an_evaluation_reply_leave_that_site_out(tmp_path, flower_task):
    """Session 41 (a review leftover): the item-level and rationale counts beside a site's totals were pooled as
    sent (ItemStats/RationaleStats.from_dict): exact > n_items gave an item accuracy above 1, grounded = 10**6
    an item-grounded share of thousands, a NaN sum or a key missing went into the run's figures. Each is now
    left out, named, and the honest site's figures pooled alone."""
    from mllm_dr.evaluation import Evaluation
    from mllm_dr.metrics import SufficientStats

    from mllm_dr.protocol import EvaluateReply

    def site():
        e = Evaluation(SufficientStats())
        for true, pred in (([3, 2, 1], [3, 2, 2]), ([0, 0, 1], [1, 1, 1])):
            e.stats.add(sum(true), sum(pred))
            e.item_stats.add(true, pred)
            e.rationale_stats.add({"Sleep": "I can't sleep at night."}, {"Sleep": pred[0]}, ["I can't sleep at night"],
                                  {"Sleep": [0]})
            e.items += len(true)
        return EvaluateReply.of(e).to_record()

    honest = site()
    forged = {"exact": honest | {"is-exact": 50.0}, "grounded": honest | {"rs-grounded": 1e6},
              "nan": honest | {"is-sae": float("nan")}, "missing": {k: v for k, v in honest.items() if k != "is-sse"},
              "negative": honest | {"rs-repeated": -1.0}, "items": honest | {"is-n_items": 60.0, "is-exact": 60.0},
              "violations": honest | {"format-violations": 7.0}}
    evaluation = pooled_evaluation(tmp_path, honest, list(forged.values()))
    assert list(evaluation["sites"]) == ["site-11"] and evaluation["pooled"]["item_exact"] == pytest.approx(3 / 6)
    failed = evaluation["failed"]
    assert sorted(failed) == sorted(f"site-{n}" for n in range(12, 12 + len(forged)))
    assert "exact 50 > n_items 6" in failed["site-12"] and "grounded 1e+06 > n_evidence_items 2" in failed["site-13"]
    assert "not finite" in failed["site-14"] and "without sse" in failed["site-15"] and "negative" in failed["site-16"]
    assert "60 items, 6 scored" in failed["site-17"] and "7 format violations in 6 items" in failed["site-18"]


class _EvaluateGrid:
    """A grid whose sites answer every message with an (empty) evaluation; it keeps what it was sent."""

    def __init__(self):
        self.sent = []

    def send_and_receive(self, msgs, timeout):
        self.sent.append(list(msgs))
        return _evaluate_replies([m.metadata.dst_node_id for m in msgs])


def test_a_run_resumed_after_its_last_round_sends_the_final_global_once(tmp_path, flower_task):
    """The final global reaches the sites only in the final round's evaluation step; a run stopped after
    its last training round used to resume into 'completed' with no rounds left, the sites kept the
    global of the round before and no pooled evaluation was made."""
    from mllm_dr.protocol import EvaluateInstruction

    strat = _strategy(tmp_path)                                   # 1 + 1 rounds, both trained and checkpointed
    strat.offset = 2
    strat.folder.update(evaluation={"round": 2, "pooled": {}, "sites": {}, "failed": {"site-a": "no reply"}})
    grid = _EvaluateGrid()
    strat.run_rest(grid)                                          # an evaluation no site answered: not done
    assert len(grid.sent) == 1 and len(grid.sent[0]) == 5
    ctx = json.loads(EvaluateInstruction.from_record(grid.sent[0][0].content["config"]).context)
    assert ctx["round"] == 2
    assert strat.folder.history()["evaluation"]["round"] == 2
    strat.run_rest(grid)                                          # resumed again: nothing left to do
    assert len(grid.sent) == 1


def test_a_resumed_run_keeps_the_plan_it_started_with(tmp_path):
    """`run --resume` used to rebuild the plan from the options given and the defaults: a run started under a
    secure-aggregation policy with ffa-lora resumed with no policy (sites sent unmasked updates) and
    exact-lora. The recorded plan binds; only where and how patiently the run goes may change."""
    from fl_server.plan import RESUMABLE, RunPlan, start_refusal
    from mllm_dr.errors import InputError
    from mllm_dr.run_folder import RunFolder
    from policies.schema import load_policy

    policy = load_policy(Path(__file__).parent.parent / "policies" / "demo-secagg.json").model_dump_json()
    started = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r", "aggregation": "ffa-lora",
                                      "policy": policy, "stage2-rounds": 4, "lora-rank": 8})
    folder = RunFolder(tmp_path / "runs", "r")
    assert folder.plan() is None
    folder.record_plan(started.to_run_config())
    recorded = folder.plan()
    assert recorded == json.loads(json.dumps(started.to_run_config()))
    same = RunPlan.model_validate({**recorded, "resume": True, "round-timeout": 60, "min-sites": 3, "evaluate": False})
    assert same.changes_from(recorded) == [] and {"round-timeout", "min-sites", "evaluate"} <= RESUMABLE
    rebuilt = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r", "resume": True})   # the old way
    assert rebuilt.changes_from(recorded) == ["aggregation", "lora-rank", "policy", "stage2-rounds"]
    # the one rule both the CLI and the ServerApp apply before a run starts (fl_server/plan.py::start_refusal)
    assert start_refusal(same, folder) is None
    assert start_refusal(rebuilt, folder)[0] == "changed"
    assert start_refusal(started, folder)[0] == "taken"          # a fresh run under a started run's name
    older = RunFolder(tmp_path / "runs", "older")                  # checkpoints from a kit that kept no plan
    (older.checkpoint(2)).mkdir(parents=True)
    (older.checkpoint(2) / "checkpoint.json").write_text("{}")
    resume_older = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "older", "resume": True})
    assert start_refusal(resume_older, older)[0] == "unrecorded"
    # a run that never started here: refused since session 44 (a mistyped --name started a new run)
    assert start_refusal(resume_older, RunFolder(tmp_path / "runs", "never"))[0] == "missing"
    # the same policy re-serialised (`--resume --policy FILE` again, or a policy schema that gained a field
    # with a default) may resume, but sites pin the policy text: the run keeps the recorded text (session 40)
    reworded = json.dumps(json.loads(policy), indent=2)
    again = RunPlan.model_validate({**recorded, "resume": True, "policy": reworded})
    assert again.changes_from(recorded) == [] and again.policy != recorded["policy"]
    assert again.with_recorded_policy(recorded).policy == recorded["policy"]
    stricter = json.loads(policy) | {"min_participants": json.loads(policy)["min_participants"] + 5}
    changed = RunPlan.model_validate({**recorded, "resume": True, "policy": json.dumps(stricter)})
    assert changed.with_recorded_policy(recorded).policy == json.dumps(stricter)     # refused by start_refusal
    # --set of a key with its own option was overridden without a word (policy, evaluate) or skipped the
    # CLI's checks (resume); refused before anything else (no SuperLink needed to say so)
    from conftest import run_cli
    from mllm_dr.center import CenterDir

    CenterDir.init(tmp_path / "center")
    for key, option in (("policy", "--policy FILE"), ("evaluate", "--evaluate/--no-evaluate"), ("resume", "--resume")):
        proc = run_cli("mllmdr-center", "run", "--dir", tmp_path / "center", "--set", f"{key}=x", check=False)
        assert proc.returncode == 2 and f"--set {key}: use {option}" in proc.stderr, proc.stderr
    folder.plan_path.write_text("{not json")
    with pytest.raises(InputError, match="plan.json: not a readable run plan"):
        folder.plan()


def test_the_serverapp_refuses_to_resume_with_another_plan_before_asking_any_site(tmp_path):
    """The same rule where the run executes (a run submitted by other means than the CLI): refused before
    the handshake (the grid is never touched), naming the keys that differ."""
    from fl_server.app import run
    from fl_server.plan import RunPlan
    from mllm_dr.center import CenterDir
    from mllm_dr.errors import FederationError
    from mllm_dr.run_folder import RunFolder
    from policies.schema import load_policy

    center = CenterDir.init(tmp_path)
    policy = load_policy(Path(__file__).parent.parent / "policies" / "demo-secagg.json").model_dump_json()
    keys = {"center-dir": str(tmp_path), "run-name": "r", "base-model": "tiny-random"}
    RunFolder(center.runs_dir, "r").record_plan(RunPlan.model_validate(
        {**keys, "aggregation": "ffa-lora", "policy": policy}).to_run_config())
    with pytest.raises(FederationError, match=r"cannot resume r: aggregation 'ffa-lora' -> 'exact-lora'; policy \(another policy\)\. A resumed"):
        run(None, RunPlan.model_validate({**keys, "resume": True}))
    # a fresh run under a name already used here: refused, and that run's own record left as it was
    from flwr.app import Context, RecordDict

    from fl_server.app import main

    RunFolder(center.runs_dir, "r").update(status="completed")
    before = RunFolder(center.runs_dir, "r").history_path.read_text()
    config = RunPlan.model_validate(keys).to_run_config()
    with pytest.raises(FederationError, match="run r exists"):
        main(None, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    assert RunFolder(center.runs_dir, "r").history_path.read_text() == before


def test_a_resume_takes_only_this_runs_checkpoint_of_that_round(tmp_path):
    """Resume checked the checkpoint's signature only: a round-0001 copied in as round-0002, or a checkpoint
    of another run or another model signed by the same center, was re-signed under this run's context and
    sent to the sites (session 40, a center-path review)."""
    import shutil

    from fl_server.app import resumed_state
    from fl_server.plan import RunPlan
    from mllm_dr.errors import FederationError
    from mllm_dr.federated import RunSpec
    from mllm_dr.run_folder import RunFolder
    from mllm_dr.signing import load_private, new_signing_key, write_checkpoint

    new_signing_key(tmp_path / "signing.key")
    key = load_private(tmp_path / "signing.key")
    plan = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r"})
    spec = RunSpec("r", "tiny-random", "ab" * 32, {"audio": 4}, plan.architecture())
    folder = RunFolder(tmp_path / "runs", "r")
    state = {"maa.v": torch.ones(3)}
    write_checkpoint(folder.checkpoint(1), key, state, spec.context(1, 1))
    assert torch.equal(resumed_state(folder, 1, key.public_key(), spec)["maa.v"], state["maa.v"])
    shutil.copytree(folder.checkpoint(1), folder.checkpoint(2))            # round 1 passed off as round 2
    with pytest.raises(FederationError, match=r"is signed for run 'r' round 1, not this run's round 2"):
        resumed_state(folder, 2, key.public_key(), spec)
    other = RunSpec("other", "tiny-random", "ab" * 32, {"audio": 4}, plan.architecture())
    write_checkpoint(folder.checkpoint(3), key, state, other.context(3, 2))  # another run's, same center
    with pytest.raises(FederationError, match=r"signed for run 'other' round 3"):
        resumed_state(folder, 3, key.public_key(), spec)
    ranked = RunSpec("r", "tiny-random", "ab" * 32, {"audio": 4},
                     RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r", "lora-rank": 4}).architecture())
    write_checkpoint(folder.checkpoint(4), key, state, ranked.context(4, 2))
    with pytest.raises(FederationError, match="with another model"):
        resumed_state(folder, 4, key.public_key(), spec)


class _Grid:
    """Only what the strategy may ask of a grid: which nodes are connected (more than were accepted)."""

    def get_node_ids(self):
        return [11, 12, 99]      # 99 refused at the handshake, or connected after it


def test_the_round_check_skips_the_globals_whose_regression_head_no_round_has_trained(tmp_path, flower_task):
    """--round-validation: round r's sites check the global of round r - 1 through the regression head,
    which only stage-2 rounds train; every global before the first stage-2 aggregate holds the head as
    initialised, so the center asks for no check of those (each cost 22-27 s per site in the SmolLM2 demo)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from mllm_dr.protocol import TrainInstruction

    def asked(strat) -> list[bool]:
        strat.sites = {11: "site-a", 12: "site-b"}
        arrays = ArrayRecord.from_torch_state_dict(strat.state)
        return [TrainInstruction.from_record(m.content["config"]).round_validation
                for r in range(1, 6) for m in strat.configure_train(r, arrays, ConfigRecord(), _Grid())[:1]]

    rounds = {"stage1-rounds": 2, "stage2-rounds": 3}
    assert asked(_strategy(tmp_path / "a", **rounds, **{"round-validation": True})) == [False, False, False, True, True]
    assert asked(_strategy(tmp_path / "b", **rounds)) == [False] * 5


def test_the_run_plans_proximal_mu_reaches_every_sites_signed_train_instruction(tmp_path, flower_task):
    """FedProx (--set proximal-mu): the center's plan sets it, each site reads it from the train instruction (TLS; not covered by the checkpoint signature)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from mllm_dr.protocol import TrainInstruction

    def sent(strat) -> set[float]:
        strat.sites = {11: "site-a", 12: "site-b"}
        msgs = strat.configure_train(1, ArrayRecord.from_torch_state_dict(strat.state), ConfigRecord(), _Grid())
        return {TrainInstruction.from_record(m.content["config"]).proximal_mu for m in msgs}

    assert sent(_strategy(tmp_path / "a", **{"proximal-mu": 0.05})) == {0.05}
    assert sent(_strategy(tmp_path / "b")) == {0.0}


def test_the_run_plans_local_steps_reach_every_site_with_where_each_round_starts_in_its_stage(tmp_path, flower_task):
    """--set local-steps=S: every site's train instruction of round r asks for S steps from step k * S, k the
    round's place in its stage (stage 2 starts its stream again); the plan refuses it beside several local
    epochs or patient-level DP (whose steps per epoch the sampling and the privacy ledger fix)."""
    from pathlib import Path

    from flwr.app import ArrayRecord, ConfigRecord
    from pydantic import ValidationError

    from fl_server.plan import RunPlan
    from mllm_dr.protocol import TrainInstruction

    strat = _strategy(tmp_path / "a", **{"local-steps": 24, "stage1-rounds": 2, "stage2-rounds": 3})
    strat.sites = {11: "site-a", 12: "site-b"}
    arrays = ArrayRecord.from_torch_state_dict(strat.state)
    asked = [{(t.stage, t.local_steps, t.first_step) for t in (TrainInstruction.from_record(m.content["config"])
                                                               for m in strat.configure_train(r, arrays, ConfigRecord(), _Grid()))}
             for r in range(1, 6)]
    assert asked == [{(1, 24, 0)}, {(1, 24, 24)}, {(2, 24, 0)}, {(2, 24, 24)}, {(2, 24, 48)}]
    strat = _strategy(tmp_path / "b")
    strat.sites = {11: "site-a"}
    assert {(t.local_steps, t.first_step) for t in (TrainInstruction.from_record(m.content["config"]) for m in
                                                    strat.configure_train(1, arrays, ConfigRecord(), _Grid()))} == {(0, 0)}
    base = {"center-dir": str(tmp_path), "run-name": "r", "local-steps": 24}
    with pytest.raises(ValidationError, match="replaces local-epochs"):
        RunPlan.model_validate(base | {"local-epochs": 2})
    patient = (Path(__file__).parents[1] / "policies" / "demo-dp-patient.json").read_text()
    with pytest.raises(ValidationError, match="patient-level DP"):
        RunPlan.model_validate(base | {"policy": patient, "feature-norms": "participant"})
    site_level = json.loads(patient)
    site_level["dp"]["unit"] = "site"
    assert RunPlan.model_validate(base | {"policy": json.dumps(site_level), "feature-norms": "site"}).local_steps == 24


def test_only_nodes_accepted_at_the_handshake_get_messages_and_count(tmp_path, flower_task):
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    strat = _strategy(tmp_path)
    strat.sites = {11: "site-a", 12: "site-b"}                       # what the handshake accepted
    arrays = ArrayRecord.from_torch_state_dict(strat.state)
    for msgs in (strat.configure_train(1, arrays, ConfigRecord(), _Grid()),
                 strat.configure_evaluate(2, arrays, ConfigRecord(), _Grid())):
        assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]
        assert all("policy" in m.content["config"] for m in msgs)    # every message carries the run policy
    # an evaluation reply from the unaccepted node is never pooled
    from mllm_dr.evaluation import Evaluation
    from mllm_dr.metrics import SufficientStats
    from mllm_dr.protocol import EvaluateReply

    one = SufficientStats()
    one.add(12, 10)
    replies = _replies({11: {}, 12: {}, 99: {}})
    for r in replies:      # evaluation replies carry statistics only
        r.content = type(r.content)({"metrics": MetricRecord(EvaluateReply.of(Evaluation(one, 0, 8)).to_record())})
    strat.aggregate_evaluate(2, replies)
    evaluation = json.loads((tmp_path / "runs" / "r" / "history.json").read_text())["evaluation"]
    assert evaluation["pooled"]["n"] == 2 and sorted(evaluation["sites"]) == ["site-a", "site-b"]
    assert "node-99" in evaluation["failed"]


def test_site_refuses_a_global_state_altered_after_signing(tmp_path, flower_task):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr.atomic import atomic_write_text
    from mllm_dr.config import ModelConfig
    from mllm_dr.enrollment import FederationSettings
    from mllm_dr.protocol import TrainInstruction
    from mllm_dr.signing import SignatureError, fingerprint, load_private, new_signing_key, sign_state
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    pub = new_signing_key(tmp_path / "center.key")
    key = load_private(tmp_path / "center.key")
    atomic_write_text(ws.root / "federation.json", FederationSettings(
        superlink_address="127.0.0.1:1", ca_certificate_path="/dev/null",
        center_public_key=(tmp_path / "center.pub").read_text(), center_fingerprint=fingerprint(pub),
        node_key_path="/dev/null").model_dump_json())
    ctx = {"round": 3, "stage": 2, "base_model": "tiny-random", "base_sha256": "ab" * 32, "run": "r",
           "model": ModelConfig().to_dict(), "dims": {"audio": 25}}
    state = {"lq.audio.w": torch.randn(8), "maa.v": torch.randn(4)}
    signature = sign_state(key, state, ctx)
    forged = {k: v.clone() for k, v in state.items()}
    forged["maa.v"].view(torch.uint8)[0] ^= 1                     # one flipped bit after signing
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})
    for name, arrays in (("forged", forged), ("genuine-with-forged-round", state)):
        c = dict(ctx, round=4) if name.startswith("genuine") else ctx
        instruction = TrainInstruction(context=json.dumps(c), signature=signature, round=4, stage=2,
                                       local_epochs=1, batch_size=2, lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3)
        msg = Message(RecordDict({"arrays": packed_record(arrays),
                                  "config": ConfigRecord(instruction.to_record())}),
                      dst_node_id=7, message_type="train")
        with pytest.raises(SignatureError, match="does not verify"):
            app(msg, context)
    assert not (ws.checkpoints_dir / "federated").exists()           # nothing kept, nothing trained


def test_a_site_at_another_lora_rank_trains_and_aggregates_exactly(site_ws):
    """A rank-4 site and a rank-16 site: each trains at its own rank, the center combines them."""
    from mllm_dr.aggregation import exact_lora
    from mllm_dr.base_model import base_info
    from mllm_dr.config import TrainConfig
    from mllm_dr.federated import RunSpec, SiteSession, initial_state, site_dims

    spec = RunSpec("r", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws))
    state = initial_state(spec)
    updates, scalings = [], []
    for rank in (4, None):
        s = SiteSession(site_ws, spec, lora_rank=rank)
        s.load_global(state)
        up, n, _ = s.train_round(2, 1, TrainConfig(batch_size=8, lr_lora=1e-2))
        a_name = next(k for k in up if "lora_A" in k)
        assert up[a_name].shape[0] == (rank or 16)
        updates.append(up)
        scalings.append(s.config.lora.scaling)
    assert scalings == [2.0, 2.0]
    res = exact_lora(updates, [1, 1], scalings, 20, spec.config.lora.scaling)   # 4 + 16: nothing truncated
    a_name = next(k for k in res.state if "lora_A" in k)
    b_name = a_name.replace("lora_A", "lora_B")
    want = sum(0.5 * 2.0 * u[b_name].double() @ u[a_name].double() for u in updates)
    got = 2.0 * res.state[b_name].double() @ res.state[a_name].double()
    assert float((got - want).norm() / want.norm()) < 1e-5 and res.residual < 1e-6


def test_the_curve_of_a_run_checks_each_global_once_the_last_from_the_final_evaluation(tmp_path):
    from mllm_dr.reports import global_checks, run_curves

    hist = {"run": "x", "base_model": "tiny-random",
            "rounds": [{"round": 1, "train_loss": 2.0, "validation": {"global_round": 0, "ccc": 0.0, "mae": 9.0}},
                       {"round": 2, "train_loss": 1.0, "validation": {"global_round": 1, "ccc": 0.3, "mae": 6.0}}],
            "evaluation": {"round": 2, "pooled": {"maa_ccc": 0.5, "maa_mae": 4.0, "ccc": 0.1}}}
    assert global_checks(hist) == {0: {"global_round": 0, "ccc": 0.0, "mae": 9.0},
                                   1: {"global_round": 1, "ccc": 0.3, "mae": 6.0}, 2: {"ccc": 0.5, "mae": 4.0}}
    assert global_checks({"rounds": [{"round": 1, "train_loss": 1.0}], "evaluation": hist["evaluation"]}) == {}
    assert run_curves(hist, tmp_path / "c.png").stat().st_size > 0


def test_the_learning_benchmark_refuses_an_unknown_arm_instead_of_running_nothing():
    """`--arms local-only` used to match no arm: the benchmark ran nothing and printed a null summary."""
    import argparse

    from bench.federation import arm_list

    assert arm_list("local-only,pooled") == ["local_only", "pooled"]
    with pytest.raises(argparse.ArgumentTypeError, match="foo"):
        arm_list("federated,foo")


@pytest.mark.parametrize("option", [["--local-steps", "4"], ["--aggregation", "ffa-lora"]])
def test_the_learning_benchmark_refuses_local_arms_that_would_train_another_budget(tmp_path, option):
    """The local arms train whole epochs of full LoRA: beside --local-steps (half the federated budget at
    the documented schedule) or ffa-lora's frozen A they measured another thing, and --merge joined them
    (a benchmark review, session 43). Refused before anything runs; the federated arm alone still may."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bench.federation", *option, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "apply to the federated arm only" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_learning_benchmark_joins_arms_measured_in_separate_runs_only_when_they_measure_the_same_thing(tmp_path):
    """An arm of the free-text benchmark takes ~1 h here: arms are run one at a time and joined per seed;
    the targets appear once a seed has all three, and runs of another corpus or schedule are refused."""
    from bench.federation import merged

    def report(arms, text="free", **ccc):
        per_seed = {"seed": 0}
        for arm in arms:
            # "mean_site_ccc": what the local-only arm stored until session 30, the plain mean of its sites'
            # CCCs: NaN with one site undefined. The targets read the sites with a defined CCC instead.
            per_seed[arm] = {"pooled_over_sites": {"ccc": ccc[arm]}, "mean_site_ccc": float("nan"),
                             "sites": {"site1": {"ccc": ccc[arm] - 0.2}, "site2": {"ccc": ccc[arm]},
                                       "site3": {"ccc": float("nan")}}}
        return {"config": {"text": text, "participants": 48, "arms": arms, "threads": 2}, "per_seed": [per_seed]}

    parts = [(tmp_path / "a.json", report(["local_only"], local_only=0.5)),
             (tmp_path / "b.json", report(["federated"], federated=0.8))]
    _, results = merged(parts)
    assert set(results[0]) == {"seed", "local_only", "federated"} and "targets" not in results[0]
    config, results = merged(parts + [(tmp_path / "c.json", report(["pooled"], pooled=0.9))])
    assert config["arms"] == ["local_only", "federated", "pooled"] and config["seeds"] == "0"
    assert [m["arms"] for m in config["merged_from"]] == [["local_only"], ["federated"], ["pooled"]]
    assert results[0]["targets"] == {"federated_minus_pooled": -0.1, "federated_minus_mean_local": 0.4,
                                     "federated_minus_local_pooled": 0.3, "federated_minus_local_within_sites": 0.3}
    with pytest.raises(SystemExit, match="c.json: not the same measurement .*text differ"):
        merged(parts + [(tmp_path / "c.json", report(["pooled"], text="template", pooled=0.9))])
    with pytest.raises(SystemExit, match="local_only arm is also in another file"):
        merged(parts + [(tmp_path / "c.json", report(["local_only"], local_only=0.6))])


def test_the_learning_benchmark_finishes_a_seed_whose_arm_reads_no_site():
    """An arm that scores every test participant of each site alike has no within-site CCC anywhere: the
    seed's targets must say NaN, not end an hour-long run with StatisticsError."""
    import math

    from bench.federation import with_targets, within_site_ccc

    def arm(site_ccc):
        return {"pooled_over_sites": {"ccc": 0.5}, "seconds": 1.0,
                "sites": {s: {"ccc": c} for s, c in zip(("site1", "site2"), site_ccc)}}

    flat = arm([float("nan"), float("nan")])
    assert math.isnan(within_site_ccc(flat)) and within_site_ccc(arm([0.2, float("nan")])) == 0.2
    res = with_targets({"seed": 0, "federated": flat, "local_only": arm([0.2, 0.4]), "pooled": arm([0.6, 0.8])})
    assert math.isnan(res["targets"]["federated_minus_local_within_sites"])
    assert res["targets"]["federated_minus_pooled"] == 0.0
    # like with like (a benchmark review, session 43): a site one arm has no CCC for is left out of both means
    one = with_targets({"seed": 1, "federated": arm([0.9, float("nan")]), "local_only": arm([0.2, 0.8]),
                        "pooled": arm([0.6, 0.8])})
    assert one["targets"]["federated_minus_local_within_sites"] == 0.7           # 0.9 - 0.2, not 0.9 - 0.5
    from bench.federation import summary

    spread = summary([res, one])["targets"]["federated_minus_local_within_sites"]
    assert spread == {"mean": 0.7, "min": 0.7, "max": 0.7, "seeds": 1, "of": 2}  # the NaN seed left out, said


def test_the_learning_benchmark_says_how_firm_a_difference_between_arms_is_at_its_few_participants():
    """At n = 9 one participant can move a CCC by 0.2: each seed's difference between arms comes with a
    paired bootstrap (participants redrawn within their sites, every arm read on the same draw)."""
    from bench.federation import paired_bootstrap, with_targets

    truth = {"site1": [0, 5, 11], "site2": [3, 10, 17], "site3": [12, 19, 27]}

    def arm(pred_of):
        return {"rows": [{"participant": f"{s}-{i}", "site": s, "true": t, "pred": pred_of(s, t)}
                         for s, ts in truth.items() for i, t in enumerate(ts)]}

    site_mean = {s: sum(ts) / len(ts) for s, ts in truth.items()}
    res = {"federated": arm(lambda s, t: t), "local_only": arm(lambda s, t: site_mean[s]),
           "pooled": arm(lambda s, t: t)}
    boot = paired_bootstrap(res, draws=300)
    assert boot["n"] == 9 and boot["sites"] == {"site1": 3, "site2": 3, "site3": 3}
    same = boot["federated_minus_pooled"]           # the same predictions: no difference on any draw
    assert same["observed"] == same["p05"] == same["p95"] == 0 and same["share_meeting_target"] == 1
    local = boot["federated_minus_local_only"]      # reading within sites beats the sites' means on every draw
    assert local["observed"] > 0.1 and 0 < local["p05"] <= local["observed"] <= local["p95"]
    assert local["defined_draws"] == 300 and local["target"] == ">= +0.10"
    two = {a: res[a] for a in ("federated", "local_only")}          # attached to a seed's result, even of two arms
    assert with_targets(two)["bootstrap"] == paired_bootstrap(two) and "targets" not in two
    res["pooled"]["rows"].pop()
    with pytest.raises(SystemExit, match="different test participants"):
        paired_bootstrap(res)
    # session 41 (a benchmark review): rows were keyed by participant id alone, so two sites using the same
    # ids (a hospital's own numbering; the synthetic ids past 30 test participants a site) overwrote each other
    same_ids = {a: {"rows": [dict(r, participant=r["participant"].split("-")[1]) for r in arm(f)["rows"]]}
                for a, f in (("federated", lambda s, t: t), ("local_only", lambda s, t: site_mean[s]))}
    assert paired_bootstrap(same_ids, draws=50)["n"] == 9


def test_the_learning_benchmark_reports_what_between_site_differences_alone_give(tmp_path):
    """A benchmark review (session 41): the sites' severities differ, so predicting each test participant
    as their site's mean training total, with nothing of the participant, already scores a pooled CCC of
    ~0.7-0.8 on the template corpus. Every seed reports that baseline; merges keep where nested arms ran."""
    from bench.federation import merged, site_mean_baseline
    from mllm_dr.corpus import read_corpus
    from mllm_dr.metrics import evaluate_totals
    from mllm_dr.synth import SynthConfig, write_synthetic

    corpora = write_synthetic(SynthConfig(tmp_path / "c", "edaic", participants=12, sites=2, seed=3, seconds=0.5))
    true, pred = [], []
    for root in corpora:
        people = read_corpus(root).participants
        mean = sum(p.total for p in people if p.split in ("train", "dev")) / sum(p.split in ("train", "dev")
                                                                                  for p in people)
        true += [p.total for p in people if p.split == "test"]
        pred += [mean] * sum(p.split == "test" for p in people)
    base = site_mean_baseline(corpora)
    assert base["n"] == len(true) > 0 and base["ccc"] == pytest.approx(evaluate_totals(true, pred)["ccc"], abs=1e-4)
    inner = {"config": {"text": "t", "arms": ["federated"], "merged_from": [{"file": "a.json", "commit": "abc"},
                                                                            {"file": "b.json", "commit": "def"}]},
             "per_seed": [{"seed": 0, "site_mean_baseline": base, "federated": {"pooled_over_sites": {"ccc": 0.9}}}]}
    outer = {"config": {"text": "t", "arms": ["pooled"], "commit": "fed"},
             "per_seed": [{"seed": 0, "pooled": {"pooled_over_sites": {"ccc": 0.95}}}]}
    config, results = merged([(tmp_path / "m.json", inner), (tmp_path / "p.json", outer)])
    assert [m["commit"] for m in config["merged_from"]] == ["abc", "def", "fed"]
    assert results[0]["site_mean_baseline"] == base


def test_the_handshake_binds_a_site_id_to_its_registered_node_and_needs_its_signed_head(tmp_path, flower_task):
    """A registered node could answer under another approved site's id, and a reply without an audit head
    was kept as if it had one (so a site could stop sending heads and cut its log unseen); a malformed head
    count stopped the whole run. Now each is left out, named, and the others join. Session 40: a reply's
    self-declared site id named center files (`../center` wrote `center.heads.jsonl` beside the center's
    own record and joined with no node binding), and a site with no registered node on record skipped the
    binding; both are left out."""
    from flwr.app import ConfigRecord, MetricRecord

    from fl_server.app import handshake
    from fl_server.plan import RunPlan
    from mllm_dr import audit
    from mllm_dr.audit_heads import wire_head
    from mllm_dr.center import CenterDir
    from mllm_dr.enrollment import make_request, read_request
    from mllm_dr.protocol import HandshakeReply, SiteId, moments_record
    from mllm_dr.workspace import Workspace

    center = CenterDir.init(tmp_path / "center")
    heads = {}
    for node, site in ((11, "site-a"), (13, "site-b"), (14, "site-c"), (15, "site-d"), (None, "site-e")):
        ws = Workspace.init(tmp_path / site, site)
        audit.append(ws.audit_path, "score", actor="dr.x", participant="300")
        make_request(ws, tmp_path / f"{site}.json")
        assert center.approve(read_request(tmp_path / f"{site}.json")) == "approved"
        if node is not None:                       # site-e: approved, never registered by `serve`
            center.update_site(site, node_id=str(node))
        heads[site] = wire_head(audit.head(ws.audit_path))
    answers = {11: ("site-a", heads["site-a"]), 12: ("site-b", heads["site-b"]),    # 12 claims site-b (node 13)
               14: ("site-c", {}), 15: ("site-d", heads["site-d"] | {"entries": "x"}),
               16: ("../center", heads["site-a"]), 17: ("site-e", heads["site-e"])}

    class Grid:
        def send_and_receive(self, msgs, timeout):
            reply = HandshakeReply(num_examples=8, dims={"audio": 5}, moments=moments_record(_frames(60)))
            return [_reply(node, {"config": ConfigRecord(SiteId(site_id="x", audit_head=head).to_record()
                                                         | {"site-id": site}),
                                  "metrics": MetricRecord(reply.to_record())}, "query")
                    for node, (site, head) in answers.items()]

    plan = RunPlan.model_validate({"center-dir": str(center.root), "run-name": "r", "min-sites": 1})
    joined = handshake(Grid(), list(answers), plan, "ab" * 32, center)
    assert joined.sites == {11: "site-a"} and joined.examples == {11: 8}     # the bound on its round weights
    why = dict(p.split(": ", 1) for p in joined.not_joined)
    assert "registered node is 13" in why["site site-b"] and "no signed audit head" in why["site site-c"]
    assert "entry count 'x' is not a number" in why["site site-d"]
    assert "no registered node is on record" in why["site site-e"]
    assert "site id '../center' is not letters" in why["node 16"] and not (center.root / "center.heads.jsonl").exists()
    assert [p.name for p in center.root.rglob("*.heads.jsonl")] == ["site-a.heads.jsonl"]    # no head kept for others
