"""Federated training as plain functions over tensors (Flower-free; the apps are thin shells).

The global state is the adapter state of ``adapters.get_adapter_state``: ``lq.<modality>.*``
(LQ-formers), ``maa.*`` (regression head) and ``lora.*`` (peft LoRA). The downlink always
carries the whole state; the uplink only what the round's stage trains (stage 1: ``lq.*``;
stage 2: ``lora.*`` + ``maa.*``, without ``lora_A`` when A is frozen: FFA-LoRA), so the
allow-list of a reply is known before it arrives.
Feature normalisation: with the run plan's ``feature-norms = federated`` (the default) each site
sends, at the handshake, the frame count and per-dimension sum and sum of squares of its training
features (never a frame, never a participant's value); the center sums them into one mean/std
(``RunSpec.feature_norms``, signed), the norms pooled data would have. With ``site`` they never
leave a site, and each site normalises with its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mllm_dr.adapters import SiteModel, build_site_model, get_adapter_state, set_adapter_state
from mllm_dr.aggregation import resize_lora
from mllm_dr.base_model import load_base
from mllm_dr.config import ModelConfig, TrainConfig
from mllm_dr.dataset import examples, labelled_training_instances, rationale_sources
from mllm_dr.errors import InputError, ModelMismatchError
from mllm_dr.evaluation import Evaluation, evaluate_split, regression_evaluate
from mllm_dr.features.store import FeatureStore
from mllm_dr.federation_policy import recipe_refusal
from mllm_dr.processor import frame_moments, norm_tensors, norms_from_moments
from mllm_dr.training import PatientDP, cosine_factor, train_stage
from mllm_dr.workspace import Workspace

STAGE_PREFIXES = {1: ("lq.",), 2: ("lora.", "maa.")}
ALL_PREFIXES = ("lq.", "maa.", "lora.")


def trains_in(ctx: dict, stage: int) -> bool:
    """``RunSpec.trains`` of a signed context, before anything else is read from it: stage 1 of a run whose
    feature widths are none trains nothing. A context naming no widths at all is taken to train."""
    dims = ctx.get("dims")
    return stage != 1 or dims is None or bool(dims)


@dataclass
class RunSpec:
    """What the center decides for a run; every site builds the same model from it."""

    run: str
    base_model: str
    base_sha256: str
    dims: dict[str, int]
    config: ModelConfig = field(default_factory=ModelConfig)
    feature_recipe: str = ""          # '' = the sites' own features (same widths required)
    # the run's feature norms, {modality: {"mean": [...], "std": [...]}}; {} = each site its own
    feature_norms: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def context(self, round_: int, stage: int) -> dict:
        """The fields a global checkpoint's signature covers (see ``signing.signed_fields``)."""
        return {"round": round_, "stage": stage, "base_model": self.base_model, "base_sha256": self.base_sha256,
                "run": self.run, "model": self.config.to_dict(), "dims": dict(sorted(self.dims.items())),
                "feature_recipe": self.feature_recipe, "feature_norms": self.feature_norms}

    @classmethod
    def from_context(cls, ctx: dict) -> "RunSpec":
        return cls(ctx["run"], ctx["base_model"], ctx["base_sha256"], dict(ctx["dims"]),
                   ModelConfig.from_dict(ctx["model"]), ctx.get("feature_recipe", ""), ctx.get("feature_norms") or {})

    def trains(self, stage: int) -> bool:
        """Whether ``stage`` of this run trains anything at a site, as the spec tells it before any model is
        built: stage 1 trains the LQ-formers, which a run without audio/visual features (``dims`` {}) has none
        of (``training.stage_trains`` says the same of a built model). Session 44: such a round was charged to
        the DP ledgers for an empty update."""
        return trains_in({"dims": self.dims}, stage)

    def feature_norms_kind(self) -> str:
        """The run plan's ``feature-norms`` (config.FEATURE_NORMS) as this signed spec carries it."""
        if self.config.feature_norm == "participant":
            return "participant"
        return "federated" if self.feature_norms else "site"

    def norms(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {m: (torch.tensor(v["mean"]), torch.tensor(v["std"])) for m, v in self.feature_norms.items()
                if m in self.dims}


MOMENT_SHIFT = 100.0    # a site's frame mean or std this many median-site stds off: not features of this run


def run_feature_norms(parts: list) -> dict[str, dict[str, list[float]]]:
    """The run's feature norms from the sites' frame moments (``processor.Moments``), for ``RunSpec``."""
    return {m: {"mean": mean.tolist(), "std": std.tolist()} for m, (mean, std) in norms_from_moments(parts).items()}


def screen_moments(parts: list, outlier_factor: float) -> tuple[list, dict[int, str]]:
    """The sites' frame moments bounded before they become every site's norms (a review, session 42: one
    site's frame count of 1e12 with large sums set the run's mean to 1e6 and std to 1e9, flattening every
    site's features). With 3 or more sites holding a modality, per modality: a site whose mean or std is
    ``MOMENT_SHIFT`` median-site stds away from the median site's, in any dimension, is named (index ->
    why: the caller leaves it out); a frame count above ``outlier_factor`` x the median count is weighed
    as that bound (its mean and spread kept, its weight capped: a large hospital is not refused). With
    fewer sites nothing is compared (like the update screen); ``protocol.moments_from_record`` has already
    refused sums no real frames give."""
    parts, problems = [dict(p) for p in parts], {}
    for m in sorted({m for part in parts for m in part}):
        held = [i for i, part in enumerate(parts) if m in part and part[m][0] > 1]
        if len(held) < 3:
            continue
        n = torch.tensor([float(parts[i][m][0]) for i in held], dtype=torch.float64)
        means = torch.stack([parts[i][m][1] / parts[i][m][0] for i in held])
        stds = torch.stack([(parts[i][m][2] / parts[i][m][0] - (parts[i][m][1] / parts[i][m][0]) ** 2)
                            .clamp_min(0).sqrt() for i in held])
        mid_mean, mid_std = means.median(0).values, stds.median(0).values
        # near-constant dimensions (dead at most sites) measured on a tenth of the median dimension's spread
        scale = mid_std.clamp_min(0.1 * float(mid_std.median()) + 1e-12)
        for k, i in enumerate(held):
            off = float(torch.maximum((means[k] - mid_mean).abs(), stds[k]).div(scale).max())
            if off > MOMENT_SHIFT:
                problems[i] = f"its {m} feature moments lie {off:.3g} median-site stds from the other sites'"
        cap = outlier_factor * float(n.median())
        for k, i in enumerate(held):
            if n[k] > cap:                             # same mean and spread, the weight of ``cap`` frames
                frames, total, squares = parts[i][m]
                parts[i][m] = (int(cap), total * (int(cap) / frames), squares * (int(cap) / frames))
    return parts, problems


def site_moments(ws: Workspace, insts: list | None = None, floor: int = 1, run: str | None = None):
    """This site's frame moments over its labelled training participants (what ``fit_norms`` reads);
    ``insts``: their instances, when the caller has built them already. ``floor``: the release floor when
    the moments leave the site (``run``'s handshake), which each modality's participants must reach
    (``withhold_moments``)."""
    insts = labelled_training_instances(ws) if insts is None else insts
    if not insts:
        return {}
    exs = examples(ws, insts, 2)
    return withhold_moments(ws, frame_moments(exs, tuple(site_dims(ws))), exs, floor, run)


def withhold_moments(ws: Workspace, moments, exs: list, floor: int, run: str | None):
    """``moments`` less each modality that fewer than ``floor`` of the participants of ``exs`` have, as a
    site without that modality sends: a modality's moments are over the participants who have it, so with
    one of them they were that patient's own frame count, sums and sums of squares (a privacy review,
    session 43). Each one withheld is audited (``feature_moments_withheld``: the modality and its count)."""
    from mllm_dr import audit
    from mllm_dr.processor import participant_frames

    held = {m: len(participant_frames(exs, m)) for m in moments}
    for m, n in held.items():
        if n < floor:
            audit.append(ws.audit_path, "feature_moments_withheld", run=run, modality=m, participants=n,
                         min_release_participants=floor)
    return {m: part for m, part in moments.items() if held[m] >= floor}


def stage_of_round(round_: int, stage1_rounds: int) -> int:
    return 1 if round_ <= stage1_rounds else 2


def checks_global(round_: int, stage1_rounds: int) -> bool:
    """Whether round r's sites check the global they receive (``--round-validation``: the check of
    the global of round r - 1). The check reads the regression head, which only stage-2 rounds train:
    every global before the first stage-2 aggregate holds the head as initialised (the same at every
    site), so checking it tells nothing and cost 22-27 s per site and round in the SmolLM2 demo."""
    return round_ - 1 > stage1_rounds


def stage_round_index(round_: int, stage1_rounds: int) -> int:
    """Round r's place in its stage, from 0."""
    return (round_ - 1) if stage_of_round(round_, stage1_rounds) == 1 else (round_ - stage1_rounds - 1)


def round_lr_factor(round_: int, stage1_rounds: int, stage2_rounds: int) -> float:
    """Cosine decay across the rounds of each stage: the schedule a local run uses across epochs."""
    n = stage1_rounds if stage_of_round(round_, stage1_rounds) == 1 else stage2_rounds
    return cosine_factor(stage_round_index(round_, stage1_rounds), n)


def allowed(name: str, stage: int | None = None, config: ModelConfig | None = None) -> bool:
    """May ``name`` travel up in a reply of ``stage`` (any stage when None) of a run with ``config``?"""
    if config is not None and config.lora.frozen_a and ".lora_A." in name:
        return False         # FFA-LoRA: A never trains, so it never travels up
    return name.startswith(STAGE_PREFIXES[stage] if stage else ALL_PREFIXES)


def initial_state(spec: RunSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """The round-0 global state the center starts from (random LQ/MAA, LoRA with B = 0; with
    FFA-LoRA, A is drawn from the seed in the signed model config, as every site draws it)."""
    base, tok, info = load_base(spec.base_model)
    if info.sha256 != spec.base_sha256:
        raise ModelMismatchError(f"base model {spec.base_model} has sha256 {info.sha256[:12]}..., run expects "
                                 f"{spec.base_sha256[:12]}...")
    sm = build_site_model(base, tok, info, spec.dims, spec.config, seed)
    sm.model.enable_lora()
    return get_adapter_state(sm.model)


def site_dims(ws: Workspace) -> dict[str, int]:
    """The widths this site's features have: the recipe's (a modality no participant has is
    zero-padded) when they were extracted with a fixed recipe, else what the store holds."""
    from mllm_dr.features.extract import store_recipe

    store = FeatureStore(ws.features_dir)
    recipe = store_recipe(store)
    return recipe.dims() if recipe.fixed else {m: d for m, d in store.dims().items() if d}


class SiteSession:
    """One site's model for one message: built from the run spec, checked against local data.

    A site may train LoRA at its own rank (``lora_rank``): the global state is re-expressed at
    that rank on receipt, and the center's exact-LoRA aggregation takes the product back.
    """

    def __init__(self, ws: Workspace, spec: RunSpec, base_override: str | None = None, lora_rank: int | None = None,
                 device: str = "cpu"):
        self.ws, self.spec = ws, spec
        base, tok, info = load_base(base_override or spec.base_model, device)
        if info.sha256 != spec.base_sha256:
            raise ModelMismatchError(f"the run's base model {spec.base_model!r} has sha256 {spec.base_sha256[:12]}..., "
                                     f"this site's copy has {info.sha256[:12]}...; refusing to train")
        refusal = recipe_refusal(ws, spec.feature_recipe)
        if refusal:
            raise InputError(refusal, ws.features_dir)
        local = site_dims(ws)
        if any(local.get(m) != d for m, d in spec.dims.items()):
            raise InputError(f"the run expects feature widths {spec.dims}, this site has {local}", ws.features_dir)
        config = spec.config
        if lora_rank and lora_rank != config.lora.r and config.lora.frozen_a:
            raise ModelMismatchError(f"this site is set to train LoRA at rank {lora_rank}, but the run shares one "
                                     f"frozen A of rank {config.lora.r} (ffa-lora): remove --lora-rank")
        if lora_rank and lora_rank != config.lora.r:
            config = ModelConfig.from_dict(config.to_dict() | {"lora": vars(config.lora.at_rank(lora_rank))})
        self.sm: SiteModel = build_site_model(base, tok, info, spec.dims, config).to(device)
        self.sm.model.enable_lora()
        self._train_exs: dict[int, list] = {}

    @property
    def config(self) -> ModelConfig:
        return self.sm.model.config

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        own, glob = self.config.lora, self.spec.config.lora
        if own.r != glob.r:
            state = resize_lora(state, own.r, glob.scaling, own.scaling)
        set_adapter_state(self.sm.model, state)

    def training_examples(self, stage: int) -> list:
        """The site's labelled train/dev examples, features loaded once; the feature norms set (``use_norms``)."""
        exs = self._examples(stage)
        self.use_norms(exs)
        return exs

    def _examples(self, stage: int) -> list:
        """The stage's examples, built once per session (every round trains on them); the stage-2 ones with
        how their answers were made (``rationale_sources``), counted then, from the same instances."""
        if stage not in self._train_exs:
            insts = labelled_training_instances(self.ws)
            if not insts:
                raise InputError("no labelled training participants (train/dev split)", self.ws.root)
            exs = examples(self.ws, insts, stage)
            if stage == 2:
                self._sources = rationale_sources(self.ws, insts, self.sm.processor)
            self._train_exs[stage] = exs
        return self._train_exs[stage]

    def rationale_sources(self) -> dict[str, int]:
        """How this site's stage-2 answers are made (teacher / extractive / over-long replaced), as
        ``train --local`` reports it (``dataset.rationale_sources``); the train handler keeps it in the
        round's audit entry, on site. Counted once, when the stage-2 examples were built (``_examples``): the
        answers every round of this session trains on, whatever 'rationales' wrote since (session 46: read
        again each round, it could misreport them, and a line written since that does not parse made a round
        already trained a site error)."""
        self._examples(2)
        return dict(self._sources)

    def use_norms(self, exs: list | None = None) -> None:
        """The feature norms this session trains and scores with: the run's (``RunSpec.feature_norms``),
        none where each participant is scaled by their own frames, else fit on the site's labelled training
        examples (``exs``, else the stage-2 ones). Only that last case reads training features: a round check
        or the final evaluation loaded every training participant's features to set the run's norms (session 43)."""
        if self.spec.feature_norms:
            self.sm.processor.norms = self.spec.norms()
        elif self.config.feature_norm == "participant":
            self.sm.processor.norms = {}
        else:
            self.sm.processor.fit_norms(self._examples(2) if exs is None else exs)

    def train_round(self, stage: int, epochs: int, cfg: TrainConfig, progress=None, dp: PatientDP | None = None,
                    first_step: int = 0) -> tuple[dict, int, dict]:
        """Local epochs of ``stage`` (patient-level DP-SGD with ``dp``), or ``cfg.local_steps`` steps from
        ``first_step`` of the stage's stream; returns (update tensors for the stage, examples, the last
        epoch's losses with the round's optimizer steps, all epochs together). A stage with nothing to train
        (``training.stage_trains``: stage 1 of a run without audio/visual features) returns an empty update
        and no losses (session 44: it raised)."""
        exs = self.training_examples(stage)
        if cfg.local_steps and dp is not None:
            raise InputError("the run asks for local-steps, but this site's policy requires patient-level DP, "
                             "whose steps the Poisson sampling fixes: refusing to train", self.ws.root)
        window = (first_step, cfg.local_steps) if cfg.local_steps else None
        history = train_stage(self.sm, exs, stage, 1 if window else epochs, cfg, progress, dp=dp, window=window)
        update = {n: t for n, t in get_adapter_state(self.sm.model).items() if allowed(n, stage, self.config)}
        return update, len(exs), (history[-1] | {"steps": sum(h["steps"] for h in history)}) if history else {}

    def validate(self, split: str = "test") -> Evaluation:
        """The cheap held-out check (regression head, no generation) for learning curves."""
        self.use_norms()
        return regression_evaluate(self.ws, self.sm, split)

    def evaluate(self, split: str, max_new_tokens: int) -> Evaluation:
        """The site's evaluation of the global adapters (only its sufficient statistics are sent)."""
        self.use_norms()
        self.sm.model.eval()
        return evaluate_split(self.ws, self.sm, split, max_new_tokens)


def federated_dir(ws: Workspace) -> Path:
    return ws.checkpoints_dir / "federated"


def final_site_files(ws: Workspace, spec: RunSpec) -> dict[str, dict[str, torch.Tensor] | str]:
    """What this site keeps beside a run's final global (``federated/latest``) to score as it was
    evaluated: the participants it trained on (``TRAINED_ON``: 'was this patient in the training data?'
    is answered from it, not from the split as it is when scoring), and in a run normalising features
    per site, the site's norms of that moment (``NORMS``; refit at every `score`, they followed whatever
    the labelled data had become since, and every training participant's features were loaded to do it;
    a scoring review, session 42)."""
    from mllm_dr.adapters import NORMS, TRAINED_ON, participant_keys

    insts = labelled_training_instances(ws)
    files: dict[str, dict[str, torch.Tensor] | str] = {TRAINED_ON: json.dumps({
        "participants": participant_keys(i.participant for i in insts),
        "feature_columns": FeatureStore(ws.features_dir).feature_columns()})}
    if spec.feature_norms_kind() == "site" and insts:
        norms = norms_from_moments([site_moments(ws, insts)])
        files |= {NORMS: norm_tensors(norms)} if norms else {}
    return files


def load_federated(ws: Workspace, base_override: str | None = None, device: str = "cpu") -> SiteModel:
    """The last global adapters this site received, verified again (signature, base hash) before use,
    with the run's feature norms (or, in a run without them, the site's own kept beside them)."""
    from safetensors.torch import load_file

    from mllm_dr.adapters import NORMS, TRAINED_ON, check_feature_columns
    from mllm_dr.atomic import settled
    from mllm_dr.enrollment import federation_settings
    from mllm_dr.signing import load_public, read_checkpoint

    folder = settled(federated_dir(ws) / "latest")
    if not folder.is_dir():
        raise InputError("no federated adapters yet; take part in a run ('mllmdr-site train --federated')", folder)
    fed = federation_settings(ws)
    state, meta = read_checkpoint(folder, load_public(fed.center_public_key))
    spec = RunSpec.from_context(meta)
    trained_on = None
    if (folder / TRAINED_ON).is_file():           # kept by this site beside the global (none before session 42)
        try:
            kept = json.loads((folder / TRAINED_ON).read_text())
            trained_on, columns = list(kept["participants"]), dict(kept["feature_columns"])
        except (ValueError, TypeError, KeyError):
            raise InputError("not a record of the participants and feature columns trained on (damaged): take part "
                             "in a run again", folder / TRAINED_ON) from None
        check_feature_columns(columns, ws.features_dir)          # before any model loads
    session = SiteSession(ws, spec, base_override, device=device)
    session.load_global(state)
    if spec.feature_norms:
        session.sm.processor.norms = spec.norms()
    elif (folder / NORMS).is_file():
        session.sm.processor.load_norm_tensors(load_file(str(folder / NORMS)))
    elif spec.feature_norms_kind() == "site":      # kept by a kit before session 42: today's data's norms
        session.use_norms()
    session.sm.model.eval()
    session.sm.meta = {"version": f"{spec.run}/round-{meta['round']}", **meta}
    if trained_on is not None:
        session.sm.meta["trained_on"] = trained_on
    return session.sm
