"""Patient-level DP-SGD: the patient is the unit (in a step, the instance of the step's item, or all 8 of
its item instances); exact per-patient gradients, clipping that bounds one patient's contribution, the
noise the accountant assumes, steps drawn independently of the data, a budget that binds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from policies.schema import SitePolicy, load_policy


@pytest.fixture
def session(site_ws):
    from mllm_dr.base_model import base_info
    from mllm_dr.federated import RunSpec, SiteSession, initial_state, site_dims

    spec = RunSpec("r", "tiny-random", base_info("tiny-random").sha256, site_dims(site_ws))
    s = SiteSession(site_ws, spec)
    s.load_global(initial_state(spec))
    return s


def _setup(session, stage=2):
    from mllm_dr.config import TrainConfig
    from mllm_dr.training import by_patient, stage_loss

    cfg = TrainConfig()
    groups = list(by_patient(session.training_examples(stage)).values())[:3]
    trainable = [p for ps in session.sm.model.stage_parameters(stage).values() for p in ps]
    session.sm.model.train()
    return groups, trainable, lambda out: stage_loss(out, stage, cfg, 0, 1)


def _flat(grads):
    return torch.cat([g.reshape(-1).double() for g in grads])


@pytest.mark.parametrize("stage", [1, 2])
def test_dp_gradient_equals_the_plain_gradient_without_noise_or_clipping(session, stage):
    from mllm_dr.privacy import PrivateRandom
    from mllm_dr.training import PatientDP, private_gradient

    groups, trainable, loss_of = _setup(session, stage)
    assert all(len(g) == 8 for g in groups)                        # one patient = the 8 PHQ items
    torch.manual_seed(0)                                            # the same dropout masks on both paths
    plain = torch.autograd.grad(sum(loss_of(session.sm.model(session.sm.processor.collate(g))) for g in groups)
                                / len(groups), trainable, allow_unused=True)
    plain = [torch.zeros_like(p) if g is None else g for g, p in zip(plain, trainable)]
    torch.manual_seed(0)
    dp, norms = private_gradient(session.sm, groups, trainable, loss_of, PatientDP(1e12, 0.0, 1.0), len(groups),
                                 PrivateRandom(0))
    assert _flat(plain).norm() > 0 and len(norms) == 3
    scale = float(_flat(plain).abs().max())
    assert float((_flat(dp) - _flat(plain)).abs().max()) <= 1e-6 * scale      # float32 round-off only


def test_clipping_bounds_each_patients_contribution_and_noise_has_the_accounted_scale(session):
    from mllm_dr.privacy import PrivateRandom
    from mllm_dr.training import PatientDP, private_gradient

    groups, trainable, loss_of = _setup(session)
    clip = 1e-3
    dirs = []
    for g in groups:
        torch.manual_seed(1)
        one, norms = private_gradient(session.sm, [g], trainable, loss_of, PatientDP(clip, 0.0, 1.0), 1.0,
                                      PrivateRandom())
        assert norms[0] > clip and float(_flat(one).norm()) == pytest.approx(clip, rel=1e-6)
        torch.manual_seed(1)
        free, _ = private_gradient(session.sm, [g], trainable, loss_of, PatientDP(1e12, 0.0, 1.0), 1.0,
                                   PrivateRandom())
        assert torch.allclose(_flat(one) / clip, _flat(free) / _flat(free).norm(), atol=1e-6)   # same direction
        dirs.append(_flat(one))
    torch.manual_seed(1)
    both, _ = private_gradient(session.sm, groups, trainable, loss_of, PatientDP(clip, 0.0, 1.0), 1.0,
                               PrivateRandom())
    assert float(_flat(both).norm()) <= len(groups) * clip * (1 + 1e-6)
    # nobody sampled: the step is pure noise, std = noise_multiplier * clip / expected patients per step
    noise, _ = private_gradient(session.sm, [], trainable, loss_of, PatientDP(0.5, 2.0, 0.25), 4.0,
                                PrivateRandom(3))
    assert float(_flat(noise).std()) == pytest.approx(2.0 * 0.5 / 4.0, rel=0.05)


def _policy(**dp) -> SitePolicy:
    pol = load_policy().model_dump()
    pol["dp"].update({"enabled": True, "unit": "patient"} | dp)
    return SitePolicy.model_validate(pol)


@pytest.mark.parametrize("step,noise,steps", [("patient", 1.0, 2), ("item", 3.0, 16)])
def test_patient_dp_is_accounted_per_patient_and_the_budget_binds(tmp_path, flower_task, synth_site, step, noise, steps):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from opacus.accountants import RDPAccountant

    from fl_client.privacy_mod import charged_dp, dp_mod
    from mllm_dr import audit
    from mllm_dr.privacy import PrivacyLedger
    from mllm_dr.protocol import BUDGET_SPENT, TrainInstruction
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(synth_site[0]), "edaic"    # PHQ-8: 8 items
    ws.save()
    (ws.root / "policy.json").write_text(_policy(noise_multiplier=noise, sample_rate=0.5, epsilon_budget=6.0,
                                                 step=step).model_dump_json())
    app, seen = ClientApp(), []

    @app.train(mods=[dp_mod])
    def train(msg, context):
        seen.append(charged_dp(context))
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict({"maa.w": torch.full((5,), 2.0)}),
                                   "metrics": MetricRecord({"num-examples": 40, "lora-scaling": 2.0,
                                                            "train-loss": 0.7, "val-ss-n": 3.0})}), reply_to=msg)

    ctx = Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})
    replies = []
    for r in range(1, 6):
        cfg = ConfigRecord(TrainInstruction(context=json.dumps({"run": "x", "round": r - 1}), signature="", round=r,
                                            stage=2, local_epochs=1, batch_size=1, lr_lq=1e-3, lr_lora=1e-3,
                                            lr_maa=1e-3).to_record())
        sent = ArrayRecord.from_torch_state_dict({"maa.w": torch.zeros(5)})
        replies.append(app(Message(RecordDict({"arrays": sent, "config": cfg}), dst_node_id=7, message_type="train"),
                           ctx))
    ok = [r for r in replies if not r.has_error()]
    assert replies[-1].has_error() and replies[-1].error.code == BUDGET_SPENT and "per patient" in replies[-1].error.reason
    assert seen[0][1] == steps                                      # the steps charged, handed to the trainer
    seen = [dp for dp, _ in seen]
    assert seen[0].sample_rate == 0.5 and seen[0].noise_multiplier == noise and len(seen) == len(ok) >= 1
    assert seen[0].steps_per_epoch == steps and (seen[0].items is None) == (step == "patient")
    acc = RDPAccountant()
    acc.history = [(noise, 0.5, steps)] * len(ok)   # 1 epoch at rate 0.5: 2 steps per round, for each of 8 items
    m = ok[-1].content["metrics"]
    assert m["epsilon-total"] == pytest.approx(acc.get_epsilon(1e-5)) and m["epsilon-total"] <= 6.0
    assert m["train-loss"] == 0.0 and "val-ss-n" not in m         # withheld: the epsilon does not cover them
    assert torch.equal(ok[0].content["arrays"].to_torch_state_dict()["maa.w"], torch.full((5,), 2.0))  # no site noise
    assert PrivacyLedger.of(ws.root, "patient").spent(1e-5) == pytest.approx(m["epsilon-total"])
    assert not (ws.root / "privacy.json").exists()                  # the site-level ledger is another unit
    events = [e for e in audit.read(ws.audit_path) if e["event"] in ("dp_round", "privacy_budget_spent")]
    assert [e["unit"] for e in events] == ["patient"] * len(events) and events[-1]["event"] == "privacy_budget_spent"


def test_units_must_match_and_policy_show_reports_epsilon_per_patient(tmp_path):
    from conftest import run_cli
    from mllm_dr.privacy import PrivacyLedger

    site = _policy()
    assert any("each patient" in w for w in _policy(unit="site").weaker_than(site))
    assert _policy(noise_multiplier=1.5).weaker_than(site) == []
    ws = tmp_path / "ws"
    run_cli("mllmdr-site", "init", "--workspace", ws, "--site-id", "a")
    (ws / "policy.json").write_text(site.model_dump_json())
    PrivacyLedger.of(ws, "patient").record("r", 1, 1.0, 1.0, 1e-5, sample_rate=0.25, steps=4)
    shown = json.loads(run_cli("mllmdr-site", "policy", "show", "--workspace", ws, "--json").stdout)
    assert shown["epsilon_unit"] == "patient" and shown["epsilon_spent"] == pytest.approx(
        PrivacyLedger.of(ws, "patient").spent(1e-5)) and shown["epsilon_spent"] > 0
    text = run_cli("mllmdr-site", "policy", "show", "--workspace", ws).stdout
    assert "per patient" in text and not math.isnan(shown["epsilon_spent"])


def test_item_steps_train_one_item_over_poisson_samples_drawn_whatever_the_data(session):
    """dp.step = "item": a step trains one item; each sampled patient gives that item's instance only;
    a pass covers every item once; the draws (which patients, which item) do not depend on the data: a
    patient without an item is skipped at that item and nothing else changes."""
    from mllm_dr.phq import PHQ8_ITEMS
    from mllm_dr.privacy import dp_sgd_steps
    from mllm_dr.privacy import PrivateRandom
    from mllm_dr.training import PatientDP, by_patient, dp_steps

    exs = session.training_examples(2)
    patients = len(by_patient(exs))
    every = list(dp_steps(exs, PatientDP(1.0, 0.0, 1.0, PHQ8_ITEMS), PrivateRandom(5)))
    assert len(every) == 8 and all(len(step) == patients and all(len(g) == 1 for g in step) for step in every)
    assert sorted(step[0][0].instance.item for step in every) == sorted(PHQ8_ITEMS)     # a pass: each item once
    dp = PatientDP(1.0, 0.0, 0.5, PHQ8_ITEMS)
    steps = list(dp_steps(exs, dp, PrivateRandom(4)))   # a seed whose draws sample the patient below at its item
    assert len(steps) == dp.steps_per_epoch == dp_sgd_steps(1, 0.5, 8) == 16
    assert all(len({g[0].instance.item for g in step}) == 1 and all(len(g) == 1 for g in step) for step in steps if step)
    assert 0 < sum(len(step) for step in steps) < 16 * patients      # Poisson: some patients, not all
    gone = exs[0]                                                   # one patient loses one item
    fewer = list(dp_steps([e for e in exs if e is not gone], dp, PrivateRandom(4)))
    pair = (gone.instance.participant, gone.instance.item)
    for a, b in zip(steps, fewer):
        keep = [[e.instance for e in g] for g in a if (g[0].instance.participant, g[0].instance.item) != pair]
        assert keep == [[e.instance for e in g] for g in b]
    assert any(len(a) != len(b) for a, b in zip(steps, fewer))


def test_a_dp_sgd_round_trains_on_poisson_samples_of_patients(session):
    from mllm_dr.config import TrainConfig
    from mllm_dr.training import PatientDP, by_patient

    before = {n: t.clone() for n, t in session.sm.model.state_dict().items() if "lora_B" in n}
    update, n, stats = session.train_round(2, 1, TrainConfig(lr_lora=1e-2), dp=PatientDP(1.0, 0.5, 0.5, seed=0))
    patients = len(by_patient(session.training_examples(2)))
    assert n == 8 * patients and 0 < stats["patients_sampled"] <= 2 * patients    # 2 steps at rate 0.5
    assert stats["steps"] == PatientDP(1.0, 0.5, 0.5).steps_per_epoch == 2       # what the site's audit records
    after = session.sm.model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_a_site_under_patient_level_dp_refuses_a_round_of_local_steps_and_trains_nothing(session):
    """A run that asks for local steps (--set local-steps) meets a site whose own policy requires patient-level
    DP-SGD, whose steps the Poisson sampling fixes: the site refuses, naming both, before any step."""
    from mllm_dr.config import TrainConfig
    from mllm_dr.errors import InputError
    from mllm_dr.training import PatientDP

    before = {n: t.clone() for n, t in session.sm.model.state_dict().items()}
    with pytest.raises(InputError, match="local-steps.*patient-level DP"):
        session.train_round(2, 1, TrainConfig(lr_lora=1e-2, local_steps=2), dp=PatientDP(1.0, 0.5, 0.5, seed=0))
    assert all(torch.equal(session.sm.model.state_dict()[n], t) for n, t in before.items())
    update, n, stats = session.train_round(2, 1, TrainConfig(lr_lora=1e-2, local_steps=2), first_step=3)
    assert stats["steps"] == 2 and n == len(session.training_examples(2))


def test_a_rounds_steps_count_every_local_epoch(session):
    """The optimizer steps a round reports (the site audit's ``federated_round`` ``steps``) are the round's,
    all its local epochs together, with or without patient-level DP: not the last epoch's alone."""
    from mllm_dr.config import TrainConfig
    from mllm_dr.training import PatientDP, epoch_batches

    cfg = TrainConfig(lr_lora=1e-2)
    per_epoch = len(epoch_batches(session.sm, session.training_examples(2), 2, cfg, 0))
    assert session.train_round(2, 2, cfg)[2]["steps"] == 2 * per_epoch
    dp = PatientDP(1.0, 0.5, 0.5, seed=0)
    assert session.train_round(2, 3, cfg, dp=dp)[2]["steps"] == 3 * dp.steps_per_epoch


def test_a_round_is_reproducible_whatever_ran_before_it_in_the_process(session):
    """Dropout draws from torch's global generator: each epoch seeds it from the run's (seed, stage,
    epoch), so a site's round does not depend on what the process did first (a different code path
    before training gave a federated benchmark other round-1 losses)."""
    from mllm_dr.adapters import get_adapter_state, set_adapter_state
    from mllm_dr.config import TrainConfig

    start = {n: t.clone() for n, t in get_adapter_state(session.sm.model).items()}
    cfg = TrainConfig(lr_lora=1e-2, seed=5)
    first = {n: t.clone() for n, t in session.train_round(2, 1, cfg)[0].items()}
    set_adapter_state(session.sm.model, start)
    torch.rand(1000)                                   # other work used the global generator meanwhile
    second = session.train_round(2, 1, cfg)[0]
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)
    set_adapter_state(session.sm.model, start)
    other = session.train_round(2, 1, TrainConfig(lr_lora=1e-2, seed=6))[0]
    assert any(not torch.equal(first[n], other[n]) for n in first)          # the seed does matter (dropout)


def test_the_demo_policy_covers_the_demos_rounds_with_item_steps_and_refuses_one_more(tmp_path):
    """`DP=patient bash scripts/demo.sh`: with the demo's default rounds under DP and local epochs, the demo policy's
    DP-SGD (the default step, one PHQ item a step: 8x the steps of `step: patient`) stays within its budget,
    and the ledger refuses one round more (a noise multiplier left from patient steps would fail the first)."""
    import re
    from pathlib import Path

    from mllm_dr.phq import PHQ8_ITEMS
    from mllm_dr.privacy import BudgetSpent, PrivacyLedger, dp_sgd_steps
    from policies.schema import DPPolicy, SitePolicy

    root = Path(__file__).resolve().parents[1]
    demo = (root / "scripts" / "demo.sh").read_text()
    default = {"LOCAL_EPOCHS": int(re.search(r"^LOCAL_EPOCHS=\$\{LOCAL_EPOCHS:-(\d+)\}$", demo, re.M).group(1))}
    dp_rounds = re.search(r"^DP_ROUNDS=\((\d+) (\d+)\)", demo, re.M).groups()     # stage 1, stage 2 under DP
    default["STAGE1_ROUNDS"], default["STAGE2_ROUNDS"] = map(int, dp_rounds)
    dp = SitePolicy.model_validate_json((root / "policies" / "demo-dp-patient.json").read_text()).dp
    assert DPPolicy().step == dp.step == "item"
    steps = dp_sgd_steps(default["LOCAL_EPOCHS"], dp.sample_rate, items=len(PHQ8_ITEMS))   # the demo's corpus: E-DAIC, PHQ-8
    ledger = PrivacyLedger.of(tmp_path, "patient")
    for r in range(default["STAGE1_ROUNDS"] + default["STAGE2_ROUNDS"]):
        ledger.check(dp.noise_multiplier, dp.delta, dp.epsilon_budget, dp.sample_rate, steps)
        ledger.record("demo", r + 1, dp.noise_multiplier, dp.clip_norm, dp.delta, dp.sample_rate, steps)
    assert ledger.spent(dp.delta) <= dp.epsilon_budget
    with pytest.raises(BudgetSpent):
        ledger.check(dp.noise_multiplier, dp.delta, dp.epsilon_budget, dp.sample_rate, steps)


def test_dp_adam_bc_is_adamw_without_noise_and_takes_the_noise_variance_out_of_adams_second_moment():
    """DP-AdamBC (Tang et al., AAAI 2024): with no noise, exactly AdamW (weight decay 0); with noise of
    variance phi per number, the step divides by sqrt(max(v_hat - phi, phi)) instead of sqrt(v_hat)."""
    from mllm_dr.dp_adam import DPAdamBC

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, generator=gen)
    grads = [torch.randn(50, generator=gen) for _ in range(6)]
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    adamw, bc = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.0), DPAdamBC([b], noise_variance=0.0, lr=1e-2, floor=0.0)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        adamw.step()
        bc.step()
    assert not torch.equal(a, start) and torch.allclose(a, b, rtol=0, atol=1e-6)
    phi = 0.04                                                     # noise std 0.2
    g = torch.tensor([2.0, 0.1, -0.1])                             # one clear signal, two within the noise
    p = torch.zeros(3, requires_grad=True)
    p.grad = g.clone()
    DPAdamBC([p], noise_variance=phi, lr=1.0, eps=0.0, floor=phi).step()   # step 1: m_hat = g, v_hat = g^2
    want = -g / torch.sqrt(torch.clamp(g * g - phi, min=phi))
    assert torch.allclose(p.detach(), want) and abs(float(p[1])) < 1.0 and abs(float(p[0])) > 1.0
    q = torch.zeros(3, requires_grad=True)
    q.grad = g.clone()
    torch.optim.AdamW([q], lr=1.0, weight_decay=0.0, eps=0.0).step()
    assert torch.allclose(q.detach(), -torch.sign(g))                # plain Adam: a full step in the noise too


def test_the_policys_dp_optimizer_reaches_the_trainer_with_the_noise_on_the_mean(session, site_ws):
    from fl_client.privacy_mod import trainer_dp
    from mllm_dr.config import TrainConfig
    from mllm_dr.dp_adam import DPAdamBC
    from mllm_dr.training import PatientDP, optimizer_for

    assert trainer_dp(_policy().dp, site_ws).optimizer == "adamw"
    dp = trainer_dp(_policy(optimizer="adam-bc", noise_multiplier=2.0, clip_norm=0.5, sample_rate=0.25).dp, site_ws)
    assert dp.optimizer == "adam-bc"
    opt = optimizer_for(session.sm, 2, TrainConfig(), dp, patients=20)
    assert isinstance(opt, DPAdamBC) and opt.noise_variance == pytest.approx((2.0 * 0.5 / (0.25 * 20)) ** 2)
    assert opt.floor == opt.noise_variance
    assert type(optimizer_for(session.sm, 2, TrainConfig(), PatientDP(1.0, 2.0, 0.25), 20)) is torch.optim.AdamW
    assert type(optimizer_for(session.sm, 2, TrainConfig())) is torch.optim.AdamW
    before = {n: t.clone() for n, t in session.sm.model.state_dict().items() if "lora_B" in n}
    session.train_round(2, 1, TrainConfig(lr_lora=1e-2), dp=PatientDP(1.0, 0.5, 0.5, seed=0, optimizer="adam-bc"))
    after = session.sm.model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_two_runs_recording_at_once_keep_every_round_in_the_ledger(tmp_path):
    """Flower starts each message's ClientApp without waiting for the others: two runs' train replies can
    record at once. The ledger's read-append-rewrite was unlocked, so one rewrite dropped the other's round
    (epsilon under-counted); now it runs under an exclusive lock."""
    from concurrent.futures import ThreadPoolExecutor

    from mllm_dr.privacy import PrivacyLedger

    ledger = PrivacyLedger.of(tmp_path, "site")          # full-batch mechanisms: cheap to account
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: ledger.record(f"run{i % 2}", i, 1.0, 1.0, 1e-5), range(16)))
    assert sorted(e["round"] for e in ledger._data()["rounds"]) == list(range(16))
    assert ledger._data()["epsilon"] == pytest.approx(ledger.spent(1e-5))


def test_the_per_patient_epsilon_counts_rounds_spent_earlier_under_site_level_dp(tmp_path):
    """A site that ran rounds under site-level DP and then switched its policy to patient-level started the
    per-patient ledger at 0: the patients' real loss was not counted. A site-level round moves the clipped
    update by at most 2C for one patient: per patient it counts as a Gaussian with z / 2."""
    from mllm_dr.privacy import PrivacyLedger, epsilon_after

    PrivacyLedger.of(tmp_path, "site").record("old", 1, 1.0, 1.0, 1e-5)
    PrivacyLedger.of(tmp_path, "site").record("old", 2, 1.0, 1.0, 1e-5)
    patient = PrivacyLedger.of(tmp_path, "patient")
    inherited = epsilon_after([(0.5, 1.0, 1)] * 2, 1e-5)
    assert patient.spent(1e-5) == pytest.approx(inherited) and inherited > 0
    _, total = patient.record("new", 1, 1.8, 1.0, 1e-5, sample_rate=0.25, steps=4)
    assert total == pytest.approx(epsilon_after([(0.5, 1.0, 1)] * 2 + [(1.8, 0.25, 4)], 1e-5)) and total > inherited
    with pytest.raises(Exception, match="privacy budget"):
        patient.check(1.8, 1e-5, budget=inherited, sample_rate=0.25, steps=4)
    assert PrivacyLedger.of(tmp_path, "site").spent(1e-5) == pytest.approx(epsilon_after([(1.0, 1.0, 1)] * 2, 1e-5))


def test_two_runs_training_at_once_cannot_both_pass_the_budget_check(tmp_path, flower_task, synth_site):
    """Two runs' train messages reach a DP site at once with budget left for one round. The mod checked the
    budget, trained, and only then recorded: both checks read the same history, both trained, and together
    they spent past the budget. Now a round is charged (checked and recorded under the ledger's lock) before it
    trains, and a round whose training failed is refunded (nothing of it left the site)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_client.privacy_mod import dp_mod
    from mllm_dr.privacy import PrivacyLedger, epsilon_after
    from mllm_dr.protocol import BUDGET_SPENT, TrainInstruction
    from mllm_dr.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(synth_site[0]), "edaic"
    ws.save()
    one, two = (epsilon_after([(1.0, 1.0, 1)] * k, 1e-5) for k in (1, 2))
    (ws.root / "policy.json").write_text(_policy(unit="site", noise_multiplier=1.0, clip_norm=1.0,
                                                 epsilon_budget=(one + two) / 2).model_dump_json())
    both_inside, fail, charged = threading.Barrier(2, timeout=2), {"run": None}, []
    app = ClientApp()

    @app.train(mods=[dp_mod])
    def train(msg, context):
        try:
            both_inside.wait()             # old code: both runs train at once; now the second never gets here
        except threading.BrokenBarrierError:
            pass
        run = json.loads(TrainInstruction.from_record(msg.content["config"]).context)["run"]
        if run == fail["run"]:
            charged.append(len(PrivacyLedger.of(ws.root, "site").own()))   # charged before training...
            raise RuntimeError("training failed")
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict({"maa.w": torch.full((5,), 2.0)}),
                                   "metrics": MetricRecord({"num-examples": 40, "lora-scaling": 2.0,
                                                            "train-loss": 0.7})}), reply_to=msg)

    def message(run: str):
        cfg = ConfigRecord(TrainInstruction(context=json.dumps({"run": run, "round": 0}), signature="", round=1,
                                            stage=2, local_epochs=1, batch_size=1, lr_lq=1e-3, lr_lora=1e-3,
                                            lr_maa=1e-3).to_record())
        sent = ArrayRecord.from_torch_state_dict({"maa.w": torch.zeros(5)})
        return Message(RecordDict({"arrays": sent, "config": cfg}), dst_node_id=7, message_type="train")

    ctx = Context(run_id=1, node_id=7, node_config={"workspace": str(ws.root)}, state=RecordDict(), run_config={})
    ledger = PrivacyLedger.of(ws.root, "site")
    fail["run"] = "broken"                       # a round whose training fails is not charged
    with pytest.raises(RuntimeError):
        app(message("broken"), ctx)
    assert charged == [1] and ledger.own() == []      # ...and refunded: nothing of the round left the site
    fail["run"] = None
    both_inside.reset()                               # the lone message above broke it
    msgs = [message("run-a"), message("run-b")]
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda m: app(m, ctx), msgs))
    refused = [r for r in replies if r.has_error()]
    assert len(refused) == 1 and refused[0].error.code == BUDGET_SPENT, [r.error for r in refused]
    assert len(ledger.own()) == 1 and ledger.spent(1e-5) == pytest.approx(one) and one <= (one + two) / 2


def test_under_patient_dp_a_patients_model_input_depends_on_no_other_patient(tmp_path, synth_site):
    """Site feature norms (mean/std over all the site's training frames) made every patient's model input a
    function of every other patient, outside the DP-SGD accounting: the per-patient epsilon did not hold.
    `feature-norms = participant` scales each participant by their own frames; a patient-level DP site
    refuses a run with site norms (and the center a plan with them), as it refuses federated moments."""
    from types import SimpleNamespace

    from pydantic import ValidationError

    from fl_server.plan import RunPlan
    from mllm_dr.config import model_with
    from mllm_dr.federation_policy import check_run
    from mllm_dr.processor import Processor
    from mllm_dr.workspace import Workspace

    gen = torch.Generator().manual_seed(0)

    def patient(pid: str, frames: int, scale: float = 1.0, shift: float = 0.0):
        return SimpleNamespace(instance=SimpleNamespace(participant=pid),
                               features={"audio": torch.randn(frames, 5, generator=gen) * scale + shift})

    one = patient("p0", 40, 2.0, 1.0)
    others = [patient(f"p{i}", 30) for i in range(1, 4)]
    shifted = [SimpleNamespace(instance=o.instance, features={"audio": o.features["audio"] * 3 + 7}) for o in others]

    def model_input(feature_norm: str, training: list) -> torch.Tensor:
        proc = Processor(None, model_with(8, feature_norm=feature_norm), {"audio": 5})
        proc.fit_norms([one] + training)
        return proc.feature(one, "audio")

    assert not torch.equal(model_input("dataset", others), model_input("dataset", shifted))  # others move it
    own = model_input("participant", others)
    assert torch.equal(own, model_input("participant", shifted))                             # nobody else does
    assert own.mean(0).abs().max() < 1e-5 and (own.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert model_with(8).to_dict() == {k: v for k, v in model_with(8, feature_norm="participant").to_dict().items()
                                       if k != "feature_norm"}   # the default is not written: old signatures hold

    ws = Workspace.init(tmp_path / "ws", "site1")
    ws.config.corpus_path, ws.config.corpus_format = str(synth_site[0]), "edaic"
    ws.save()
    policy = _policy(noise_multiplier=1.0, epsilon_budget=8.0)
    (ws.root / "policy.json").write_text(policy.model_dump_json())
    run_policy = policy.model_dump_json()
    refused = check_run(ws, "site-norms", run_policy, "ab" * 32, "query", feature_norms="site")
    assert refused and "feature-norms=site" in refused
    assert check_run(ws, "site-norms", run_policy, "ab" * 32, "train", feature_norms="participant")  # binds
    assert check_run(ws, "own-norms", run_policy, "ab" * 32, "query", feature_norms="participant") is None
    plan = {"center-dir": "/c", "run-name": "r", "policy": run_policy}
    with pytest.raises(ValidationError, match="feature-norms=participant"):
        RunPlan.model_validate(plan | {"feature-norms": "site"})
    assert RunPlan.model_validate(plan | {"feature-norms": "participant"}).architecture().feature_norm == "participant"
