"""Two-stage training (paper section 3): stage 1 trains the LQ-formers with the LLM
frozen; stage 2 freezes them and trains LoRA (q/v) + MAA with L_lm + L_mse.

The learning rates default to values that move a 135M model on CPU within a few
epochs; the paper's (LLM 1e-5, LQ-former 1e-4, head 1e-4) are one flag away.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from mllm_dr.model import Example, MLlmDR


@dataclass
class TrainConfig:
    stage1_epochs: int = 1
    stage2_epochs: int = 2
    batch_size: int = 4
    lr_lq: float = 1e-3
    lr_lora: float = 5e-4
    lr_maa: float = 1e-3
    grad_clip: float = 1.0
    joint: bool = True                 # False: --no-joint (L_lm only)
    moving_weight: bool = False        # the authors' alpha*L_lm + (1-alpha)*L_mse, alpha = epoch/epochs
    seed: int = 0


def optimizer_for(model: MLlmDR, stage: int, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.set_stage(stage, joint=cfg.joint)
    if stage == 1:
        groups = [{"params": [p for p in model.lq.parameters()], "lr": cfg.lr_lq}]
    else:
        lora = [p for n, p in model.base.named_parameters() if "lora_" in n]
        groups = [{"params": lora, "lr": cfg.lr_lora}]
        if cfg.joint:
            groups.append({"params": list(model.maa.parameters()), "lr": cfg.lr_maa})
    assert sum(len(g["params"]) for g in groups) == len(params), "every trainable parameter must be in the optimizer"
    return torch.optim.AdamW(groups, weight_decay=0.0)


def stage_loss(out: dict[str, torch.Tensor], stage: int, cfg: TrainConfig, epoch: int, epochs: int) -> torch.Tensor:
    if stage == 1 or not cfg.joint or "mse" not in out:
        return out["lm_loss"]
    if cfg.moving_weight:
        alpha = (epoch + 1) / epochs
        return alpha * out["lm_loss"] + (1 - alpha) * out["mse"]
    return out["lm_loss"] + out["mse"]


def train_epoch(model: MLlmDR, exs: list[Example], stage: int, cfg: TrainConfig, opt: torch.optim.Optimizer,
                epoch: int, epochs: int, on_step: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    model.train()
    order = list(range(len(exs)))
    random.Random(cfg.seed * 1000 + stage * 100 + epoch).shuffle(order)
    totals = {"loss": 0.0, "lm_loss": 0.0, "mse": 0.0}
    steps = 0
    trainable = [p for g in opt.param_groups for p in g["params"]]
    for start in range(0, len(order), cfg.batch_size):
        batch = model.collate([exs[i] for i in order[start:start + cfg.batch_size]])
        out = model(batch)
        loss = stage_loss(out, stage, cfg, epoch, epochs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        steps += 1
        totals["loss"] += loss.item()
        totals["lm_loss"] += out["lm_loss"].item()
        totals["mse"] += out["mse"].item() if "mse" in out else 0.0
        if on_step:
            on_step(len(batch.input_ids), {k: v / steps for k, v in totals.items()})
    model.eval()
    return {k: v / max(steps, 1) for k, v in totals.items()}
