"""Attacks on the privacy promises: weaker run policies, spent budgets, unclipped updates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from policies.schema import SitePolicy, load_policy


def _policy(**dp) -> SitePolicy:
    base = load_policy().model_dump()
    base["dp"].update(dp)
    return SitePolicy.model_validate(base)


def test_weaker_run_policies_are_named():
    site = _policy(enabled=True, noise_multiplier=1.0, clip_norm=1.0, epsilon_budget=8.0)
    assert _policy(enabled=True, noise_multiplier=1.2, clip_norm=0.5, epsilon_budget=5.0).weaker_than(site) == []
    assert "differential privacy" in _policy(enabled=False).weaker_than(site)[0]
    reasons = _policy(enabled=True, noise_multiplier=0.5, clip_norm=2.0, epsilon_budget=20.0).weaker_than(site)
    assert len(reasons) == 3
    loose = load_policy().model_dump()
    loose["egress"]["tensor_patterns"].append("features.*")
    loose["egress"]["max_bytes_per_message"] *= 2
    assert len(SitePolicy.model_validate(loose).weaker_than(load_policy())) == 2


def test_invalid_policy_file_is_named(tmp_path):
    from mllm_dr.errors import InputError

    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(load_policy().model_dump() | {"audit_retention_days": 3}))
    ws = tmp_path / "ws"
    run_cli("mllmdr-site", "init", "--workspace", ws, "--site-id", "a")
    (ws / "policy.json").write_text(bad.read_text())
    proc = run_cli("mllmdr-site", "policy", "check", "--workspace", ws, check=False)
    assert proc.returncode == 2 and "policy.json" in proc.stderr and "audit_retention_days" in proc.stderr
    binary = tmp_path / "binary.json"                # session 42: an internal error (UnicodeDecodeError) before
    binary.write_bytes(b'{"min_participants": 2\xff}')
    with pytest.raises(InputError, match="not UTF-8"):
        load_policy(binary)
    # session 41 (a site-path review): a misspelt key was ignored and its default used ("enable": DP off,
    # "policy valid"); a policy.json that is a dangling link or a folder made the default policy apply
    typo = load_policy().model_dump()
    typo["dp"] = {"enable": True, "noise_multiplier": 1.0}
    (ws / "policy.json").write_text(json.dumps(typo))
    proc = run_cli("mllmdr-site", "policy", "check", "--workspace", ws, check=False)
    assert proc.returncode == 2 and "dp.enable: Extra inputs are not permitted" in proc.stderr
    first_kit = load_policy().model_dump()                     # the first kit's SecAgg+ keys: retired, still loads
    first_kit["secagg"].update({"num_shares": 1.0, "reconstruction_threshold": 2})
    assert SitePolicy.model_validate_json(json.dumps(first_kit)) == load_policy()
    from mllm_dr.workspace import Workspace
    from policies.site import site_policy

    (ws / "policy.json").unlink()
    (ws / "policy.json").symlink_to(tmp_path / "mount-down" / "policy.json")
    with pytest.raises(InputError, match="not a readable file"):
        site_policy(Workspace(ws))
    (ws / "policy.json").unlink()
    (ws / "policy.json").mkdir()
    with pytest.raises(InputError, match="not a readable file"):
        site_policy(Workspace(ws))
    (ws / "policy.json").rmdir()
    assert site_policy(Workspace(ws)) == load_policy()          # none there: the default, as documented
    # `policy check --against` compared the two policies only: the join's other refusals went unsaid
    site_dp = _policy(enabled=True, noise_multiplier=1.0).model_dump()
    (ws / "policy.json").write_text(json.dumps(site_dp))
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps(site_dp | {"secagg": {"enabled": True, "clip_norm": 100.0, "min_sites": 3}}))
    proc = run_cli("mllmdr-site", "policy", "check", "--workspace", ws, "--against", run_file, check=False)
    said = " ".join(proc.stdout.split())
    assert proc.returncode == 1 and "would REFUSE" in said and "differential privacy with secure aggregation" in said


def test_clip_and_noise_bounds_the_update():
    from mllm_dr.privacy import clip_and_noise

    ref = {"a": torch.zeros(1000), "b": torch.ones(10, 10)}
    upd = {"a": torch.full((1000,), 3.0), "b": torch.ones(10, 10) * 5}
    clipped, norm = clip_and_noise(upd, ref, clip_norm=1.0, noise_multiplier=0.0)
    assert norm > 90
    delta = math.sqrt(sum(float((clipped[n] - ref[n]).double().pow(2).sum()) for n in ref))
    assert delta == pytest.approx(1.0, rel=1e-5)
    noised, _ = clip_and_noise(upd, ref, clip_norm=0.5, noise_multiplier=2.0, seed=0)
    resid = torch.cat([(noised[n] - clipped[n] * 0.5 - ref[n] * 0.5).flatten() for n in ref])
    assert float(resid.std()) == pytest.approx(1.0, rel=0.1)     # noise std = z * C = 1.0


def test_dp_noise_cannot_be_replayed_from_the_seeds_training_set():
    """Session 41 (a privacy review): the site-level noise came from torch's global generator, which
    training had just reseeded with numbers the center knows (the round, the stage, the epoch), so the
    center could regenerate the noise and subtract it (it recovered the clipped update to 1e-7). The
    noise now comes from a ChaCha20 stream under a fresh OS key (PrivateRandom): after the same reseed
    twice it differs, it is not what the reseeded generator gives, and it is standard normal."""
    from mllm_dr.privacy import PrivateRandom, clip_and_noise

    ref, upd = {"w": torch.zeros(20000)}, {"w": torch.full((20000,), 1e-3)}
    noises = []
    for _ in range(2):
        torch.manual_seed(1_000_003 * 4 + 2 * 1_009)          # what train_stage sets from the round
        noised, _ = clip_and_noise(upd, ref, clip_norm=1.0, noise_multiplier=1.0)
        noises.append(noised["w"].double() - upd["w"].double())
    torch.manual_seed(1_000_003 * 4 + 2 * 1_009)
    replay = torch.randn(20000, dtype=torch.float64)
    assert float((noises[0] - noises[1]).abs().max()) > 1.0
    assert abs(float(torch.corrcoef(torch.stack([noises[0], replay]))[0, 1])) < 0.05
    z = PrivateRandom().normal((200_000,))
    assert abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(1.0, abs=0.01)
    assert float((z.abs() > 3).double().mean()) == pytest.approx(0.0027, abs=0.001)    # the tails of N(0, 1)
    assert torch.equal(PrivateRandom(7).normal((5,)), PrivateRandom(7).normal((5,)))   # seeded: repeats (tests)
    u = PrivateRandom().uniform(100_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert sorted(PrivateRandom().permutation(8)) == list(range(8))
    short = PrivateRandom(7)
    short.SEGMENT = 64             # a new nonce every block (every 2^37 bytes in use): the counter never wraps
    long = short.uniform(1000)
    assert 0 < long.min() and long.max() < 1 and abs(long.mean() - 0.5) < 0.05 and len(set(long.tolist())) == 1000


def test_ledger_accounts_and_stops_at_the_budget(tmp_path):
    from opacus.accountants import RDPAccountant

    from mllm_dr.privacy import BudgetSpent, PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "privacy.json")
    totals = [ledger.record("r", i, 1.0, 1.0, 1e-5)[1] for i in range(1, 4)]
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=1.0)
    assert totals[-1] == pytest.approx(acc.get_epsilon(1e-5)) and totals[0] < totals[1] < totals[2]
    with pytest.raises(BudgetSpent, match="stops contributing"):
        ledger.check(1.0, 1e-5, budget=totals[-1] + 0.01)
    assert ledger.check(1.0, 1e-5, budget=100) > totals[-1]


def test_dp_mod_noises_training_replies_and_refuses_past_the_budget(tmp_path, flower_task):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_client.privacy_mod import dp_mod
    from mllm_dr import audit
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.protocol import BUDGET_SPENT, TrainInstruction
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    pol = _policy(enabled=True, noise_multiplier=1.0, clip_norm=0.1, epsilon_budget=8.0)
    (ws.root / "policy.json").write_text(pol.model_dump_json())
    app, calls = ClientApp(), []

    @app.train(mods=[dp_mod])
    def train(msg, context):
        calls.append(1)
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict({"lq.w": torch.full((50,), 2.0)}),
                                   "metrics": MetricRecord({"num-examples": 4, "lora-scaling": 2.0,
                                                            "train-seconds": 5.0})}), reply_to=msg)

    ctx = Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})
    sent = ArrayRecord.from_torch_state_dict({"lq.w": torch.zeros(50), "maa.v": torch.zeros(3)})
    replies = []
    for r in (1, 2, 3):
        cfg = ConfigRecord(TrainInstruction(context=json.dumps({"run": "x", "round": r - 1}), signature="", round=r,
                                            stage=1, local_epochs=1, batch_size=1, lr_lq=1e-3, lr_lora=1e-3,
                                            lr_maa=1e-3).to_record())
        replies.append(app(Message(RecordDict({"arrays": sent, "config": cfg}), dst_node_id=7, message_type="train"),
                           ctx))
    ok = [r for r in replies if not r.has_error()]
    assert len(ok) == 2 and len(calls) == 2           # epsilon 4.7, 7.1, then 9.0 > 8: no third training
    assert replies[2].error.code == BUDGET_SPENT
    w = ok[0].content["arrays"].to_torch_state_dict()["lq.w"]
    assert not torch.allclose(w, torch.full((50,), 2.0))                      # clipped + noised
    assert ok[1].content["metrics"]["epsilon-total"] > ok[0].content["metrics"]["epsilon-total"] > 0
    assert ok[0].content["metrics"]["train-seconds"] == 0.0      # held back: under DP-SGD it follows the draws
    events = [e["event"] for e in audit.read(ws.audit_path)]
    assert events == ["dp_round", "dp_round", "privacy_budget_spent"]
    # session 41 (a site-path review): a negative local-epochs was charged as negative steps, which Opacus
    # composes as a negative cost: under patient-level DP one such message gave a spent budget back
    for key, bad in (("local-epochs", -20), ("local-steps", -1), ("first-step", -1), ("train-round", 0),
                     ("train-stage", 3), ("batch-size", 0)):
        with pytest.raises(ValueError, match=key):
            TrainInstruction.from_record(dict(cfg) | {key: bad})
    ledger = PrivacyLedger.of(ws.root, "site")
    before = (ws.root / "privacy.json").read_bytes()
    for bad in ({"steps": -20}, {"sample_rate": 0.0}, {"sample_rate": 1.5}):
        with pytest.raises(ValueError, match="no such DP mechanism"):
            ledger.spend("x", 9, 1.0, 0.1, 1e-5, 8.0, **bad)
    with pytest.raises(ValueError, match="no such DP mechanism"):
        ledger.spend("x", 9, 0.0, 0.1, 1e-5, 8.0)
    assert (ws.root / "privacy.json").read_bytes() == before


def test_site_level_dp_refuses_an_update_at_the_sites_own_lora_rank_and_charges_nothing(tmp_path, flower_task):
    """Session 41 (a site-path review): under site-level DP a site training LoRA at its own rank sent
    (update - global) of factors of other shapes: rank 1 broadcast into the run's rank (a meaningless update,
    aggregated), any other rank raised every round with only a handler_error on record. Now the reply is a
    refusal that says what to change, and the round's charge is taken back."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_client.privacy_mod import dp_mod
    from mllm_dr.privacy import PrivacyLedger, clipped_delta
    from mllm_dr.protocol import REFUSED, TrainInstruction
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    (ws.root / "policy.json").write_text(_policy(enabled=True, noise_multiplier=1.0, clip_norm=0.1).model_dump_json())
    app = ClientApp()

    @app.train(mods=[dp_mod])
    def train(msg, context):           # trained at rank 1; the run's rank is 4
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict({"l.lora_A.weight": torch.ones(1, 6)}),
                                   "metrics": MetricRecord({"num-examples": 4, "lora-scaling": 2.0})}), reply_to=msg)

    ctx = Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})
    sent = ArrayRecord.from_torch_state_dict({"l.lora_A.weight": torch.zeros(4, 6)})
    cfg = ConfigRecord(TrainInstruction(context=json.dumps({"run": "x", "round": 0}), signature="", round=1, stage=2,
                                        local_epochs=1, batch_size=1, lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3).to_record())
    reply = app(Message(RecordDict({"arrays": sent, "config": cfg}), dst_node_id=7, message_type="train"), ctx)
    assert reply.has_error() and reply.error.code == REFUSED and "own rank" in reply.error.reason
    assert PrivacyLedger.of(ws.root, "site").own() == []                          # charged, then refunded
    with pytest.raises(ValueError, match="shape"):
        clipped_delta({"w": torch.ones(1, 6)}, {"w": torch.zeros(4, 6)}, 1.0)


def _handshake(ws, run_policy: SitePolicy | str | None, run: str = "r1", recipe: str = "", moments: bool = False):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from mllm_dr.base_model import base_info

    text = run_policy if isinstance(run_policy, str) else run_policy.model_dump_json() if run_policy else ""
    cfg = ConfigRecord({"run": run, "base-model": "tiny-random", "base-sha256": base_info("tiny-random").sha256,
                        "policy": text, "feature-recipe": recipe,
                        "feature-norms": "federated" if moments else "site"})
    ctx = Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})
    return app(Message(RecordDict({"config": cfg}), dst_node_id=7, message_type="query"), ctx)


def _refused(reply, match: str) -> bool:
    from mllm_dr.protocol import REFUSED

    return reply.has_error() and reply.error.code == REFUSED and match in reply.error.reason


def test_site_refuses_runs_weaker_than_its_policy(site_ws, flower_task):
    from mllm_dr import audit

    reply = _handshake(site_ws, load_policy())                      # default site policy, default run: joins
    assert reply.content["metrics"]["dim-audio"] == 25 and reply.content["metrics"]["num-examples"] > 0
    strict = _policy(enabled=True, noise_multiplier=1.0, clip_norm=1.0, epsilon_budget=8.0)
    (site_ws.root / "policy.json").write_text(strict.model_dump_json())
    assert _refused(_handshake(site_ws, load_policy(), run="r2"), "differential privacy")
    assert _refused(_handshake(site_ws, _policy(enabled=True, noise_multiplier=0.5, clip_norm=1.0,
                                                epsilon_budget=8.0), run="r3"), "noise multiplier 0.5")
    assert not _handshake(site_ws, strict, run="r4").has_error()   # as strict as the site: joins
    newer = json.dumps(strict.model_dump() | {"retain_raw_audio": False})   # a key this kit does not know
    assert _refused(_handshake(site_ws, newer, run="r4b"), "cannot read the run's policy (retain_raw_audio")
    secagg = strict.model_dump()
    secagg["secagg"]["enabled"] = True
    (site_ws.root / "policy.json").write_text(json.dumps(secagg))
    assert _refused(_handshake(site_ws, strict, run="r5"), "secure aggregation")
    few = load_policy().model_dump() | {"min_participants": 50}
    (site_ws.root / "policy.json").write_text(json.dumps(few))
    assert _refused(_handshake(site_ws, load_policy(), run="r6"), "policy requires 50")
    pinned = load_policy().model_dump() | {"allowed_base_sha256": ["00" * 32]}
    (site_ws.root / "policy.json").write_text(json.dumps(pinned))
    assert _refused(_handshake(site_ws, load_policy(), run="r7"), "not in the site's allowed list")
    # a refusal binds for the whole run: with the site's policy relaxed again, run r2 is still refused
    (site_ws.root / "policy.json").unlink()
    assert _refused(_handshake(site_ws, load_policy(), run="r2"), "binds for the whole run")
    events = [e["event"] for e in audit.read(site_ws.audit_path)]
    assert events.count("federation_refused") == 7 and events.count("federation_join") == 2


def test_feature_moments_never_leave_a_site_under_dp(site_ws, flower_task):
    """The frame moments of feature-norms=federated (fm-*) are not covered by any DP mechanism: a site
    refuses a handshake that asks for them when its policy or the run's requires DP (binding for the
    run), and the center refuses such a run plan before any site is asked."""
    from pydantic import ValidationError

    from fl_server.plan import RunPlan
    from mllm_dr import audit

    plain = _handshake(site_ws, load_policy(), run="m0", moments=True)        # no DP: the moments are sent
    assert not plain.has_error() and "fm-audio-n" in plain.content["metrics"]
    # session 41 (a site-path review): the moments skipped the release floor the site's statistics keep
    floor = load_policy().model_dump() | {"min_release_participants": 1000}
    (site_ws.root / "policy.json").write_text(json.dumps(floor))
    assert _refused(_handshake(site_ws, load_policy(), run="m0f", moments=True), "fewer than the release floor of 1000")
    assert not _handshake(site_ws, load_policy(), run="m0g").has_error()      # site norms: nothing of theirs sent
    (site_ws.root / "policy.json").unlink()
    strict = _policy(enabled=True, noise_multiplier=1.0, clip_norm=1.0, epsilon_budget=8.0)
    assert _refused(_handshake(site_ws, strict, run="m1", moments=True), "fm-*")   # the run's DP binds the site
    (site_ws.root / "policy.json").write_text(strict.model_dump_json())
    assert _refused(_handshake(site_ws, strict, run="m2", moments=True), "without noise")   # the site's own DP
    ok = _handshake(site_ws, strict, run="m3")                                # site norms: joins, sends none
    assert not ok.has_error() and not any(k.startswith("fm-") for k in ok.content["metrics"])
    assert _refused(_handshake(site_ws, strict, run="m2"), "binds for the whole run")
    joined = [e["run"] for e in audit.read(site_ws.audit_path) if e["event"] == "federation_join"]
    assert joined == ["m0", "m0g", "m3"]
    plan = {"center-dir": "/c", "run-name": "r", "policy": strict.model_dump_json()}
    with pytest.raises(ValidationError, match="feature-norms=site"):
        RunPlan.model_validate(plan | {"feature-norms": "federated"})
    assert RunPlan.model_validate(plan | {"feature-norms": "site"}).dp.enabled


def test_a_run_never_weakens_a_sites_dp():
    site = _policy(enabled=True, noise_multiplier=1.0, clip_norm=0.5, epsilon_budget=8.0).dp
    run = _policy(enabled=True, noise_multiplier=0.5, clip_norm=2.0, epsilon_budget=20.0).dp
    strict = site.strictest(run)
    assert (strict.noise_multiplier, strict.clip_norm, strict.epsilon_budget) == (1.0, 0.5, 8.0)
    assert site.strictest(_policy(enabled=False).dp) == site and _policy(enabled=False).dp.strictest(run) == run


def test_a_refusing_site_answers_train_and_evaluate_with_an_error_and_trains_nothing(site_ws, flower_task,
                                                                                      tmp_path):
    """Defence in depth: even if a center sends training to a site whose policy refuses the run,
    the ClientApp answers with an error instead of training."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr import audit
    from mllm_dr.config import ModelConfig
    from mllm_dr.protocol import EvaluateInstruction, TrainInstruction
    from mllm_dr.signing import load_private, sign_state

    (site_ws.root / "policy.json").write_text(_policy(enabled=True).model_dump_json())   # requires DP
    key = load_private(tmp_path / "center.key")
    ctx = {"round": 0, "stage": 0, "base_model": "tiny-random", "base_sha256": "ab" * 32, "run": "no-dp",
           "model": ModelConfig().to_dict(), "dims": {"audio": 25}}
    state = {"maa.v": torch.randn(4)}
    signed = {"context": json.dumps(ctx), "signature": sign_state(key, state, ctx), "policy": load_policy().model_dump_json()}
    instructions = {"train": TrainInstruction(**signed, round=1, stage=1, local_epochs=1, batch_size=2, lr_lq=1e-3,
                                              lr_lora=1e-3, lr_maa=1e-3),
                    "evaluate": EvaluateInstruction(**signed, max_new_tokens=8)}
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    for kind, instruction in instructions.items():
        msg = Message(RecordDict({"arrays": packed_record(state),
                                  "config": ConfigRecord(instruction.to_record())}), dst_node_id=7, message_type=kind)
        assert _refused(app(msg, context), "differential privacy")
    events = [e["event"] for e in audit.read(site_ws.audit_path)]
    assert events == ["federation_refused", "federation_refused"]
    assert not (site_ws.checkpoints_dir / "federated").exists()     # the global was not even kept


@pytest.mark.parametrize("split", ["train", "x/../../policy"])
def test_an_evaluate_message_for_any_split_but_test_is_refused_before_anything_runs(site_ws, flower_task, tmp_path,
                                                                                   split):
    """The split was a free string: 'train' released the training patients' sufficient statistics outside
    any DP accounting, and the split named the report file (a path: 'x/../../policy' overwrote policy.json)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr import audit
    from mllm_dr.config import ModelConfig
    from mllm_dr.protocol import SITE_ERROR, EvaluateInstruction
    from mllm_dr.signing import load_private, sign_state

    (site_ws.root / "policy.json").write_text(load_policy().model_dump_json())
    before = (site_ws.root / "policy.json").read_text()
    ctx = {"round": 1, "stage": 2, "base_model": "tiny-random", "base_sha256": "ab" * 32, "run": "ev",
           "model": ModelConfig().to_dict(), "dims": {"audio": 25}}
    state = {"maa.v": torch.randn(4)}
    record = EvaluateInstruction(context=json.dumps(ctx), signature=sign_state(load_private(tmp_path / "center.key"),
                                                                               state, ctx),
                                 policy="", max_new_tokens=8, evaluate=False).to_record() | {"split": split}
    msg = Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(record)}), dst_node_id=7,
                  message_type="evaluate")
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    reply = app(msg, context)             # refused by validation; the text stays on site (egress guard)
    assert reply.has_error() and reply.error.code == SITE_ERROR and split not in reply.error.reason
    assert "split" in [e for e in audit.read(site_ws.audit_path) if e["event"] == "handler_error"][-1]["error"]
    assert (site_ws.root / "policy.json").read_text() == before
    assert not list((site_ws.root / "reports").glob("federated-*"))   # (glob of a missing folder: empty)
    assert not (site_ws.checkpoints_dir / "federated").exists()     # refused before the global was kept


def test_a_site_without_the_runs_feature_recipe_refuses_every_message_of_it(site_ws, flower_task, tmp_path):
    """The recipe is part of the site's decision on the run (check_run): refused at the handshake and
    on a train message signed for the run, audited as a refusal, nothing kept, binding for the run."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr import audit
    from mllm_dr.config import ModelConfig
    from mllm_dr.protocol import TrainInstruction
    from mllm_dr.signing import load_private, sign_state

    refused = _handshake(site_ws, load_policy(), run="rec", recipe="egemaps-openface")
    assert _refused(refused, "extracted with recipe 'site'")
    assert str(site_ws.root) not in refused.error.reason      # the center reads it: no path of the site's
    from mllm_dr.base_model import base_info
    from mllm_dr.errors import ModelMismatchError

    own_copy = str(base_info("tiny-random").path)               # a site's node config names its copy by path
    query = ConfigRecord({"run": "other-base", "base-model": "tiny-random", "base-sha256": "cd" * 32})
    with pytest.raises(ModelMismatchError, match="the run expects cdcdcd") as err:
        app(Message(RecordDict({"config": query}), dst_node_id=7, message_type="query"),
            Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root), "base-model": own_copy},
                    state=RecordDict(), run_config={}))
    assert own_copy not in str(err.value)
    ctx = {"round": 0, "stage": 0, "base_model": "tiny-random", "base_sha256": "ab" * 32, "run": "rec2",
           "model": ModelConfig().to_dict(), "dims": {"audio": 25}, "feature_recipe": "egemaps-openface"}
    state = {"maa.v": torch.randn(4)}
    t = TrainInstruction(context=json.dumps(ctx), signature=sign_state(load_private(tmp_path / "center.key"), state, ctx),
                         policy=load_policy().model_dump_json(), round=1, stage=1, local_epochs=1, batch_size=2,
                         lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3)
    msg = Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(t.to_record())}),
                  dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    assert _refused(app(msg, context), "--recipe egemaps-openface")
    assert not (site_ws.checkpoints_dir / "federated").exists()     # the global was not kept
    refusals = [e for e in audit.read(site_ws.audit_path) if e["event"] == "federation_refused"]
    assert [e["run"] for e in refusals] == ["rec", "rec2"] and all("reasons" in e for e in refusals)
    # binding: the same run without a recipe is still refused
    assert _refused(_handshake(site_ws, load_policy(), run="rec"), "binds for the whole run")


def test_a_site_requiring_the_centers_audit_head_refuses_a_message_without_one_for_the_whole_run(
        site_ws, flower_task, tmp_path):
    """A center that leaves its signed head out cannot be held to its log later (a review, session 42: such
    a message was only audited). A site whose policy sets require_center_audit_head refuses it, nothing is
    kept, and the refusal binds for the run; without the setting the message is accepted and audited."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr import audit
    from mllm_dr.base_model import base_info
    from mllm_dr.federated import RunSpec, initial_state, site_dims
    from mllm_dr.protocol import TrainInstruction
    from mllm_dr.signing import load_private, sign_state

    def train(run: str):
        spec = RunSpec(run, "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws))
        state, ctx = initial_state(spec), spec.context(0, 0)
        t = TrainInstruction(context=json.dumps(ctx), signature=sign_state(load_private(tmp_path / "center.key"),
                                                                          state, ctx),
                             policy=load_policy().model_dump_json(), round=1, stage=1, local_epochs=1, batch_size=2,
                             lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3)
        assert not t.audit_head                           # the message carries no head
        return app(Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(t.to_record())}),
                           dst_node_id=7, message_type="train"),
                   Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                           run_config={}))

    policy = load_policy().model_dump() | {"min_participants": 2}
    (site_ws.root / "policy.json").write_text(json.dumps(policy))
    reply = train("lenient")
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert "center_audit_head_missing" in [e["event"] for e in audit.read(site_ws.audit_path)]
    (site_ws.root / "policy.json").write_text(json.dumps(policy | {"require_center_audit_head": True}))
    before = len(list(site_ws.root.rglob("*")))
    assert _refused(train("strict"), "carries no signed audit head")
    assert not (site_ws.checkpoints_dir / "federated" / "latest").exists()
    refusal = [e for e in audit.read(site_ws.audit_path) if e["event"] == "federation_refused"][-1]
    assert refusal["run"] == "strict" and "audit head" in refusal["reasons"][0]
    assert len(list(site_ws.root.rglob("*"))) == before       # nothing trained or kept (the audit log grew only)
    assert _refused(_handshake(site_ws, load_policy(), run="strict"), "binds for the whole run")


def test_the_round_check_is_of_the_global_the_round_starts_from_not_of_the_sites_own_fit(site_ws, flower_task,
                                                                                         tmp_path):
    """--round-validation draws the learning curve of the federated model: the site checks the global it
    received, before training. It used to check its own model after local training, which showed each
    site's fit to itself (held-out CCC 0.78-0.89 in the benchmark while the global's own was 0.08-0.44)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record, unpacked
    from mllm_dr.base_model import base_info
    from mllm_dr.federated import RunSpec, SiteSession, initial_state, site_dims
    from mllm_dr.protocol import TrainInstruction, TrainReply, stats_from_record
    from mllm_dr.signing import load_private, sign_state

    (site_ws.root / "policy.json").write_text(json.dumps(load_policy().model_dump() | {"min_participants": 2}))
    spec = RunSpec("check", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws))
    state = initial_state(spec)
    state["maa.fc.2.weight"], state["maa.fc.2.bias"] = torch.zeros_like(state["maa.fc.2.weight"]), torch.tensor([1.6])
    ctx = spec.context(0, 0)                                   # the global's head scores every item 2 (1.6 rounded)
    t = TrainInstruction(context=json.dumps(ctx), signature=sign_state(load_private(tmp_path / "center.key"), state, ctx),
                         policy=load_policy().model_dump_json(), round=1, stage=2, local_epochs=1, batch_size=2,
                         lr_lq=1e-3, lr_lora=1e-3, lr_maa=10.0, round_validation=True)  # the head moves far
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    reply = app(Message(RecordDict({"arrays": packed_record(state),
                                    "config": ConfigRecord(t.to_record())}), dst_node_id=7, message_type="train"),
                context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent = stats_from_record(TrainReply.from_record(reply.content["metrics"]).validation)

    def check(tensors):
        session = SiteSession(site_ws, spec)
        session.load_global(tensors)
        return session.validate().stats

    trained = unpacked(reply.content["arrays"], "the site's reply")
    assert sent.n > 0 and sent.sy == 16 * sent.n and sent == check(state)     # the global the round started from
    assert sent != check(state | trained)                            # not the site's own model after training


def test_a_runs_policy_is_pinned_at_its_first_accepted_message(site_ws):
    """Each message carries its own copy of the run's policy and was checked on its own: a handshake under
    one policy (say DP off, so the site sent its feature moments) and train messages under another were
    both accepted. Now the first accepted message pins the run's policy; another is refused, and binds."""
    from pathlib import Path

    from mllm_dr import audit
    from mllm_dr.federation_policy import check_run, run_policy_pins

    plain = load_policy().model_dump_json()
    secagg = load_policy(Path(__file__).parent.parent / "policies" / "demo-secagg.json").model_dump_json()
    assert check_run(site_ws, "pin", plain, "ab" * 32, "query") is None
    assert check_run(site_ws, "pin", plain, "ab" * 32, "train") is None
    assert check_run(site_ws, "other", secagg, "ab" * 32, "query") is None      # another run: its own pin
    changed = check_run(site_ws, "pin", secagg, "ab" * 32, "train")
    assert changed and "differs from the one it announced" in changed
    assert check_run(site_ws, "pin", plain, "ab" * 32, "evaluate") is not None   # the refusal binds
    assert sorted(run_policy_pins(site_ws)) == ["other", "pin"]
    assert [e["event"] for e in audit.read(site_ws.audit_path)] == ["federation_refused"] * 2
    # Flower starts each message's ClientApp without waiting for the others: the first messages of many runs
    # at once each read the pins and rewrote them (unlocked), dropping one another's pin, and a run whose pin
    # was dropped could change its policy unnoticed. Now the read-modify-write holds the pins' lock.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        assert not any(pool.map(lambda i: check_run(site_ws, f"many{i}", plain, "ab" * 32, "query"), range(24)))
    assert sorted(run_policy_pins(site_ws)) == sorted(["other", "pin"] + [f"many{i}" for i in range(24)])


def test_statistics_of_fewer_participants_than_the_release_floor_stay_on_site(site_ws, flower_task, tmp_path):
    """A site with 1 or 2 test participants gave their totals away in the final evaluation's sums (n, sum,
    sum of squares, tp/fn). With `min_release_participants` above n the site evaluates, keeps its report,
    audits the withholding and sends an evaluation of no one; the same floor holds the round checks back."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_client.app import app
    from fl_server.wire import packed_record
    from mllm_dr import audit
    from mllm_dr.base_model import base_info
    from mllm_dr.dataset import instances_by_split
    from mllm_dr.federated import RunSpec, initial_state, site_dims
    from mllm_dr.protocol import EvaluateInstruction, EvaluateReply, TrainInstruction, TrainReply
    from mllm_dr.signing import load_private, sign_state

    n_test = len({i.participant for i in instances_by_split(site_ws, ("test",))})
    policy = load_policy().model_dump() | {"min_participants": 2, "min_release_participants": n_test + 1}
    (site_ws.root / "policy.json").write_text(json.dumps(policy))
    spec = RunSpec("floor", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws))
    state, key = initial_state(spec), load_private(tmp_path / "center.key")
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    ctx = spec.context(1, 2)
    e = EvaluateInstruction(context=json.dumps(ctx), signature=sign_state(key, state, ctx),
                            policy=load_policy().model_dump_json(), max_new_tokens=8)
    reply = app(Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(e.to_record())}),
                        dst_node_id=7, message_type="evaluate"), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert EvaluateReply.from_record(reply.content["metrics"]).num_examples == 0
    withheld = [x for x in audit.read(site_ws.audit_path) if x["event"] == "evaluation_withheld"]
    assert len(withheld) == 1 and withheld[0]["participants"] == n_test and (site_ws.root / "reports").is_dir()
    ctx = spec.context(0, 0)
    t = TrainInstruction(context=json.dumps(ctx), signature=sign_state(key, state, ctx),
                         policy=load_policy().model_dump_json(), round=1, stage=2, local_epochs=1, batch_size=8,
                         lr_lq=1e-3, lr_lora=1e-3, lr_maa=1e-3, round_validation=True)
    reply = app(Message(RecordDict({"arrays": packed_record(state), "config": ConfigRecord(t.to_record())}),
                        dst_node_id=7, message_type="train"), context)
    assert not reply.has_error() and TrainReply.from_record(reply.content["metrics"]).validation == {}


def test_only_the_runs_final_global_becomes_what_the_site_scores_with(site_ws, flower_task, tmp_path):
    """Session 41 (a site-path review): every accepted training message replaced `federated/latest`, so
    round 1 of the next run (a random LQ-former, a zero B) replaced the last run's final adapters for every
    `score --adapters auto` while it ran. Now only the run's final step (the evaluation message, which
    always carries the final global) does."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fl_client.app import Accepted, _accept
    from mllm_dr.config import ModelConfig
    from mllm_dr.protocol import EvaluateInstruction, TrainInstruction
    from mllm_dr.signing import load_private, read_checkpoint, sign_state

    key = load_private(tmp_path / "center.key")
    pub = key.public_key()
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    latest = site_ws.checkpoints_dir / "federated" / "latest"

    def message(kind, run, value):
        ctx = {"round": 1, "stage": 2, "base_model": "tiny-random", "base_sha256": "ab" * 32, "run": run,
               "model": ModelConfig().to_dict(), "dims": {"audio": 25}}
        state = {"maa.v": torch.full((4,), value)}
        signed = {"context": json.dumps(ctx), "signature": sign_state(key, state, ctx)}
        instruction = (TrainInstruction(**signed, round=2, stage=2, local_epochs=1, batch_size=1, lr_lq=1e-3,
                                        lr_lora=1e-3, lr_maa=1e-3) if kind == "train"
                       else EvaluateInstruction(**signed, max_new_tokens=8))
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),   # as the wire mod unpacks it
                                   "config": ConfigRecord(instruction.to_record())}),
                       dst_node_id=7, message_type=kind), type(instruction)

    msg, kind = message("evaluate", "first", 1.0)
    assert isinstance(_accept(msg, context, kind), Accepted)
    assert float(read_checkpoint(latest, pub)[0]["maa.v"][0]) == 1.0          # the run's final global: kept for scoring
    msg, kind = message("train", "next", 2.0)
    assert isinstance(_accept(msg, context, kind), Accepted)
    assert float(read_checkpoint(latest, pub)[0]["maa.v"][0]) == 1.0          # a training round's global: not


@pytest.mark.parametrize("norms", ["federated", "participant"])
def test_a_sites_evaluation_under_the_runs_norms_reads_no_training_features(site_ws, monkeypatch, norms):
    """The final evaluation and each round check loaded every training participant's features only to set
    norms that the signed spec carries (federated) or that do not exist (participant) (session 43). Now
    they read the held-out split alone, with the run's norms."""
    import mllm_dr.federated as federated
    from fl_server.plan import RunPlan
    from mllm_dr.base_model import base_info
    from mllm_dr.federated import RunSpec, SiteSession, initial_state, site_dims, site_moments

    plan = RunPlan.model_validate({"center-dir": "/x", "run-name": "r", "feature-norms": norms})
    moments = [site_moments(site_ws)] if norms == "federated" else None
    spec = RunSpec("r", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws), plan.architecture(),
                   feature_norms=federated.run_feature_norms(moments) if moments else {})
    session = SiteSession(site_ws, spec)
    session.load_global(initial_state(spec, 0))

    def no_training_data(*a, **k):
        raise AssertionError("the evaluation loaded the training participants' features")

    monkeypatch.setattr(federated, "labelled_training_instances", no_training_data)
    assert session.validate().stats.n > 0
    got, want = session.sm.processor.norms, spec.norms() if norms == "federated" else {}
    assert got.keys() == want.keys() and all(torch.equal(got[m][k], want[m][k]) for m in want for k in (0, 1))


def test_the_runs_final_step_clears_what_the_site_kept_for_its_rounds(site_ws, flower_task, tmp_path):
    """The uplink's error-feedback residual and unused secure-aggregation keys outlived their run: a later run
    of the same name (a new center's) added the old residual to its first update (a site-path review, session
    43). The run's final step (the evaluation message) now deletes them; another run's stay."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fl_client.app import Accepted, _accept
    from fl_client.secagg_mod import key_store
    from mllm_dr.base_model import base_info
    from mllm_dr.federated import RunSpec, initial_state, site_dims
    from mllm_dr.protocol import EvaluateInstruction
    from mllm_dr.signing import load_private, sign_state
    from mllm_dr.uplink import encode_update, residual_path

    for run in ("done", "other"):
        encode_update({"maa.v": torch.randn(300)}, {"maa.v": torch.zeros(300)}, "int8", residual_path(site_ws.root, run))
        key_store(site_ws).new(run, 4)
    assert residual_path(site_ws.root, "done").is_file()
    spec = RunSpec("done", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws))
    state, ctx = initial_state(spec, 0), spec.context(3, 2)
    instruction = EvaluateInstruction(context=json.dumps(ctx), signature=sign_state(load_private(tmp_path / "center.key"),
                                                                                    state, ctx), max_new_tokens=8)
    msg = Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),
                              "config": ConfigRecord(instruction.to_record())}), dst_node_id=7, message_type="evaluate")
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    assert isinstance(_accept(msg, context, EvaluateInstruction), Accepted)
    assert not residual_path(site_ws.root, "done").exists() and residual_path(site_ws.root, "other").is_file()
    keys = sorted(p.name for p in (site_ws.root / "federation" / "secagg").iterdir())
    assert keys == ["other-round0004.x25519"]


def test_the_final_global_keeps_the_sites_norms_and_scoring_neither_refits_nor_loads_training_data(
        site_ws, flower_task, tmp_path, monkeypatch):
    """Session 42 (a scoring review): in a run normalising features per site, `score`/`evaluate` with the
    federated adapters refit the site's norms from the labelled data as it is today (scores moved when
    participants were added or relabelled after the run), and loaded every training participant's features
    to do it, even in a run whose norms travel in the signed spec. Now the site's norms of the run's final
    step are kept beside the final global and loaded from there."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from safetensors.torch import load_file

    import mllm_dr.federated as federated
    from fl_client.app import Accepted, _accept
    from fl_server.plan import RunPlan
    from mllm_dr.adapters import NORMS
    from mllm_dr.base_model import base_info
    from mllm_dr.federated import RunSpec, initial_state, load_federated, site_dims, site_moments
    from mllm_dr.processor import norms_from_moments
    from mllm_dr.protocol import EvaluateInstruction
    from mllm_dr.signing import load_private, sign_state

    key = load_private(tmp_path / "center.key")
    plan = RunPlan.model_validate({"center-dir": "/x", "run-name": "r", "feature-norms": "site"})
    spec = RunSpec("r", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws), plan.architecture())
    assert spec.feature_norms_kind() == "site"
    state, ctx = initial_state(spec, 0), spec.context(3, 2)
    instruction = EvaluateInstruction(context=json.dumps(ctx), signature=sign_state(key, state, ctx), max_new_tokens=8)
    msg = Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(state),
                              "config": ConfigRecord(instruction.to_record())}), dst_node_id=7, message_type="evaluate")
    context = Context(run_id=1, node_id=7, node_config={"workspace": str(site_ws.root)}, state=RecordDict(),
                      run_config={})
    assert isinstance(_accept(msg, context, EvaluateInstruction), Accepted)
    kept = load_file(str(site_ws.checkpoints_dir / "federated" / "latest" / NORMS))
    then = norms_from_moments([site_moments(site_ws)])
    assert kept and all(torch.equal(kept[f"{m}.mean"], mean) for m, (mean, _) in then.items())

    def no_training_data(*a, **k):
        raise AssertionError("scoring loaded the training participants' features")

    monkeypatch.setattr(federated, "examples", no_training_data)
    monkeypatch.setattr(federated, "labelled_training_instances", no_training_data)
    sm = load_federated(site_ws)
    assert sm.processor.norms and all(torch.equal(sm.processor.norms[m][1], then[m][1]) for m in then)
    from mllm_dr.adapters import participant_keys      # and who this site trained on, for the clinician's page
    from mllm_dr.dataset import labelled_training_instances

    assert sm.meta["trained_on"] == participant_keys({i.participant for i in labelled_training_instances(site_ws)})
    # features extracted again with other columns at the same widths (DAIC's CLNF names, session 42): refused,
    # never read permuted
    from mllm_dr.errors import InputError
    from mllm_dr.features.store import FeatureStore

    store = FeatureStore(site_ws.features_dir)
    entry = next(e for e in store.manifest["participants"].values() if e["audio"]["present"])
    entry["audio"]["columns"] = "0" * 16
    store._write_manifest()
    with pytest.raises(InputError, match="audio features were extracted again with other columns"):
        load_federated(site_ws)
