"""The run plan: Flower's run config (flat, hyphenated keys) as a validated model.

Defaults come from ``mllm_dr.config`` (the one source); pyproject's ``[tool.flwr.app.config]``
must list the same values (Flower reads run-config keys from there; a test checks they agree).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mllm_dr.config import (ANSWER_ORDERS, DEFAULT_FEATURE_NORMS, DEFAULT_MODEL, DEFAULT_SCORING, DEFAULT_TRAIN,
                            FEATURE_NORMS, PROMPT_LAYOUTS, ModelConfig, model_with)
from mllm_dr.protocol import UPLINK_ENCODINGS
from policies.schema import FEATURE_MOMENTS_UNDER_DP, SITE_DP_WITH_SECAGG, SITE_NORMS_UNDER_PATIENT_DP

_T, _M = DEFAULT_TRAIN, DEFAULT_MODEL

# What a resumed run (`mllmdr-center run --resume`) may set anew: where and how patiently it runs and
# what it reports. Every other key (the policy, aggregation, uplink, schedule, model, seed...) is what the
# run trains and what it promised its sites at the start: it binds until the run ends (``changes_from``).
RESUMABLE = frozenset({"center-dir", "run-name", "resume", "min-sites", "node-timeout", "round-timeout",
                       "evaluate", "round-validation", "eval-max-new-tokens"})


class RunPlan(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    center_dir: str = Field(alias="center-dir")
    run_name: str = Field(alias="run-name", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    base_model: str = Field("smollm2", alias="base-model")
    stage1_rounds: int = Field(1, ge=0, alias="stage1-rounds")
    stage2_rounds: int = Field(1, ge=0, alias="stage2-rounds")
    local_epochs: int = Field(1, ge=1, alias="local-epochs")
    batch_size: int = Field(_T.batch_size, ge=1, alias="batch-size")
    lr_lq: float = Field(_T.lr_lq, gt=0, alias="lr-lq")
    lr_lora: float = Field(_T.lr_lora, gt=0, alias="lr-lora")
    lr_maa: float = Field(_T.lr_maa, gt=0, alias="lr-maa")
    score_weight: float = Field(_T.score_weight, ge=0, alias="score-weight")
    aggregation: str = Field("exact-lora", pattern="^(fedavg|exact-lora|ffa-lora)$")
    server_lr: float = Field(1.0, gt=0, le=10, alias="server-lr")   # FedOpt's server step (mllm_dr/aggregation.py)
    proximal_mu: float = Field(_T.proximal_mu, ge=0, le=10, alias="proximal-mu")   # FedProx at the sites (training.py)
    local_steps: int = Field(_T.local_steps, ge=0, alias="local-steps")   # steps per round instead of epochs (training.py)
    uplink: Literal[UPLINK_ENCODINGS] = "fp32"    # how sites encode training replies (mllm_dr/uplink.py)
    lora_rank: int = Field(_M.lora.r, ge=1, alias="lora-rank")
    max_frames: int = Field(_M.max_frames, ge=8, alias="max-frames")
    answer_order: Literal[ANSWER_ORDERS] = Field(_M.answer_order, alias="answer-order")   # mllm_dr/config.py
    prompt_layout: Literal[PROMPT_LAYOUTS] = Field(_M.prompt_layout, alias="prompt-layout")   # mllm_dr/config.py
    feature_norms: Literal[FEATURE_NORMS] = Field(DEFAULT_FEATURE_NORMS, alias="feature-norms")   # mllm_dr/config.py
    min_sites: int = Field(2, ge=1, alias="min-sites")
    outlier_factor: float = Field(3.0, gt=1, alias="outlier-factor")
    # an absolute bound on one site's update (its distance to the round's global, as the screen measures it);
    # 0 = none. The median screen needs >= 3 updates: in a round of 2 this is the only norm screen
    max_update_norm: float = Field(0.0, ge=0, alias="max-update-norm")
    node_timeout: float = Field(120, gt=0, alias="node-timeout")
    round_timeout: float = Field(1800, gt=0, alias="round-timeout")
    evaluate: bool = True
    round_validation: bool = Field(False, alias="round-validation")   # held-out check of each trained head's global (curves)
    eval_max_new_tokens: int = Field(DEFAULT_SCORING.max_new_tokens, ge=8, alias="eval-max-new-tokens")
    resume: bool = False
    seed: int = 0
    policy: str = Field("", description="the run's required policy (JSON, policies/schema.py); '' = the default")
    feature_recipe: str = Field("", alias="feature-recipe", description="every site's features must follow this "
                                "recipe (mllm_dr/features/recipe.py); '' = the sites' own, same widths required")

    @field_validator("center_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("center-dir must be an absolute path")
        return v

    @field_validator("feature_recipe")
    @classmethod
    def _known_recipe(cls, v: str) -> str:
        """A recipe the kit knows ('' = none): a typo was accepted, recorded, and burned the run's name; every
        site then refused the run (a review, session 44)."""
        from mllm_dr.errors import InputError
        from mllm_dr.features.recipe import get_recipe

        if v:
            try:
                get_recipe(v)
            except InputError as err:
                raise ValueError(err.message) from None
        return v

    @model_validator(mode="after")
    def _uplink_unmasked(self):
        if self.uplink != "fp32" and self.secagg.enabled:
            raise ValueError(f"the run's policy requires secure aggregation, whose masked replies are int64 ring "
                             f"elements that cannot be compressed; use uplink fp32 (not {self.uplink})")
        return self

    @model_validator(mode="after")
    def _local_steps_replace_epochs(self):
        if self.local_steps and self.local_epochs != 1:
            raise ValueError(f"local-steps ({self.local_steps}) replaces local-epochs ({self.local_epochs}): set one")
        if self.local_steps and self.dp.enabled and self.dp.unit == "patient":
            raise ValueError("local-steps cannot be used with patient-level DP, whose steps per epoch the "
                             "Poisson sampling fixes (and the privacy ledger accounts): use local-epochs")
        return self

    @model_validator(mode="after")
    def _feature_norms_under_dp(self):
        if self.feature_norms == "federated" and self.dp.enabled:
            raise ValueError(FEATURE_MOMENTS_UNDER_DP + "; run with --set feature-norms=site (site-level DP) "
                             "or --set feature-norms=participant")
        if self.feature_norms == "site" and self.dp.enabled and self.dp.unit == "patient":
            raise ValueError(SITE_NORMS_UNDER_PATIENT_DP + ("; this run (started before session 39's kit) cannot "
                             "continue: start a new run with --set feature-norms=participant" if self.resume else
                             "; run with --set feature-norms=participant"))
        if self.dp.enabled and self.dp.unit == "site" and self.secagg.enabled:   # every site would refuse it
            raise ValueError(SITE_DP_WITH_SECAGG)
        return self

    @property
    def secagg(self):
        """The run policy's secure-aggregation settings (``enabled``: every training round is masked)."""
        from policies.schema import SecAggPolicy, SitePolicy

        return SitePolicy.model_validate_json(self.policy).secagg if self.policy else SecAggPolicy()

    @property
    def dp(self):
        """The run policy's differential-privacy settings."""
        from policies.schema import DPPolicy, SitePolicy

        return SitePolicy.model_validate_json(self.policy).dp if self.policy else DPPolicy()

    @property
    def total_rounds(self) -> int:
        return self.stage1_rounds + self.stage2_rounds

    def architecture(self) -> ModelConfig:
        """The model every site builds for this run (signed into every global checkpoint)."""
        frozen_a = self.seed if self.aggregation == "ffa-lora" else None   # A drawn from the run's seed (signed)
        return model_with(self.lora_rank, frozen_a, max_frames=self.max_frames, answer_order=self.answer_order,
                          prompt_layout=self.prompt_layout,
                          feature_norm="participant" if self.feature_norms == "participant" else "dataset")

    def to_run_config(self) -> dict:
        return self.model_dump(by_alias=True)

    def changes_from(self, recorded: dict) -> list[str]:
        """The run-config keys outside RESUMABLE whose value differs from ``recorded`` (the plan the run
        started with, ``RunFolder.plan``): what resuming with this plan would change. [] = may resume.
        Keys the record lacks (added by a later kit) count as their defaults, and are compared too: compared
        only where recorded, a resume of an older run could set a newer key (max-update-norm) to anything (a
        review, session 44). Policies compare by meaning, so a policy schema that gained a field with a
        default does not count as a change."""
        from policies.schema import SitePolicy

        def policy(text: str):
            return SitePolicy.model_validate_json(text).model_dump() if text else None

        now, was = self.to_run_config(), with_defaults(recorded)
        return sorted(k for k in set(was) | set(now) if k not in RESUMABLE and (
            policy(now.get(k, "")) != policy(was[k]) if k == "policy" else now.get(k) != was.get(k)))

    def with_recorded_policy(self, recorded: dict | None) -> "RunPlan":
        """This plan with the policy text the run started with when the two mean the same: sites pin the
        policy text's hash, so a resume that re-serialised an equal policy (``--policy FILE`` again, or a
        kit whose policy schema gained a field with a default) would be refused by every site."""
        if not recorded or "policy" not in recorded or self.changes_from(recorded):
            return self
        return self.model_copy(update={"policy": recorded["policy"]})

    @classmethod
    def defaults(cls) -> dict:
        """Every run-config key with its default (what pyproject's [tool.flwr.app.config] must hold)."""
        return {f.alias or n: f.default for n, f in cls.model_fields.items() if n != "center_dir" and n != "run_name"}


def validated_plan(keys: dict, what: str = "invalid run plan", path=None) -> RunPlan:
    """``RunPlan.model_validate(keys)``, or one InputError: ``what``, then the first field and what is wrong
    with it (``path``: the file the keys came from). The one wording for `run`, `simulate` and a recorded plan."""
    from pydantic import ValidationError

    from mllm_dr.errors import InputError, first_problem

    try:
        return RunPlan.model_validate(keys)
    except ValidationError as err:
        raise InputError(f"{what}: {first_problem(err)}", path) from None


def with_defaults(recorded: dict) -> dict:
    """A recorded plan with the keys it lacks (a run of an older kit) at their defaults."""
    return RunPlan.defaults() | recorded


def start_refusal(plan: RunPlan, folder) -> tuple[str, str] | None:
    """Why ``plan`` may not start in ``folder`` (``mllm_dr.run_folder.RunFolder``); None: it may.

    The one rule for the CLI (which refuses before submitting) and the ServerApp (before any site is
    asked), as (kind, message): "taken", a fresh run under the name of a run that started here (its sites
    pinned its policy, its checkpoints are kept); "missing", a resume of a run that never started here (a
    mistyped --name started a new run with the defaults, session 44); "unrecorded", a resume of a run whose
    plan was not recorded (an older kit); "changed", a resume that changes a key outside RESUMABLE;
    "completed", a resume of a run whose final step is done (it re-asked the sites, rewrote the run's sites
    and could mark the finished run failed, session 44)."""
    name = plan.run_name
    if not plan.resume:
        return ("taken", f"run {name} exists (its sites pinned its policy, its checkpoints are kept): resume it "
                         f"with --resume, or give the new run another --name") if folder.started() else None
    recorded = folder.plan()
    if recorded is None:
        if folder.last_checkpoint() is None:
            return ("missing", f"no run {name} to resume (no recorded plan or checkpoint); start it without --resume")
        return ("unrecorded", f"cannot resume {name}: the plan it started with was not recorded (a run of an "
                              f"older kit); start a new run")
    changed = plan.changes_from(recorded)
    if changed:
        return ("changed", _changes_text(plan, recorded, changed))
    if folder.history().get("status") == "completed" and folder.final_step_done(plan.total_rounds, plan.evaluate):
        return ("completed", f"run {name} completed; nothing to resume")
    return None


def refusal_path(kind: str, folder):
    """Where a ``start_refusal`` points: the run's folder (taken), the runs folder (missing), its history
    (completed), else its recorded plan."""
    return {"taken": folder.root, "missing": folder.root.parent, "completed": folder.history_path}.get(
        kind, folder.plan_path)


def _changes_text(plan: RunPlan, recorded: dict, changed: list[str]) -> str:
    """The "changed" refusal: each key with the value the run started with (its default when the record
    lacks it) and the one asked for."""
    now, was = plan.to_run_config(), with_defaults(recorded)
    shown = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" if k != "policy" else "policy (another policy)"
             for k in changed]
    return (f"cannot resume {plan.run_name}: {'; '.join(shown)}. A resumed run keeps the plan it started with "
            f"(its policy, aggregation, schedule, model); leave these options out")
