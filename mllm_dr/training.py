"""Two-stage training (paper section 3): stage 1 trains the LQ-formers with the LLM frozen;
stage 2 freezes them and trains LoRA (q/v) + MAA with L_lm + L_mse.

``train_stage`` is the one trainer: the local run (local_run.py) and a federated round
(federated.py) both call it, so they cannot drift apart. With ``PatientDP`` it trains by DP-SGD
with the patient as the privacy unit: each step Poisson-samples patients, takes one gradient per
sampled patient, clips it to ``clip_norm``, sums, adds Gaussian noise
N(0, (noise_multiplier * clip_norm)^2) and divides by the expected number of patients per step.
What a sampled patient gives a step (``PatientDP.items``): with ``items`` (the site policy's default,
``dp.step = "item"``), each step trains ONE PHQ item (the order drawn independently of the data) and a
patient gives that item's instance, so a step contrasts patients on one item as the plain trainer's
batches do; without, all of its item instances (one loss, one backward). Either way one patient moves a
step by at most ``clip_norm``. Only LoRA/MAA (or the LQ-formers) train, so one backward per patient is exact and cheap; no
per-sample-gradient hooks (Opacus' GradSampleModule and peft LoRA have had silent weight
corruption: opacus issue #820).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from mllm_dr import progress as prog
from mllm_dr.adapters import SiteModel
from mllm_dr.config import TrainConfig
from mllm_dr.dp_adam import DPAdamBC
from mllm_dr.privacy import PrivateRandom, clip_scale, dp_sgd_steps
from mllm_dr.processor import Example
from mllm_dr.progress import Progress

EpochHook = Callable[[int, dict], None]   # (epoch index, mean losses) after each epoch


def cosine_factor(k: int, n: int, floor: float = 0.1) -> float:
    """Learning-rate factor of step ``k`` of ``n`` (epochs of a local stage, or rounds of a federated
    stage: the same schedule for both, FlowerTune style), from 1 down to ``floor``."""
    if n <= 1:
        return 1.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * k / (n - 1)))


def optimizer_for(sm: SiteModel, stage: int, cfg: TrainConfig, dp: "PatientDP | None" = None,
                  patients: int = 0) -> torch.optim.Optimizer:
    """AdamW over the stage's parameter groups; under DP-SGD with ``dp.optimizer = "adam-bc"``, DP-AdamBC
    (mllm_dr/dp_adam.py) told the variance of the noise on each step's mean gradient at this site's
    ``patients``."""
    lr = {"lq": cfg.lr_lq, "lora": cfg.lr_lora, "maa": cfg.lr_maa}
    # "initial_lr" (torch's schedulers' key): the rate the schedule scales, kept in the optimizer's state, so
    # a restored state's scheduled "lr" is never taken for the base rate (session 44)
    groups = [{"params": ps, "lr": lr[g], "initial_lr": lr[g]}
              for g, ps in sm.model.stage_parameters(stage, joint=cfg.joint).items()]
    if dp is not None and dp.optimizer == "adam-bc":
        return DPAdamBC(groups, noise_variance=dp.noise_std_on_mean(patients) ** 2)
    return torch.optim.AdamW(groups, weight_decay=0.0)


def stage_trains(sm: SiteModel, stage: int, cfg: TrainConfig) -> bool:
    """Whether ``stage`` has anything to train (``MLlmDR.stage_parameters``): stage 1 of a run without audio
    or visual features (or with --no-lq) has no LQ-former. One rule for the local run, which skips such a
    stage, and a federated round, whose ``train_stage`` returns no epochs (session 44: a text-only run's
    stage-1 round raised "element 0 of tensors does not require grad")."""
    return any(sm.model.stage_parameters(stage, joint=cfg.joint).values())


def moving_alpha(epoch: int, epochs: int) -> float:
    """``--moving-weight``'s alpha in alpha * L_lm + (1 - alpha) * L_mse: (epoch + 1) / (epochs + 1), rising
    across the stage from L_mse's side toward L_lm's, and strictly between 0 and 1 in every epoch. The
    paper has no moving weight (section 3.3, Eq. 2: L_joint = L_lm + L_mse); with one epoch this is its
    equal weighting, halved. Before session 44 it was (epoch + 1) / epochs: L_mse's weight was 0 in the
    last epoch, so with one stage-2 epoch the MAA head never trained."""
    return (epoch + 1) / (epochs + 1)


def stage_loss(out: dict[str, torch.Tensor], stage: int, cfg: TrainConfig, epoch: int, epochs: int) -> torch.Tensor:
    """L_lm (+ the score token's own cross-entropy x ``score_weight``), + L_mse in stage 2 when joint
    (weighted by ``moving_alpha`` with ``moving_weight``)."""
    lm = out["lm_loss"]
    if cfg.score_weight and "score_loss" in out:
        lm = lm + cfg.score_weight * out["score_loss"]
    if stage == 1 or not cfg.joint or "mse" not in out:
        return lm
    if cfg.moving_weight:
        alpha = moving_alpha(epoch, epochs)
        return alpha * lm + (1 - alpha) * out["mse"]
    return lm + out["mse"]


def batches(sm: SiteModel, exs: list[Example], batch_size: int, seed: int, by_item: bool = True
            ) -> list[list[Example]]:
    """Shuffled batches of similar length ("sortish"): shuffle, sort windows of 8 batches by token length,
    cut into batches, shuffle the batches. With ``by_item`` a batch holds what its rows can share, which
    the model then computes once per batch: one PHQ item (different participants: the system prompt AND
    the item's instruction) with the instruction-first prompt, one participant (its media and dialogue)
    with the dialogue-first prompt (ModelConfig.prompt_layout). Every example is used once per epoch."""
    rng = random.Random(seed)
    by_participant = sm.processor.config.prompt_layout == "dialogue-first"
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(exs):
        key = (ex.instance.participant if by_participant else ex.instance.item) if by_item else ""
        groups.setdefault(key, []).append(i)
    window = 8 * batch_size
    out = []
    for key in sorted(groups):
        order = groups[key]
        rng.shuffle(order)
        for start in range(0, len(order), window):
            part = sorted(order[start:start + window], key=lambda i: len(sm.processor.encode(exs[i])["ids"]))
            out += [[exs[i] for i in part[k:k + batch_size]] for k in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def epoch_batches(sm: SiteModel, exs: list[Example], stage: int, cfg: TrainConfig, epoch: int) -> list[list[Example]]:
    """The batches of ``epoch`` of ``stage``: what the plain trainer and a window of local steps both train."""
    return batches(sm, exs, cfg.batch_size, cfg.seed * 1000 + stage * 100 + epoch, cfg.batch_by_item)


def step_window(sm: SiteModel, exs: list[Example], stage: int, cfg: TrainConfig, first: int, count: int
                ) -> list[list[Example]]:
    """Batches ``first`` .. ``first + count - 1`` of the stage's stream of epochs (``epoch_batches``): a
    federated round of ``count`` local steps (``TrainConfig.local_steps``) continues where the stage's last
    round stopped, so every example is used once per epoch whatever the steps per round. Every epoch has
    as many batches (the shuffle decides only their order)."""
    out: list[list[Example]] = []
    epoch, k = divmod(first, len(epoch_batches(sm, exs, stage, cfg, 0)))
    while len(out) < count:
        out += epoch_batches(sm, exs, stage, cfg, epoch)[k:k + count - len(out)]
        epoch, k = epoch + 1, 0
    return out


def anchor_of(opt: torch.optim.Optimizer, cfg: TrainConfig) -> list[torch.Tensor] | None:
    """The weights a stage starts from (a federated round: the global), for FedProx's proximal term."""
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]] if cfg.proximal_mu else None


def add_proximal_gradient(trainable: list[torch.Tensor], anchor: list[torch.Tensor] | None, mu: float) -> None:
    """grad += mu * (w - w0): the gradient of FedProx's mu/2 * ||w - w0||^2, added to each trained weight's
    gradient once the data's is in (before the step's clipping of the whole; under DP-SGD after the
    patients' clipping and noise: the term depends on no patient, so it costs no privacy)."""
    for p, a in zip(trainable, anchor or []):
        if p.grad is not None:
            p.grad.add_(p.detach() - a, alpha=mu)


def train_epoch(sm: SiteModel, exs: list[Example], stage: int, cfg: TrainConfig, opt: torch.optim.Optimizer,
                epoch: int, epochs: int, progress: Progress = None, anchor: list[torch.Tensor] | None = None,
                chunks: list[list[Example]] | None = None) -> dict[str, float]:
    """One epoch (or the given ``chunks``: ``step_window``); with ``anchor`` (``anchor_of``) each step also
    pulls the weights toward it (FedProx)."""
    model = sm.model
    model.train()
    totals = {"loss": 0.0, "lm_loss": 0.0, "mse": 0.0}
    steps = 0
    trainable = [p for g in opt.param_groups for p in g["params"]]
    if chunks is None:
        chunks = epoch_batches(sm, exs, stage, cfg, epoch)
    for chunk in chunks:
        out = model(sm.processor.collate(chunk))
        loss = stage_loss(out, stage, cfg, epoch, epochs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        add_proximal_gradient(trainable, anchor, cfg.proximal_mu)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        steps += 1
        totals["loss"] += loss.item()
        totals["lm_loss"] += out["lm_loss"].item()
        totals["mse"] += out["mse"].item() if "mse" in out else 0.0
        prog.advance(progress, len(chunk))
    model.eval()
    return {k: v / max(steps, 1) for k, v in totals.items()} | {"steps": steps}


@dataclass
class PatientDP:
    """DP-SGD settings with the patient as the unit (from the site's policy, ``dp.unit = "patient"``)."""

    clip_norm: float
    noise_multiplier: float
    sample_rate: float                 # Poisson rate of patients per step
    items: tuple[str, ...] | None = None   # the questionnaire's items: a step trains one (dp.step = "item");
                                           # None: a sampled patient gives all its instances ("patient")
    seed: int | None = None            # None: a fresh PrivateRandom key for sampling and noise (tests fix it)
    optimizer: str = "adamw"           # or "adam-bc": DP-AdamBC (mllm_dr/dp_adam.py)

    def expected_per_step(self, patients: int) -> float:
        """Expected patients in a step at a site of ``patients``: what ``private_gradient`` divides the sum by."""
        return self.sample_rate * patients

    def noise_std_on_mean(self, patients: int) -> float:
        """Std of the noise on each number of a step's mean gradient at a site of ``patients``."""
        return self.noise_multiplier * self.clip_norm / self.expected_per_step(patients) if patients else 0.0

    @property
    def steps_per_epoch(self) -> int:
        return dp_sgd_steps(1, self.sample_rate, len(self.items) if self.items else 1)


def by_patient(exs: list[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for ex in exs:
        groups.setdefault(ex.instance.participant, []).append(ex)
    return dict(sorted(groups.items()))


def private_gradient(sm: SiteModel, patients: list[list[Example]], trainable: list[torch.Tensor], loss_of,
                     dp: PatientDP, expected: float, rng: PrivateRandom) -> tuple[list[torch.Tensor], list[float]]:
    """sum over ``patients`` of clip(grad of the patient's loss) + noise, / ``expected``; and the norms
    before clipping. One forward and backward per patient: the patient's gradient exactly. A patient whose
    gradient is not finite gives nothing (``clip_scale``): no clipping bounds it."""
    total = [torch.zeros_like(p) for p in trainable]
    norms = []
    for exs in patients:
        grads = torch.autograd.grad(loss_of(sm.model(sm.processor.collate(exs))), trainable, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, trainable)]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norms.append(norm)
        scale = clip_scale(norm, dp.clip_norm)
        if scale:               # 0: a NaN or infinite gradient, dropped (never multiplied: inf * 0 is NaN)
            for t, g in zip(total, grads):
                t.add_(g, alpha=scale)
    std = dp.noise_multiplier * dp.clip_norm
    noised = [(t + rng.normal(t.shape, t.dtype) * std if std else t) / expected for t in total]
    return noised, norms


def dp_steps(exs: list[Example], dp: PatientDP, rng: PrivateRandom) -> Iterator[list[list[Example]]]:
    """One epoch of DP-SGD steps, ``dp.steps_per_epoch`` of them: per step, what each sampled patient gives.

    Every patient is drawn independently with probability ``sample_rate`` (Poisson sampling: what the
    accountant assumes). With ``dp.items`` the epoch runs 1 / sample_rate passes over the items, each
    pass in a fresh random order; a step gives each sampled patient's instance of its item (a patient
    without that item gives nothing). Nothing about the data decides the steps' number or items.
    """
    patients = list(by_patient(exs).values())
    if not dp.items:
        for _ in range(dp.steps_per_epoch):
            yield [p for p, u in zip(patients, rng.uniform(len(patients))) if u < dp.sample_rate]
        return
    own = [{ex.instance.item: ex for ex in p} for p in patients]
    order: list[str] = []
    for _ in range(dp.steps_per_epoch):
        if not order:
            order = [dp.items[k] for k in rng.permutation(len(dp.items))]
        item = order.pop()
        drawn = [p for p, u in zip(own, rng.uniform(len(own))) if u < dp.sample_rate]
        yield [[p[item]] for p in drawn if item in p]


def dp_train_epoch(sm: SiteModel, exs: list[Example], stage: int, cfg: TrainConfig, opt: torch.optim.Optimizer,
                   epoch: int, epochs: int, dp: PatientDP, rng: PrivateRandom, progress: Progress = None,
                   anchor: list[torch.Tensor] | None = None) -> dict[str, float]:
    """One epoch of patient-level DP-SGD (``dp_steps``)."""
    model, expected = sm.model, dp.expected_per_step(len(by_patient(exs)))
    model.train()
    trainable = [p for g in opt.param_groups for p in g["params"]]
    losses: list[tuple[float, float, float]] = []

    def loss_of(out):
        loss = stage_loss(out, stage, cfg, epoch, epochs)
        losses.append((loss.item(), out["lm_loss"].item(), out["mse"].item() if "mse" in out else 0.0))
        return loss

    norms: list[float] = []
    steps = 0
    for chosen in dp_steps(exs, dp, rng):
        grads, step_norms = private_gradient(sm, chosen, trainable, loss_of, dp, expected, rng)
        norms += step_norms
        for p, g in zip(trainable, grads):
            p.grad = g
        add_proximal_gradient(trainable, anchor, cfg.proximal_mu)
        opt.step()
        steps += 1
        prog.advance(progress, sum(len(g) for g in chosen))
    model.eval()
    mean = [sum(x) / max(len(losses), 1) for x in zip(*losses)] or [0.0, 0.0, 0.0]
    return {"loss": mean[0], "lm_loss": mean[1], "mse": mean[2], "steps": steps, "patients_sampled": len(norms),
            "clipped_share": sum(n > dp.clip_norm for n in norms) / max(len(norms), 1)}


def train_stage(sm: SiteModel, exs: list[Example], stage: int, epochs: int, cfg: TrainConfig,
                progress: Progress = None, first_epoch: int = 0, on_epoch: EpochHook | None = None,
                dp: PatientDP | None = None, window: tuple[int, int] | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> list[dict]:
    """``epochs`` epochs of ``stage`` (from ``first_epoch`` when resuming); returns each epoch's mean losses,
    none when the stage has nothing to train (``stage_trains``).
    With ``dp``: patient-level DP-SGD (the caller accounts its ``epochs x dp.steps_per_epoch`` steps in the site's ledger).
    With ``window`` = (first step, steps): those steps of the stage's stream (``step_window``) as one epoch
    of the history (``epochs`` must be 1; not with ``dp``, whose steps the Poisson sampling decides).
    ``optimizer``: the caller's (``optimizer_for``), which a local run checkpoints with each epoch and restores
    to resume (session 44: a fresh AdamW's moments made a resumed run diverge); None: a fresh one."""
    if window is not None and (dp is not None or epochs != 1):
        raise ValueError("a window of local steps is one round of the plain trainer: not with DP-SGD, "
                         "nor with several epochs")
    if not stage_trains(sm, stage, cfg):
        return []
    opt = optimizer if optimizer is not None else optimizer_for(sm, stage, cfg, dp, len(by_patient(exs)) if dp else 0)
    rng = PrivateRandom(dp.seed) if dp else None         # sampling and noise nobody outside the site can replay
    base_lrs = [g["initial_lr"] for g in opt.param_groups]
    anchor = anchor_of(opt, cfg)
    history = []
    for epoch in range(first_epoch, epochs):
        factor = cosine_factor(epoch, epochs) if cfg.lr_schedule == "cosine" else 1.0
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * factor
        torch.manual_seed(cfg.seed * 1_000_003 + stage * 1_009 + epoch   # dropout: the same epoch, the same masks,
                          + (window[0] * 7_919 if window else 0))
        chunks = step_window(sm, exs, stage, cfg, *window) if window else None
        prog.start(progress, f"stage {stage} epoch {epoch + 1}/{epochs}",   # whatever ran before in the process
                   sum(map(len, chunks)) if chunks else len(exs))
        stats = (dp_train_epoch(sm, exs, stage, cfg, opt, epoch, epochs, dp, rng, progress, anchor) if dp else
                 train_epoch(sm, exs, stage, cfg, opt, epoch, epochs, progress, anchor, chunks))
        history.append({"stage": stage, "epoch": epoch + 1, **stats})
        if on_epoch:
            on_epoch(epoch, stats)
    return history
