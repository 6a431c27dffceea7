"""Model tests on tiny-random: masks, insertion, gradients/freezing, fallback, metrics, adapters."""

import math

import pytest
import torch

from mllm_dr.adapters import build_site_model, get_adapter_state, load_adapters, save_adapters, state_version
from mllm_dr.aspects import AspectInstance
from mllm_dr.base_model import BaseInfo
from mllm_dr.config import LQFormerConfig, MAAConfig, ModelConfig, TrainConfig
from mllm_dr.errors import ModelMismatchError
from mllm_dr.lq_former import LQFormer
from mllm_dr.maa import MAA
from mllm_dr.metrics import SufficientStats, compute, evaluate_totals
from mllm_dr.processor import Example
from mllm_dr.scoring import fallback_score, score_examples, summarize
from mllm_dr.training import optimizer_for, train_epoch, train_stage


def test_lq_former_padding_changes_nothing():
    torch.manual_seed(0)
    lq = LQFormer(25, 64).eval()
    x = torch.randn(1, 7, 25)
    out = lq(x, torch.zeros(1, 7, dtype=torch.bool))
    padded = torch.cat([x, torch.randn(1, 5, 25) * 100], dim=1)
    mask = torch.tensor([[False] * 7 + [True] * 5])
    assert torch.allclose(out, lq(padded, mask), atol=1e-5)
    assert not torch.allclose(out, lq(padded, torch.zeros(1, 12, dtype=torch.bool)), atol=1e-3)
    with pytest.raises(TypeError, match="boolean"):
        lq(padded, mask.float())
    assert lq.d_model == 128 and LQFormer(709, 64, LQFormerConfig(n_layers=1)).d_model == 712


def test_maa_respects_mask():
    torch.manual_seed(0)
    maa = MAA(64, MAAConfig(n_heads=8))
    h = torch.randn(2, 10, 64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 6:] = False
    h2 = h.clone()
    h2[:, 6:] = 1000.0
    assert torch.allclose(maa(h, mask), maa(h2, mask), atol=1e-5)


def _instance(item="Sleep", label=2):
    return AspectInstance("p1", item, label, "Participant: i can't sleep at night", 1, 1, evidence="i can't sleep")


SMALL = ModelConfig(lq=LQFormerConfig(n_queries=4, n_layers=1))


def _model(tiny, config=None):
    """A SiteModel on a copy of the tiny base (model + processor), seeded."""
    base, tok, info = tiny
    import copy

    return build_site_model(copy.deepcopy(base), tok, info, {"audio": 25, "visual": 49}, config or SMALL, seed=0)


def _example(stage=2, answer="Evaluation Result: 2\nEvaluation Reason: The participant cannot sleep at night.", label=2,
             visual=False):
    feats = {"audio": torch.randn(9, 25), "visual": torch.randn(6, 49) if visual else None}  # default: visual missing
    return Example(_instance(label=label), feats, answer, stage)


def test_insertion_slots_and_labels(tiny):
    sm = _model(tiny)
    model = sm.model.eval()  # no dropout: compare exact values
    batch = sm.processor.collate([_example(), _example(answer=None)])
    for m in ("audio", "visual"):
        assert batch.slots[m].sum(1).tolist() == [4, 4]
    assert (batch.labels[batch.slots["audio"]] == -100).all()
    assert (batch.labels[batch.prompt_mask] == -100).all()
    answer_positions = batch.labels != -100
    assert answer_positions.any() and not (answer_positions & batch.prompt_mask).any()
    # the inserted embeddings are the LQ-former outputs
    emb = model.embed(batch)
    proj = model.lq["audio"](batch.feats["audio"], batch.feat_pad["audio"])
    assert torch.allclose(emb[batch.slots["audio"]], proj.reshape(-1, proj.shape[-1]), atol=1e-6)
    assert batch.feats["visual"].abs().sum() == 0  # missing modality -> zero features


@pytest.mark.parametrize("stage", [1, 2])
def test_every_trainable_parameter_trains_and_frozen_ones_do_not(tiny, stage):
    sm = _model(tiny)
    model = sm.model
    model.enable_lora()
    if stage == 1:
        exs = [_example(1, "Score: 2", visual=True), _example(1, "Score: 1", 1, visual=True)]
    else:
        exs = [_example(2, visual=True), _example(2, label=1, visual=True)]
    cfg = TrainConfig(batch_size=1, lr_lq=1e-2, lr_lora=1e-2, lr_maa=1e-2)
    opt = optimizer_for(sm, stage, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # two optimizer steps: LoRA's B starts at zero, so A receives gradient from the second step on
    train_epoch(sm, exs, stage, cfg, opt, 0, 1)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if n in trainable:
            assert changed, f"{n} should train in stage {stage}"
        else:
            assert not changed, f"{n} is frozen in stage {stage} but changed"
    model.train()
    opt.zero_grad()
    out = model(sm.processor.collate(exs))
    (out["lm_loss"] + (out["mse"] if stage == 2 else 0)).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    expected = ("lq.",) if stage == 1 else ("lora_", "maa.")
    assert trainable and all(any(e in n for e in expected) for n in trainable)
    if stage == 1:
        assert any("queries" in n for n in trainable) and any("lq.visual" in n for n in trainable)


def test_regression_fallback_when_format_breaks(tiny):
    sm = _model(tiny)
    items = score_examples(sm, [_example(answer=None)], max_new_tokens=4)
    assert items[0].source == "regression"  # an untrained tiny model cannot follow the format
    # the score of the value as shown, rounded half up (round() sent 2.5 to 2: test_metrics_s45.py covers 2.5)
    assert items[0].score == fallback_score(items[0].regression_score)
    out = summarize("p1", items, sm)
    assert out["total"] == items[0].score and "warning" in out


def test_metrics_against_hand_computed_values():
    true, pred = [0, 5, 10, 20], [2, 5, 12, 14]
    m = evaluate_totals(true, pred)
    mx, my = 8.75, 8.25
    vx = sum((t - mx) ** 2 for t in true) / 4
    vy = sum((p - my) ** 2 for p in pred) / 4
    cov = sum((t - mx) * (p - my) for t, p in zip(true, pred)) / 4
    assert m["ccc"] == pytest.approx(2 * cov / (vx + vy + (mx - my) ** 2))
    assert m["rmse"] == pytest.approx(math.sqrt((4 + 0 + 4 + 36) / 4))
    assert m["mae"] == pytest.approx(10 / 4)
    # binary >= 10: true positives 10->12, 20->14; no false positives or negatives
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0)
    assert evaluate_totals([12, 3], [8, 11])["f1"] == 0.0
    a, b = SufficientStats(), SufficientStats()
    for t, p in zip(true[:2], pred[:2]):
        a.add(t, p)
    for t, p in zip(true[2:], pred[2:]):
        b.add(t, p)
    assert compute(a.merge(b)) == pytest.approx(m)


def _numpy_totals(true, pred) -> dict:
    """The totals metrics computed independently with numpy (population moments; binary >= 10)."""
    import numpy as np

    t, p = np.asarray(true, float), np.asarray(pred, float)
    ccc = 2 * np.cov(t, p, bias=True)[0, 1] / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)
    tb, pb = t >= 10, p >= 10
    tp, fp, fn = int(np.sum(tb & pb)), int(np.sum(~tb & pb)), int(np.sum(tb & ~pb))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"n": len(t), "ccc": ccc, "rmse": float(np.sqrt(np.mean((t - p) ** 2))),
            "mae": float(np.mean(np.abs(t - p))),
            "precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def test_metrics_against_numpy_with_precision_unlike_recall():
    """P != R (a review, session 45: every case had P = R, so swapping them went unseen), checked against
    numpy, and sites pooled by their sufficient statistics against numpy over the union of their totals."""
    import random

    true = [0, 4, 9, 10, 12, 15, 20, 27, 11, 3]
    pred = [1, 11, 8, 9, 14, 12, 22, 20, 13, 10]    # tp 5, fp 2, fn 1: P 5/7, R 5/6
    m, want = evaluate_totals(true, pred), _numpy_totals(true, pred)
    assert want["precision"] == pytest.approx(5 / 7) and want["recall"] == pytest.approx(5 / 6)
    assert m == pytest.approx(want)
    rng = random.Random(3)
    sites = [[(rng.randint(0, 27), rng.randint(0, 27)) for _ in range(rng.randint(3, 12))] for _ in range(4)]
    pooled = SufficientStats()
    for site in sites:
        stats = SufficientStats()
        for t, p in site:
            stats.add(t, p)
        pooled = pooled.merge(stats)
    union = [pair for site in sites for pair in site]
    assert compute(pooled) == pytest.approx(_numpy_totals([t for t, _ in union], [p for _, p in union]))


def test_adapters_round_trip_and_base_mismatch(tiny, tmp_path):
    sm = _model(tiny)
    sm.model.enable_lora()
    with torch.no_grad():
        for n, p in sm.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    sm.processor.fit_norms([_example(visual=True)])
    meta = save_adapters(sm, tmp_path / "ad")
    files = {p.name: p.stat().st_size for p in (tmp_path / "ad").rglob("*") if p.is_file()}
    assert set(files) == {"adapters.safetensors", "feature_norm.safetensors", "adapter_meta.json"}
    lora_bytes = sum(t.numel() * 4 for n, t in get_adapter_state(sm.model).items() if n.startswith("lora."))
    assert 0 < lora_bytes < 200_000  # LoRA only: no embedding matrix, no base weights
    base, tok, info = tiny
    import copy

    loaded = load_adapters(copy.deepcopy(base), tok, info, tmp_path / "ad")
    sm.model.eval(), loaded.model.eval()
    batch = sm.processor.collate([_example()])
    assert torch.allclose(sm.model(batch)["regression"], loaded.model(batch)["regression"], atol=1e-5)
    assert state_version(get_adapter_state(loaded.model)) == meta["version"] == loaded.version
    assert all(torch.equal(a, b) for a, b in zip(sm.processor.norms["audio"], loaded.processor.norms["audio"]))
    other = BaseInfo("other", info.path, "0" * 64, info.hidden_size)
    with pytest.raises(ModelMismatchError, match="trained on base"):
        load_adapters(copy.deepcopy(base), tok, other, tmp_path / "ad")


def test_a_cpu_process_never_imports_bitsandbytes_and_a_4bit_base_still_gets_4bit_lora():
    """Every Flower message and CLI call is a new process, and importing bitsandbytes costs ~2.5 s
    of CPU there (it registers torch.compile kernels); peft imports it eagerly. A fp32 base with
    LoRA must not load it; a 4-bit base loaded later in the same process still gets peft's 4-bit
    LoRA layers. In a fresh interpreter: this pytest process may have imported it already."""
    import subprocess
    import sys

    code = """
import sys
from mllm_dr.adapters import build_site_model, get_adapter_state
from mllm_dr.base_model import load_base
from mllm_dr.config import ModelConfig
sm = build_site_model(*load_base("tiny-random"), {"audio": 25, "visual": 49}, ModelConfig(), seed=0)
sm.model.enable_lora()
assert any(n.startswith("lora.") for n in get_adapter_state(sm.model))
assert "bitsandbytes" not in sys.modules, "a fp32 base with LoRA imported bitsandbytes"
sm4 = build_site_model(*load_base("tiny-random", "cpu", load_in_4bit=True), {"audio": 25, "visual": 49}, ModelConfig(), seed=0)
sm4.model.enable_lora()
from peft.tuners.lora.bnb import Linear4bit
q = sm4.model.base.get_base_model().model.layers[0].self_attn.q_proj
assert isinstance(q, Linear4bit), type(q)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_fedprox_pulls_the_trained_weights_toward_where_the_stage_started(tiny):
    """TrainConfig.proximal_mu (FedProx): the same data, seed and steps end closer to the start weights
    (a federated round's global) with the proximal term than without."""
    exs = [_example(2, visual=True), _example(2, label=1, visual=True), _example(2, label=3), _example(2, label=0)]

    def drift(mu: float) -> float:
        sm = _model(tiny)
        sm.model.enable_lora()
        start = {n: p.detach().clone() for n, p in sm.model.named_parameters() if p.requires_grad}
        train_stage(sm, exs, 2, 2, TrainConfig(batch_size=1, lr_lora=1e-2, lr_maa=1e-2, proximal_mu=mu))
        return math.sqrt(sum(float((p.detach() - start[n]).pow(2).sum())
                             for n, p in sm.model.named_parameters() if n in start))

    free, pulled = drift(0.0), drift(50.0)
    assert free > 0 and pulled < 0.8 * free, (free, pulled)


def _stream_examples(n_participants=3, items=("Sleep", "Tired")):
    torch.manual_seed(0)
    return [Example(AspectInstance(f"p{k}", item, k % 4, f"Participant: answer {k} " + "x " * k, 1, 1, evidence="x"),
                    {"audio": torch.randn(9, 25), "visual": None},
                    f"Evaluation Result: {k % 4}\nEvaluation Reason: reason {k}.", 2)
            for k in range(n_participants) for item in items]


def test_local_steps_are_windows_of_one_stream_of_epochs(tiny):
    """TrainConfig.local_steps (a federated round of S steps): round k trains steps k*S .. k*S + S - 1 of the
    stage's stream of epochs, each epoch batched as the plain trainer batches it. Two half-epoch windows are
    exactly the epoch's batches, a window that crosses the end of an epoch continues into the next one, and
    a round of one whole-epoch window trains the same weights as one plain epoch."""
    from mllm_dr.training import PatientDP, epoch_batches, step_window

    sm, exs = _model(tiny), _stream_examples()
    cfg = TrainConfig(batch_size=1, lr_lora=1e-2, lr_maa=1e-2)

    def ids(chunks):
        return [(c.instance.participant, c.instance.item) for chunk in chunks for c in chunk]

    epoch0, epoch1 = (ids(epoch_batches(sm, exs, 2, cfg, e)) for e in (0, 1))
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1) and len(epoch0) == 6
    assert ids(step_window(sm, exs, 2, cfg, 0, 3)) + ids(step_window(sm, exs, 2, cfg, 3, 3)) == epoch0
    assert ids(step_window(sm, exs, 2, cfg, 4, 4)) == epoch0[4:] + epoch1[:2]
    assert ids(step_window(sm, exs, 2, cfg, 7, 2)) == epoch1[1:3]

    def trained(window):
        sm = _model(tiny)
        sm.model.enable_lora()
        train_stage(sm, exs, 2, 1, cfg, window=window)
        return get_adapter_state(sm.model)

    plain, one_window, half = trained(None), trained((0, 6)), trained((0, 3))
    assert all(torch.equal(plain[n], one_window[n]) for n in plain)
    assert any(not torch.equal(plain[n], half[n]) for n in plain)
    with pytest.raises(ValueError, match="not with DP-SGD"):
        train_stage(_model(tiny), exs, 2, 1, cfg, dp=PatientDP(1.0, 1.0, 0.5), window=(0, 3))


def test_4bit_base_trains_lora_and_keeps_its_weights_quantized():
    """The --load-in-4bit path (bitsandbytes nf4): runs on CPU too, so it is tested here; on a GPU
    site the same code loads LLaMA-3-8B in 4 bit."""
    import bitsandbytes as bnb

    from mllm_dr.base_model import load_base

    base4 = load_base("tiny-random", "cpu", load_in_4bit=True)
    assert isinstance(base4[0].model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    sm = _model(base4)
    model = sm.model
    exs = [_example(2, visual=True), _example(2, label=1, visual=True)]
    cfg = TrainConfig(batch_size=2, lr_lora=1e-2, lr_maa=1e-2)
    opt = optimizer_for(sm, 2, cfg)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
    quantized = {n: p.detach().clone() for n, p in model.base.named_parameters() if p.dtype == torch.uint8}
    stats = train_epoch(sm, exs, 2, cfg, opt, 0, 1)
    assert stats["loss"] == stats["loss"] and lora and quantized
    assert all(not torch.equal(lora[n], p) for n, p in model.named_parameters() if n in lora)
    assert all(torch.equal(quantized[n], p) for n, p in model.base.named_parameters() if n in quantized)
