"""Every default of the method in one place: the model (LQ-former, MAA, LoRA), training, scoring.

The run plan (fl_server/plan.py), the CLI options and pyproject's ``[tool.flwr.app.config]``
take their defaults from here (a test checks pyproject against the plan). A run's
``ModelConfig`` is part of the signed run spec, so every width that shapes an adapter
tensor is covered by the center's signature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

MODALITIES = ("audio", "visual")
ANSWER_ORDERS = ("result-first", "reason-first")
PROMPT_LAYOUTS = ("instruction-first", "dialogue-first")
# Feature normalisation in a federated run: "federated" = mean/std over every site's training frames
# (the center sums the sites' frame moments at the handshake: the pooled data's norms, exactly);
# "site" = each site its own (nothing of the features leaves a site, but a site's level is normalised away);
# "participant" = each participant's frames by their own mean/std: nothing depends on another patient, which
# patient-level DP needs (site norms are a function of every patient, outside the DP-SGD accounting)
FEATURE_NORMS = ("federated", "site", "participant")
DEFAULT_FEATURE_NORMS = "federated"
LEGACY_ANSWER_ORDER = "result-first"   # what a stored config written before answer_order existed was trained on
LEGACY_PROMPT_LAYOUT = "instruction-first"   # the same for prompt_layout
# Whose frames scale a participant's features at model input (ModelConfig.feature_norm): "dataset" = the
# training data's mean/std (the site's or the run's, Processor.norms); "participant" = the participant's own
FEATURE_NORM_SCOPES = ("dataset", "participant")


@dataclass
class LQFormerConfig:
    """One LQ-former per modality (paper section 3.2); the input width comes from the data."""

    n_queries: int = 32
    n_layers: int = 4
    n_heads: int = 8
    ff_dim: int = 1024
    dropout: float = 0.3
    proj_hidden: int = 1024          # the two-layer projection into the LLM's embedding width


@dataclass
class MAAConfig:
    """Multi-head attention aggregation (paper Eq. 3): the regression head."""

    n_heads: int = 8
    fc_hidden: int = 1024


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    # FFA-LoRA (arXiv 2403.12313): A is drawn from this seed, identical at every site and never
    # trained, so only B trains and averaging B is the exact average of the updates B @ A
    frozen_a_seed: int | None = None

    @property
    def frozen_a(self) -> bool:
        return self.frozen_a_seed is not None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def at_rank(self, r: int) -> "LoRAConfig":
        """The same adapter at another rank (a site may train at its own rank; same scaling)."""
        return LoRAConfig(r=r, alpha=max(1, round(self.scaling * r)), dropout=self.dropout, targets=self.targets,
                          frozen_a_seed=self.frozen_a_seed)


@dataclass
class ModelConfig:
    use_audio: bool = True
    use_visual: bool = True
    max_frames: int = 256            # longer feature sequences are average-pooled to this at model input
    lq: LQFormerConfig = field(default_factory=LQFormerConfig)
    maa: MAAConfig = field(default_factory=MAAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # "reason-first" (the default): the reason, with its quote of the evidence, before the score, so the
    # score token reads the quote (README: every arm of bench.federation learns the items only this way);
    # "result-first": the paper's Table 1 order, "Evaluation Result: N / Evaluation Reason: ..."
    answer_order: str = "reason-first"
    # "instruction-first": the paper's Table 1 prompt, the item's instruction before media and dialogue;
    # "dialogue-first": media and dialogue first, the item's instruction last, so the 8 items of one
    # participant share everything but the last sentence: training batches then hold one participant
    # and the model computes the shared part once per batch (training.batches, processor.shared_prefix)
    prompt_layout: str = "instruction-first"
    # FEATURE_NORM_SCOPES; written into a config (and so into a signature) only when not "dataset", so the
    # configs and signed checkpoints of earlier runs stay byte for byte what they were
    feature_norm: str = "dataset"

    def __post_init__(self):
        if self.answer_order not in ANSWER_ORDERS:
            raise ValueError(f"answer_order must be one of {', '.join(ANSWER_ORDERS)}, not {self.answer_order!r}")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"prompt_layout must be one of {', '.join(PROMPT_LAYOUTS)}, not {self.prompt_layout!r}")
        if self.feature_norm not in FEATURE_NORM_SCOPES:
            raise ValueError(f"feature_norm must be one of {', '.join(FEATURE_NORM_SCOPES)}, not {self.feature_norm!r}")

    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, f"use_{m}"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        if d["feature_norm"] == "dataset":
            del d["feature_norm"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Strict: an unknown field (a config from another version) is an error, not ignored. A config
        stored before ``answer_order`` (``prompt_layout``) existed was trained result-first
        (instruction-first) and is read so."""
        d = dict(d)
        d.setdefault("answer_order", LEGACY_ANSWER_ORDER)
        d.setdefault("prompt_layout", LEGACY_PROMPT_LAYOUT)
        sub = {"lq": LQFormerConfig, "maa": MAAConfig, "lora": LoRAConfig}
        for name, kind in sub.items():
            part = dict(d.get(name, {}))
            if name == "lora" and "targets" in part:
                part["targets"] = tuple(part["targets"])
            known = {f.name for f in fields(kind)}
            if set(part) - known:
                raise ValueError(f"unknown {name} option(s) {sorted(set(part) - known)}")
            d[name] = kind(**part)
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown model option(s) {sorted(set(d) - known)}")
        return cls(**d)


@dataclass
class TrainConfig:
    """Two-stage training (paper section 3). The learning rates move a 135M model on CPU within a
    few epochs; the paper's (LLM 1e-5, LQ-former 1e-4, head 1e-4) are one option away."""

    stage1_epochs: int = 1
    stage2_epochs: int = 2
    batch_size: int = 4
    lr_lq: float = 1e-3
    lr_lora: float = 5e-4
    lr_maa: float = 1e-3
    grad_clip: float = 1.0
    joint: bool = True                 # False: --no-joint (L_lm only)
    moving_weight: bool = False        # alpha*L_lm + (1-alpha)*L_mse, alpha = (epoch+1)/(epochs+1)
                                       # (training.moving_alpha; not in the paper, whose Eq. 2 is L_lm + L_mse)
    lr_schedule: str = "cosine"        # across the epochs of a stage, as across the rounds of a federated stage
    score_weight: float = 0.0          # extra weight on the answer's score token (0 = the paper's plain L_lm)
    batch_by_item: bool = True         # one item (dialogue-first: one participant) per batch: the shared
                                       # prompt start is computed once per batch (training.batches)
    # FedProx (Li et al., MLSys 2020): + mu/2 * ||w - w0||^2 over the trained weights, w0 the weights the
    # stage started from (in a federated round: the global); 0 = off. Only the sites' rounds set it
    proximal_mu: float = 0.0
    # a federated round's optimizer steps at each site (0: ``local-epochs`` whole epochs). The steps are a
    # window of the stage's stream of epochs (training.step_window), so rounds of half an epoch average
    # the sites twice per epoch at the same epochs. Only the sites' rounds set it
    local_steps: int = 0
    seed: int = 0


@dataclass
class ScoringConfig:
    max_new_tokens: int = 64           # an answer is ~40 tokens; generation stops at EOS
    verbatim_quotes: bool = True       # a rationale may quote only the item's evidence turn (quotes.py)


DEFAULT_MODEL = ModelConfig()
DEFAULT_TRAIN = TrainConfig()
DEFAULT_SCORING = ScoringConfig()


def model_with(lora_rank: int, frozen_a_seed: int | None = None, **fields) -> ModelConfig:
    """The default model with LoRA at ``lora_rank`` (A drawn from ``frozen_a_seed`` and frozen: FFA-LoRA)
    and ``fields`` replaced: how the run plan (``RunPlan.architecture``) and the benchmarks build theirs."""
    if "lora" in fields:
        raise TypeError("model_with: give the LoRA rank and frozen A's seed, not lora=")
    lora = DEFAULT_MODEL.lora.at_rank(lora_rank)
    lora.frozen_a_seed = frozen_a_seed
    return ModelConfig.from_dict(DEFAULT_MODEL.to_dict() | {"lora": vars(lora), **fields})
