"""Two-stage training (paper section 3): stage 1 trains the LQ-formers with the LLM frozen;
stage 2 freezes them and trains LoRA (q/v) + MAA with L_lm + L_mse.

``train_stage`` is the one trainer: the local run (local_run.py) and a federated round
(federated.py) both call it, so they cannot drift apart.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from mllm_dr import progress as prog
from mllm_dr.adapters import SiteModel
from mllm_dr.config import TrainConfig
from mllm_dr.processor import Example
from mllm_dr.progress import Progress

EpochHook = Callable[[int, dict], None]   # (epoch index, mean losses) after each epoch


def optimizer_for(sm: SiteModel, stage: int, cfg: TrainConfig) -> torch.optim.Optimizer:
    lr = {"lq": cfg.lr_lq, "lora": cfg.lr_lora, "maa": cfg.lr_maa}
    groups = sm.model.stage_parameters(stage, joint=cfg.joint)
    return torch.optim.AdamW([{"params": ps, "lr": lr[g]} for g, ps in groups.items()], weight_decay=0.0)


def stage_loss(out: dict[str, torch.Tensor], stage: int, cfg: TrainConfig, epoch: int, epochs: int) -> torch.Tensor:
    if stage == 1 or not cfg.joint or "mse" not in out:
        return out["lm_loss"]
    if cfg.moving_weight:
        alpha = (epoch + 1) / epochs
        return alpha * out["lm_loss"] + (1 - alpha) * out["mse"]
    return out["lm_loss"] + out["mse"]


def train_epoch(sm: SiteModel, exs: list[Example], stage: int, cfg: TrainConfig, opt: torch.optim.Optimizer,
                epoch: int, epochs: int, progress: Progress = None) -> dict[str, float]:
    model = sm.model
    model.train()
    order = list(range(len(exs)))
    random.Random(cfg.seed * 1000 + stage * 100 + epoch).shuffle(order)
    totals = {"loss": 0.0, "lm_loss": 0.0, "mse": 0.0}
    steps = 0
    trainable = [p for g in opt.param_groups for p in g["params"]]
    for start in range(0, len(order), cfg.batch_size):
        chunk = [exs[i] for i in order[start:start + cfg.batch_size]]
        out = model(sm.processor.collate(chunk))
        loss = stage_loss(out, stage, cfg, epoch, epochs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        steps += 1
        totals["loss"] += loss.item()
        totals["lm_loss"] += out["lm_loss"].item()
        totals["mse"] += out["mse"].item() if "mse" in out else 0.0
        prog.advance(progress, len(chunk))
    model.eval()
    return {k: v / max(steps, 1) for k, v in totals.items()}


def train_stage(sm: SiteModel, exs: list[Example], stage: int, epochs: int, cfg: TrainConfig,
                progress: Progress = None, first_epoch: int = 0, on_epoch: EpochHook | None = None) -> list[dict]:
    """``epochs`` epochs of ``stage`` (from ``first_epoch`` when resuming); returns each epoch's mean losses."""
    opt = optimizer_for(sm, stage, cfg)
    history = []
    for epoch in range(first_epoch, epochs):
        prog.start(progress, f"stage {stage} epoch {epoch + 1}/{epochs}", len(exs))
        stats = train_epoch(sm, exs, stage, cfg, opt, epoch, epochs, progress)
        history.append({"stage": stage, "epoch": epoch + 1, **stats})
        if on_epoch:
            on_epoch(epoch, stats)
    return history
