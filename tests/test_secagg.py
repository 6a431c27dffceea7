"""Secure aggregation and the sum-only LoRA mode: the center learns the weighted sum and nothing else."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mllm_dr import secagg as sa
from policies.schema import SitePolicy, load_policy
from test_federation_units import _replies

SITES = {11: "site-a", 12: "site-b", 13: "site-c"}


def _roster(names):
    keys = {s: X25519PrivateKey.generate() for s in names}
    return keys, {s: sa.public_hex(k) for s, k in keys.items()}


def _global():
    g = torch.Generator().manual_seed(0)
    return {"lora.l.q_proj.lora_A.weight": torch.randn(4, 30, generator=g),
            "lora.l.q_proj.lora_B.weight": torch.randn(20, 4, generator=g), "maa.v": torch.randn(300, generator=g)}


def _site_updates(reference, k=3, scale=0.01):
    g = torch.Generator().manual_seed(1)
    return [{n: reference[n] + scale * torch.randn(reference[n].shape, generator=g) for n in reference
             if "lora_A" not in n} for _ in range(k)]


def test_the_unmasked_sum_is_the_plain_weighted_sum_within_quantisation():
    ref = _global()
    ups, weights = _site_updates(ref), [8, 24, 40]
    keys, roster = _roster(SITES.values())
    masked = [sa.mask_update(u, ref, w, s, keys[s], roster, "r", 3, clip_norm=1e6)[0]
              for u, w, s in zip(ups, weights, SITES.values())]
    sums, weight = sa.unmask_sum(masked, ref, sum(weights))
    assert weight == 72
    bound = len(ups) * 2.0 ** -(sa.FRAC_BITS + 1)            # rounding to nearest, per site and coordinate
    for n in sums:
        plain = sum(w * (u[n].double() - ref[n].double()) for u, w in zip(ups, weights))
        assert float((sums[n] - plain).abs().max()) <= bound
    new = sa.apply_sum(ref, sums, weight)
    fedavg = {n: sum(w * u[n].double() for u, w in zip(ups, weights)) / 72 for n in new}
    assert all(float((new[n].double() - fedavg[n]).abs().max()) < 1e-6 for n in new)
    # a site missing from the sum: its masks stay in the others' replies, and the weight shows it
    with pytest.raises(sa.SecAggError, match="did not cancel"):
        sa.unmask_sum(masked[:2], ref, 32)


def test_a_sum_the_ring_cannot_hold_is_refused_not_wrapped():
    """Clipped to C, a coordinate of sum_k n_k delta_k lies within +-(sum n_k) C; past 2^63 in fixed point the ring
    wraps and the sum decodes as another number, silently (an aggregation review, session 45)."""
    ref = {"maa.w": torch.zeros(1, dtype=torch.float64)}
    keys, roster = _roster(["site-a", "site-b", "site-c"])
    big = 2.0 ** 63 / 2.0 ** sa.FRAC_BITS / 30 * 1.5              # 30 examples x this clip bound overflow
    ups = [{"maa.w": torch.full((1,), big, dtype=torch.float64)} for _ in range(3)]
    masked = [sa.mask_update(u, ref, 10, s, keys[s], roster, "r", 1, clip_norm=big)[0]
              for u, s in zip(ups, roster)]
    wrapped, _ = sa.unmask_sum(masked, ref, 30)                    # the old call: a wrong sum and no sign of it
    assert float(wrapped["maa.w"][0]) != pytest.approx(30 * big, rel=0.01)
    with pytest.raises(sa.SecAggError, match="do not fit the 64-bit ring"):
        sa.unmask_sum(masked, ref, 30, clip_norm=big)
    assert sa.ring_holds(30, 100.0) and not sa.ring_holds(30, big)


def test_a_run_whose_clip_bound_the_ring_cannot_hold_fails_before_any_site_trains(tmp_path, flower_task):
    """The center checks the sites' declared examples x the run's clip bound when it configures a masked round,
    before the key exchange: found only at the unmasking, every site had trained (and spent DP budget) first."""
    from mllm_dr.errors import FederationError

    strat = _masked_strategy(tmp_path, policy=_secagg_policy(clip_norm=2.0 ** 63 / 2.0 ** sa.FRAC_BITS))  # 1 x it overflows
    strat.examples = {node: 10 for node in SITES}
    grid = _KeyGrid(SITES)
    with pytest.raises(FederationError, match="do not fit the 64-bit ring"):
        strat.configure_train(1, None, None, grid)
    assert grid.keys == {}                     # no key exchange was even sent


def test_one_masked_reply_is_uncorrelated_with_its_update():
    ref = {"maa.w": torch.zeros(200_000)}
    update = {"maa.w": torch.linspace(-1, 1, 200_000) ** 3}            # a strongly structured update
    keys, roster = _roster(SITES.values())
    masked, _ = sa.mask_update(update, ref, 10, "site-a", keys["site-a"], roster, "r", 1, clip_norm=1e6)
    ring = masked["maa.w"].numpy().view(np.uint64)
    as_float = ring.astype(np.float64)
    assert abs(np.corrcoef(as_float, update["maa.w"].numpy())[0, 1]) < 0.02
    assert abs(np.corrcoef(ring.view(np.int64).astype(np.float64), update["maa.w"].numpy())[0, 1]) < 0.02
    top = (ring >> np.uint64(60)).astype(np.int64)                      # the top 4 bits look uniform
    assert np.bincount(top, minlength=16).min() > 0.9 * len(ring) / 16
    plain = sa.encode(10 * update["maa.w"].double().numpy())
    assert np.mean(ring == plain) < 1e-3                               # the encoded update itself is not there


def test_the_site_clips_before_masking():
    ref = {"maa.w": torch.zeros(100)}
    keys, roster = _roster(["site-a", "site-b", "site-c"])
    ups = [{"maa.w": torch.full((100,), v)} for v in (5.0, 0.01, 0.02)]
    masked = [sa.mask_update(u, ref, 1, s, keys[s], roster, "r", 1, clip_norm=1.0)
              for u, s in zip(ups, roster)]
    assert masked[0][1] == pytest.approx(50.0)                       # norm before clipping, kept on site
    sums, _ = sa.unmask_sum([m for m, _ in masked], ref, 3)
    assert float(sums["maa.w"][0]) == pytest.approx(0.1 + 0.01 + 0.02, abs=1e-6)   # 5.0 -> 0.1 per coordinate
    # session 41 (a privacy review): a NaN update passed the clip (min(1, nan) = 1) and encoded as INT64_MIN,
    # an inf one became NaN; the center then failed the round blaming the clip. Now the site names it
    for bad in (float("nan"), float("inf")):
        with pytest.raises(sa.SecAggError, match="not finite"):
            sa.mask_update({"maa.w": torch.full((100,), bad)}, ref, 1, "site-a", keys["site-a"], roster, "r", 1, 1.0)


def test_keys_are_kept_on_site_for_one_reply_only(tmp_path):
    store = sa.KeyStore(tmp_path / "secagg")
    public = store.new("run1", 2)
    path = next((tmp_path / "secagg").iterdir())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(public) == 64
    assert sa.public_hex(store.take("run1", 2)) == public
    with pytest.raises(sa.SecAggError, match="used already"):
        store.take("run1", 2)


# ----------------------------------------------------------------------------- the center, in process
def _secagg_policy(**secagg) -> str:
    pol = load_policy().model_dump()
    pol["secagg"].update({"enabled": True, "min_sites": 3, "clip_norm": 5.0} | secagg)
    return SitePolicy.model_validate(pol).model_dump_json()


class _KeyGrid:
    """A grid whose sites answer the key exchange (their private keys kept in ``keys``)."""

    def __init__(self, answering, malformed=()):
        self.answering, self.keys, self.malformed = answering, {}, malformed     # malformed: no public key

    def send_and_receive(self, msgs, timeout):
        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        out = []
        for m in msgs:
            node = m.metadata.dst_node_id
            if node not in self.answering:
                continue
            self.keys[SITES[node]] = X25519PrivateKey.generate()
            TaskIdentity.node_id = node
            key = {} if node in self.malformed else {"secagg-public-key": sa.public_hex(self.keys[SITES[node]])}
            out.append(Message(RecordDict({"config": ConfigRecord({"site-id": SITES[node], **key})}), reply_to=m))
        TaskIdentity.node_id = 0
        return out


def _masked_strategy(tmp_path, **plan_extra):
    from fl_server.plan import RunPlan
    from fl_server.strategy import AdapterFedAvg
    from mllm_dr.federated import RunSpec
    from mllm_dr.run_folder import RunFolder
    from mllm_dr.signing import load_private, new_signing_key

    new_signing_key(tmp_path / "signing.key")
    plan = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r", "min-sites": 2, "stage1-rounds": 0,
                                   "stage2-rounds": 2, "aggregation": "ffa-lora", "policy": _secagg_policy(),
                                   **plan_extra})
    spec = RunSpec("r", "tiny-random", "ab" * 32, {"audio": 4}, plan.architecture())
    return AdapterFedAvg(plan, spec, load_private(tmp_path / "signing.key"), RunFolder(tmp_path / "runs", "r"),
                         _global(), 0, dict(SITES), 1000)


def _round(strat, grid, sending, weights=(8, 24, 40)):
    from flwr.app import ArrayRecord, ConfigRecord

    msgs = strat.configure_train(1, ArrayRecord.from_torch_state_dict(strat.state), ConfigRecord(), grid)
    roster = sa.parse_roster(msgs[0].content["config"]["secagg-roster"])
    ups = _site_updates(strat.state)
    replies = []
    for (node, site), up, w in zip(SITES.items(), ups, weights):
        if node in sending:
            masked, _ = sa.mask_update(up, strat.state, w, site, grid.keys[site], roster, "r", 1, 5.0)
            replies += _replies({node: masked}, examples=w, extra_metrics={"secagg-clip": 5.0})
    return msgs, ups, replies


def test_the_center_unmasks_only_the_sum_and_never_screens_one_site(tmp_path, flower_task):
    strat = _masked_strategy(tmp_path)
    before = {n: t.clone() for n, t in strat.state.items()}
    msgs, ups, replies = _round(strat, _KeyGrid(SITES), SITES)
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(SITES)
    arrays, _ = strat.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    for n, t in ups[0].items():
        fedavg = sum(w * u[n].double() for u, w in zip(ups, (8, 24, 40))) / 72
        assert float((new[n].double() - fedavg).abs().max()) < 1e-6
    a = "lora.l.q_proj.lora_A.weight"
    assert torch.equal(new[a], before[a])                     # FFA-LoRA: A frozen, never sent
    entry = json.loads((tmp_path / "runs" / "r" / "history.json").read_text())["rounds"][0]
    assert entry["secagg"] and entry["rejected"] == {} and len(entry["sites"]) == 3


def test_the_server_learning_rate_steps_along_the_unmasked_average(tmp_path, flower_task):
    """The run plan's server-lr (FedOpt): new = old + lr * (sum-only average - old), masked or not."""
    strat = _masked_strategy(tmp_path, **{"server-lr": 2.0})
    before = {n: t.clone() for n, t in strat.state.items()}
    _, ups, replies = _round(strat, _KeyGrid(SITES), SITES)
    new = strat.aggregate_train(1, replies)[0].to_torch_state_dict()
    for n in ups[0]:
        fedavg = sum(w * u[n].double() for u, w in zip(ups, (8, 24, 40))) / 72
        want = before[n].double() + 2.0 * (fedavg - before[n].double())
        assert float((new[n].double() - want).abs().max()) < 1e-5


def test_a_site_dropping_after_the_key_exchange_fails_the_round_cleanly(tmp_path, flower_task):
    from mllm_dr.errors import FederationError

    strat = _masked_strategy(tmp_path)
    _, _, replies = _round(strat, _KeyGrid(SITES), sending={11, 13})       # site-b exchanged keys, then dropped
    with pytest.raises(FederationError, match="site-b dropped after the key exchange") as err:
        strat.aggregate_train(1, replies)
    assert "nothing of this round was decoded" in str(err.value)
    history = json.loads((tmp_path / "runs" / "r" / "history.json").read_text())
    assert history["status"] == "failed" and history["rounds"] == []
    assert not (tmp_path / "runs" / "r" / "checkpoints" / "round-0001").exists()


def test_a_site_missing_at_the_key_exchange_is_left_out_or_stops_the_round(tmp_path, flower_task):
    from mllm_dr.errors import FederationError

    strat = _masked_strategy(tmp_path)
    with pytest.raises(FederationError, match="only 2 usable .*minimum 3.*site-c"):    # policy: >= 3 sites
        _round(strat, _KeyGrid({11, 12}), SITES)
    # a reply this kit cannot read (here: no public key) names its site; it used to fail the run unnamed
    strat = _masked_strategy(tmp_path / "malformed")
    with pytest.raises(FederationError, match="only 2 usable .*site-b.*malformed key-exchange reply"):
        _round(strat, _KeyGrid(set(SITES), malformed={12}), SITES)


def test_a_public_key_no_pair_can_agree_on_leaves_that_site_out_of_the_masked_round(flower_task):
    """Session 42 (a center review): the center relayed any key string. A site answering "00" * 32 (a
    low-order point: X25519 gives an all-zero secret) or "zz" let every honest site train, be charged its
    DP budget, then fail to mask ("Error computing shared key", unnamed), and the round named the honest
    sites as dropped. Now the center checks each key (and that no two sites share one) before the roster."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_server.secagg import key_exchange

    good = {11: sa.public_hex(X25519PrivateKey.generate()), 12: "00" * 32, 13: "zz" * 32}

    class Grid:
        def send_and_receive(self, msgs, timeout):
            out = []
            for m in msgs:
                node = m.metadata.dst_node_id
                TaskIdentity.node_id = node
                out.append(Message(RecordDict({"config": ConfigRecord({"site-id": SITES[node],
                                                                       "secagg-public-key": good[node]})}), reply_to=m))
            TaskIdentity.node_id = 0
            return out

    keys, problems = key_exchange(Grid(), SITES, "r", 1, "ab" * 32, "", 10)
    assert keys == {11: good[11]} and sorted(problems) == ["site-b", "site-c"]
    assert all("not an X25519 key a pair can agree on" in why for why in problems.values())
    good = {11: good[11], 12: good[11], 13: sa.public_hex(X25519PrivateKey.generate())}
    keys, problems = key_exchange(Grid(), SITES, "r", 1, "ab" * 32, "", 10)
    assert list(keys) == [13] and problems == {s: "sent the same public key as another site" for s in ("site-a", "site-b")}
    with pytest.raises(sa.SecAggError, match="malformed public key"):      # a site masking with such a roster
        sa.pair_seed(X25519PrivateKey.generate(), "00" * 32, "x")


def test_a_secagg_run_needs_a_sum_only_aggregation(tmp_path):
    from fl_server.app import run
    from fl_server.plan import RunPlan
    from mllm_dr.errors import FederationError

    plan = RunPlan.model_validate({"center-dir": str(tmp_path), "run-name": "r", "policy": _secagg_policy()})
    with pytest.raises(FederationError, match="sum-only aggregation"):
        run(None, plan)


def test_ffa_lora_freezes_a_shared_seeded_a_and_sends_only_b(site_ws):
    """FFA-LoRA: A drawn from the run's seed at the center and at every site alike, never trained, never
    sent; the average of the sites' B times the shared A is exactly the average of their updates B @ A."""
    from fl_server.plan import RunPlan
    from mllm_dr.base_model import base_info
    from mllm_dr.config import TrainConfig
    from mllm_dr.errors import ModelMismatchError
    from mllm_dr.federated import RunSpec, SiteSession, initial_state, site_dims

    plan = RunPlan.model_validate({"center-dir": "/x", "run-name": "r", "aggregation": "ffa-lora", "seed": 5})
    spec = RunSpec("r", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws), plan.architecture())
    assert spec.config.lora.frozen_a_seed == 5
    glob = initial_state(spec, 5)
    a_names = [n for n in glob if "lora_A" in n]
    updates = []
    for k in range(2):
        s = SiteSession(site_ws, spec)
        own = {n: t for n, t in s.sm.model.base.named_parameters() if "lora_A" in n}
        assert [torch.equal(o, glob[n]) for n, o in zip(a_names, own.values())] == [True] * len(a_names)
        s.load_global(glob)
        up, n, _ = s.train_round(2, 1, TrainConfig(batch_size=8, lr_lora=1e-2, seed=k))
        assert not any("lora_A" in name for name in up) and any("lora_B" in name for name in up)
        assert all(torch.equal(t, glob[n]) for n, t in zip(a_names, own.values()))      # A did not train
        updates.append(up)
    b = a_names[0].replace("lora_A", "lora_B")
    avg_b = (updates[0][b].double() + 3 * updates[1][b].double()) / 4
    target = (updates[0][b].double() @ glob[a_names[0]].double() + 3 * updates[1][b].double() @ glob[a_names[0]].double()) / 4
    assert torch.allclose(avg_b @ glob[a_names[0]].double(), target, atol=1e-12)
    assert float(updates[0][b].abs().sum()) > 0                                          # B moved from zero
    with pytest.raises(ModelMismatchError, match="frozen A"):
        SiteSession(site_ws, spec, lora_rank=4)


def test_a_site_cannot_raise_the_clip_bound_the_center_checks_the_sum_against(tmp_path, flower_task):
    """Under secure aggregation the center's only check is the averaged update's norm against the clip bound,
    which it took from the largest bound the sites declared: one site declaring 1e12 and sending an unclipped
    (poisoned) update passed. The bound is the run's; a site declaring a larger one fails the round."""
    from flwr.app import ArrayRecord, ConfigRecord

    from mllm_dr.errors import FederationError

    strat = _masked_strategy(tmp_path)
    grid = _KeyGrid(SITES)
    msgs = strat.configure_train(1, ArrayRecord.from_torch_state_dict(strat.state), ConfigRecord(), grid)
    roster = sa.parse_roster(msgs[0].content["config"]["secagg-roster"])
    ups = _site_updates(strat.state)
    ups[2] = {n: t + 1e3 for n, t in ups[2].items()}                # poisoned, far beyond the run's bound of 5
    replies = []
    for (node, site), up, w in zip(SITES.items(), ups, (8, 24, 40)):
        clip = 1e12 if node == list(SITES)[2] else 5.0
        masked, _ = sa.mask_update(up, strat.state, w, site, grid.keys[site], roster, "r", 1, clip)
        replies += _replies({node: masked}, examples=w, extra_metrics={"secagg-clip": clip})
    with pytest.raises(FederationError, match=f"{SITES[list(SITES)[2]]} declare\\(s\\) a clip bound above the run's 5"):
        strat.aggregate_train(1, replies)


@pytest.mark.parametrize("bad", ["*", "../../policy", "..", "a/b", ""])
def test_a_run_name_from_the_center_never_names_a_path_or_a_glob_at_a_site(tmp_path, bad):
    """The key exchange is not signed and its run name went raw into the key file's path and into the glob
    that deletes a run's unused keys: a run named '*' deleted every run's pending keys, '../..' wrote a key
    outside the key folder. Run names are now checked where the wire is read and where a file is named."""
    from pydantic import ValidationError

    from mllm_dr.protocol import HandshakeQuery, SecAggKeysQuery

    store = sa.KeyStore(tmp_path / "secagg")
    store.new("other-run", 3)
    with pytest.raises(sa.SecAggError, match="run name"):
        store.new(bad, 1)
    with pytest.raises(sa.SecAggError, match="run name"):
        store.take(bad, 1)
    assert [p.name for p in (tmp_path / "secagg").iterdir()] == ["other-run-round0003.x25519"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["other-run-round0003.x25519"]
    for wire in ({"run": bad, "secagg-round": 1, "base-sha256": "ab"},
                 {"run": bad, "base-model": "b", "base-sha256": "ab"}):
        kind = SecAggKeysQuery if "secagg-round" in wire else HandshakeQuery
        with pytest.raises(ValidationError, match="run name"):
            kind.from_record(wire)


def test_a_masked_reply_whose_weight_has_another_shape_fails_the_round_naming_the_site(tmp_path, flower_task):
    """The masked weight's shape was never checked: a reply carrying two weights broke the unmasking with
    numpy's broadcast error, naming no site. It is now an unmasked-looking reply: the round fails, named."""
    from flwr.app import ArrayRecord, ConfigRecord

    from mllm_dr.errors import FederationError

    strat, grid = _masked_strategy(tmp_path), _KeyGrid(SITES)
    msgs = strat.configure_train(1, ArrayRecord.from_torch_state_dict(strat.state), ConfigRecord(), grid)
    roster = sa.parse_roster(msgs[0].content["config"]["secagg-roster"])
    replies = []
    for (node, site), up, w in zip(SITES.items(), _site_updates(strat.state), (8, 24, 40)):
        masked, _ = sa.mask_update(up, strat.state, w, site, grid.keys[site], roster, "r", 1, 5.0)
        if node == list(SITES)[1]:
            masked[sa.WEIGHT] = torch.cat([masked[sa.WEIGHT], masked[sa.WEIGHT]])
        replies += _replies({node: masked}, examples=w, extra_metrics={"secagg-clip": 5.0})
    with pytest.raises(FederationError, match=SITES[list(SITES)[1]]):
        strat.aggregate_train(1, replies)
