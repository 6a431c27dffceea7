"""Federated training as plain functions over tensors (Flower-free; the apps are thin shells).

The global state is one flat dict of adapter tensors, named by what they belong to:
``lq.<modality>.*`` (LQ-formers), ``maa.*`` (regression head) and ``lora.*`` (peft LoRA).
The downlink always carries the whole state; the uplink carries only what the round's
stage trains (stage 1: ``lq.*``; stage 2: ``lora.*`` + ``maa.*``), so the allow-list of a
reply is known before it arrives. Feature normalisation statistics never leave a site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mllm_dr.adapters import module_state
from mllm_dr.aggregation import resize_lora
from mllm_dr.base_model import load_base
from mllm_dr.dataset import examples, feature_norms, instances_by_split
from mllm_dr.errors import InputError, ModelMismatchError
from mllm_dr.features.store import FeatureStore
from mllm_dr.metrics import SufficientStats
from mllm_dr.model import MLlmDR, ModelOptions
from mllm_dr.training import TrainConfig, optimizer_for, train_epoch
from mllm_dr.workspace import Workspace

STAGE_PREFIXES = {1: ("lq.",), 2: ("lora.", "maa.")}
ALL_PREFIXES = ("lq.", "maa.", "lora.")


@dataclass
class RunSpec:
    """What the center decides for a run; every site builds the same model from it."""

    run: str
    base_model: str
    base_sha256: str
    dims: dict[str, int]
    options: ModelOptions = field(default_factory=ModelOptions)

    def context(self, round_: int, stage: int) -> dict:
        """The fields a global checkpoint's signature covers (see ``signing.SIGNED_FIELDS``)."""
        return {"round": round_, "stage": stage, "base_model": self.base_model, "base_sha256": self.base_sha256,
                "run": self.run, "options": self.options.to_dict(), "dims": dict(sorted(self.dims.items()))}

    @classmethod
    def from_context(cls, ctx: dict) -> "RunSpec":
        opts = dict(ctx["options"])
        opts["lora_targets"] = tuple(opts["lora_targets"])
        return cls(ctx["run"], ctx["base_model"], ctx["base_sha256"], dict(ctx["dims"]), ModelOptions(**opts))


def stage_of_round(round_: int, stage1_rounds: int) -> int:
    return 1 if round_ <= stage1_rounds else 2


def round_lr_factor(round_: int, stage1_rounds: int, stage2_rounds: int, floor: float = 0.1) -> float:
    """Cosine decay across the rounds of each stage (FlowerTune style), from 1 down to ``floor``."""
    stage = stage_of_round(round_, stage1_rounds)
    n = stage1_rounds if stage == 1 else stage2_rounds
    k = (round_ - 1) if stage == 1 else (round_ - stage1_rounds - 1)
    if n <= 1:
        return 1.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * k / (n - 1)))


def allowed(name: str, stage: int | None = None) -> bool:
    return name.startswith(STAGE_PREFIXES[stage] if stage else ALL_PREFIXES)


# ----------------------------------------------------------------------------- model <-> state
def global_state(model: MLlmDR) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = module_state(model)
    state |= {f"lora.{k}": v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model.base).items()}
    return state


def apply_state(model: MLlmDR, state: dict[str, torch.Tensor]) -> None:
    """Load the given tensors into the model; names it does not have are an error."""
    from peft import set_peft_model_state_dict

    own = global_state(model)
    unknown = [n for n in state if n not in own]
    if unknown:
        raise ModelMismatchError(f"global state has tensors this model lacks: {unknown[:3]}")
    bad = [n for n in state if state[n].shape != own[n].shape]
    if bad:
        raise ModelMismatchError(f"shape mismatch for {bad[0]}: global {tuple(state[bad[0]].shape)} vs "
                                 f"local {tuple(own[bad[0]].shape)}")
    with torch.no_grad():
        named = dict(model.lq.named_parameters(prefix="lq")) | dict(model.maa.named_parameters(prefix="maa"))
        for n, t in state.items():
            if n in named:
                named[n].copy_(t)
    lora = {n[5:]: t for n, t in state.items() if n.startswith("lora.")}
    if lora:
        set_peft_model_state_dict(model.base, lora)


def build_model(spec: RunSpec, base, tok, hidden_size: int, seed: int = 0) -> MLlmDR:
    torch.manual_seed(seed)
    model = MLlmDR(base, tok, hidden_size, spec.dims, spec.options)
    model.enable_lora()
    return model


def initial_state(spec: RunSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """The round-0 global state the center starts from (random LQ/MAA, LoRA with B = 0)."""
    base, tok, info = load_base(spec.base_model)
    if info.sha256 != spec.base_sha256:
        raise ModelMismatchError(f"base model {spec.base_model} has sha256 {info.sha256[:12]}..., run expects "
                                 f"{spec.base_sha256[:12]}...")
    return global_state(build_model(spec, base, tok, info.hidden_size, seed))


def lora_scaling(opts: ModelOptions) -> float:
    return opts.lora_alpha / opts.lora_r


# ----------------------------------------------------------------------------- the site's side
def site_dims(ws: Workspace) -> dict[str, int]:
    return {m: d for m, d in FeatureStore(ws.features_dir).dims().items() if d}


class SiteSession:
    """One site's model for one message: built from the run spec, checked against local data."""

    def __init__(self, ws: Workspace, spec: RunSpec, base_override: str | None = None, lora_rank: int | None = None,
                 device: str = "cpu"):
        self.ws, self.spec, self.device = ws, spec, device
        base, tok, info = load_base(base_override or spec.base_model, device)
        if info.sha256 != spec.base_sha256:
            raise ModelMismatchError(f"the run's base model {spec.base_model!r} has sha256 {spec.base_sha256[:12]}..., "
                                     f"this site's copy has {info.sha256[:12]}...; refusing to train")
        local = site_dims(ws)
        missing = {m: d for m, d in spec.dims.items() if local.get(m) != d}
        if missing:
            raise InputError(f"the run expects feature widths {spec.dims}, this site has {local}", ws.features_dir)
        self.info = info
        self.global_rank = spec.options.lora_r
        opts = spec.options
        if lora_rank and lora_rank != opts.lora_r:   # this site trains LoRA at its own rank
            opts = ModelOptions(**{**opts.to_dict(), "lora_targets": opts.lora_targets, "lora_r": lora_rank,
                                   "lora_alpha": lora_rank * opts.lora_alpha // opts.lora_r})
        self.opts = opts
        self.model = build_model(RunSpec(spec.run, spec.base_model, spec.base_sha256, spec.dims, opts), base, tok,
                                 info.hidden_size)
        self.model.to(device)
        self._train_insts = None

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        if self.opts.lora_r != self.global_rank:
            state = resize_lora(state, self.opts.lora_r, lora_scaling(self.spec.options), lora_scaling(self.opts))
        apply_state(self.model, state)

    def train_instances(self):
        if self._train_insts is None:
            insts = [i for i in instances_by_split(self.ws, ("train", "dev")) if i.label is not None]
            if not insts:
                raise InputError("no labelled training participants (train/dev split)", self.ws.root)
            self._train_insts = insts
        return self._train_insts

    def set_norms(self) -> None:
        """Site-local feature standardisation from the site's own training frames."""
        exs = examples(self.ws, self.train_instances(), 1)
        self.model.norms = feature_norms(exs, self.model.dims)

    def train_round(self, stage: int, epochs: int, cfg: TrainConfig, progress=None) -> tuple[dict, int, dict]:
        """Local epochs of ``stage``; returns (update tensors for the stage, examples, loss stats)."""
        self.set_norms()
        exs = examples(self.ws, self.train_instances(), stage)
        opt = optimizer_for(self.model, stage, cfg)
        stats = {}
        for epoch in range(epochs):
            stats = train_epoch(self.model, exs, stage, cfg, opt, epoch, epochs, progress)
        update = {n: t for n, t in global_state(self.model).items() if allowed(n, stage)}
        return update, len(exs), stats

    def evaluate(self, split: str = "test", max_new_tokens: int = 60) -> tuple[SufficientStats, int, int, list[dict]]:
        """Sufficient statistics on the site's ``split`` totals, format violations, items, and the
        per-participant rows (which stay on site: only the statistics are sent)."""
        from mllm_dr.corpus.labels import effective_split
        from mllm_dr.dataset import load_corpus
        from mllm_dr.scoring import score_examples

        self.set_norms()
        self.model.eval()
        corpus = load_corpus(self.ws)
        people = [p for p in corpus.participants if effective_split(p.id, p.split) == split and p.total is not None]
        stats, violations, items, rows = SufficientStats(), 0, 0, []
        insts = instances_by_split(self.ws, (split,))
        for p in people:
            exs = examples(self.ws, [i for i in insts if i.participant == p.id], 2, with_answers=False)
            scored = score_examples(self.model, exs, max_new_tokens)
            violations += sum(s.source == "regression" for s in scored)
            items += len(scored)
            total = sum(s.score for s in scored)
            stats.add(p.total, total)
            rows.append({"participant": p.id, "true": p.total, "pred": total,
                         "regression_total": round(sum(s.regression_score for s in scored), 2)})
        return stats, violations, items, rows


def federated_dir(ws: Workspace) -> Path:
    return ws.checkpoints_dir / "federated"


def load_federated(ws: Workspace, base_override: str | None = None, device: str = "cpu"):
    """The last global adapters this site received, verified again (signature, base hash) before use.

    Returns (model, base info, meta) like ``local_run.load_trained``, with this site's own
    feature normalisation.
    """
    from mllm_dr.enrollment import federation_settings
    from mllm_dr.signing import load_public, read_checkpoint

    folder = federated_dir(ws) / "latest"
    if not folder.is_dir():
        raise InputError("no federated adapters yet; take part in a run ('mllmdr-site train --federated')", folder)
    fed = federation_settings(ws)
    state, meta = read_checkpoint(folder, load_public(fed.center_public_key))
    spec = RunSpec.from_context(meta)
    session = SiteSession(ws, spec, base_override, device=device)
    session.load_global(state)
    session.set_norms()
    session.model.eval()
    return session.model, session.info, {"version": f"{spec.run}/round-{meta['round']}", **meta}
