"""The schema of a policy file, and how one policy is at least as strict as another.

A site keeps its own policy (``policy.json`` in the workspace, else the default in this
folder); the center publishes the policy a run requires; a site refuses to join a run
whose policy is weaker than its own (``SitePolicy.weaker_than``).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

HERE = Path(__file__).resolve().parent


class _PolicyPart(BaseModel):
    model_config = ConfigDict(extra="forbid")   # a misspelt key ("enable") is an error, never a default


class EgressPolicy(_PolicyPart):
    tensor_patterns: list[str] = Field(description="fnmatch patterns of tensor names a reply may carry")
    metric_names: list[str] = Field(description="fnmatch patterns of metric/config names a reply may carry")
    max_bytes_per_message: int = Field(gt=0)

    def tensor_allowed(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.tensor_patterns)

    def metric_allowed(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.metric_names)


class DPPolicy(_PolicyPart):
    enabled: bool = False
    unit: Literal["site", "patient"] = Field("site", description="what one epsilon protects: a site's whole "
                                             "update per round, or one patient (DP-SGD inside the site's training)")
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(1.0, ge=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    epsilon_budget: float = Field(10.0, gt=0)
    sample_rate: float = Field(0.25, gt=0, le=1, description="unit patient: Poisson rate of patients per step")
    step: Literal["item", "patient"] = Field("item", description="unit patient: what a sampled patient gives "
                                             "a step: the instance of the step's one PHQ item (each step trains "
                                             "one item, like the plain trainer's batches; 8x the steps per epoch; "
                                             "the default: the one measured to keep the CCC, README), or all its "
                                             "item instances")
    optimizer: Literal["adamw", "adam-bc"] = Field("adamw", description="unit patient: the optimizer of the "
                                                   "DP-SGD steps: AdamW, or DP-AdamBC (Adam with the noise's "
                                                   "variance taken out of its second moment; README Trust)")

    def strictest(self, other: "DPPolicy | None") -> "DPPolicy":
        """DP at least as strict as both: on if either is on, the larger noise, the smaller clip,
        budget, delta and sampling rate; the site's unit, step and optimizer. A site never trains with weaker
        DP than its own policy, whatever a run says."""
        if other is None or not other.enabled:
            return self
        if not self.enabled:
            return other
        return DPPolicy(enabled=True, unit=self.unit, step=self.step, optimizer=self.optimizer,
                        clip_norm=min(self.clip_norm, other.clip_norm),
                        noise_multiplier=max(self.noise_multiplier, other.noise_multiplier),
                        delta=min(self.delta, other.delta), epsilon_budget=min(self.epsilon_budget, other.epsilon_budget),
                        sample_rate=min(self.sample_rate, other.sample_rate))


class SecAggPolicy(_PolicyPart):
    RETIRED: ClassVar[tuple[str, ...]] = ("num_shares", "reconstruction_threshold")   # the first kit's (SecAgg+),
    #                                    unused since 36596f0: a policy file copied then still loads

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data):
        return {k: v for k, v in data.items() if k not in cls.RETIRED} if isinstance(data, dict) else data
    enabled: bool = False
    clip_norm: float = Field(100.0, gt=0, description="L2 bound a site enforces on its update before masking "
                             "(the center cannot screen masked updates)")
    min_sites: int = Field(3, ge=2, description="fewest sites in a masked sum (with 2, each learns the other's "
                           "update from the new global)")


class SitePolicy(_PolicyPart):
    version: int = Field(1, ge=1, le=1)
    egress: EgressPolicy
    dp: DPPolicy = DPPolicy()
    secagg: SecAggPolicy = SecAggPolicy()
    min_participants: int = Field(5, ge=1, description="a site with fewer labelled participants does not join")
    min_release_participants: int = Field(1, ge=1, description="fewest participants behind any statistics the "
                                          "site releases (the final evaluation's sufficient statistics, round checks): "
                                          "below it the site sends none (with 1 or 2 test participants the sums give "
                                          "their totals away); 1 = no floor. The run's policy can raise it")
    allowed_base_sha256: list[str] = Field(default_factory=list, description="empty: any base the center names")
    audit_retention_days: int = Field(3650, ge=365)
    require_center_audit_head: bool = Field(False, description="refuse, for the whole run, a center message that "
                                            "carries no signed audit head (every kit center sends one; without it "
                                            "the center's log cannot be held to what this site saw)")

    @model_validator(mode="after")
    def _dp_budget(self):
        if self.dp.enabled and self.dp.noise_multiplier <= 0:
            raise ValueError("dp.noise_multiplier must be > 0 when dp is enabled")
        return self

    def release_floor(self, run: "SitePolicy | None") -> int:
        """Fewest participants behind statistics this site (this policy) may release in a run: its own
        floor, or the run's when that is higher."""
        return max(self.min_release_participants, run.min_release_participants if run is not None else 1)

    def weaker_than(self, mine: "SitePolicy") -> list[str]:
        """Reasons this (the run's) policy is weaker than ``mine`` (the site's); empty = acceptable."""
        why = []
        if mine.dp.enabled:
            if not self.dp.enabled:
                why.append("the site requires differential privacy, the run has it off")
            else:
                if self.dp.noise_multiplier < mine.dp.noise_multiplier:
                    why.append(f"noise multiplier {self.dp.noise_multiplier} < site's {mine.dp.noise_multiplier}")
                if self.dp.clip_norm > mine.dp.clip_norm:
                    why.append(f"clip norm {self.dp.clip_norm} > site's {mine.dp.clip_norm}")
                if self.dp.epsilon_budget > mine.dp.epsilon_budget:
                    why.append(f"epsilon budget {self.dp.epsilon_budget} > site's {mine.dp.epsilon_budget}")
                if self.dp.unit != mine.dp.unit:
                    why.append(f"the site's DP protects each {mine.dp.unit}, the run's each {self.dp.unit}")
        if mine.secagg.enabled:
            if not self.secagg.enabled:
                why.append("the site requires secure aggregation, the run has it off")
            elif self.secagg.min_sites < mine.secagg.min_sites:
                why.append(f"secure aggregation over {self.secagg.min_sites} site(s) < site's {mine.secagg.min_sites}")
        if self.egress.max_bytes_per_message > mine.egress.max_bytes_per_message:
            why.append(f"max bytes per message {self.egress.max_bytes_per_message} > site's "
                       f"{mine.egress.max_bytes_per_message}")
        extra = [p for p in self.egress.tensor_patterns if p not in mine.egress.tensor_patterns]
        if extra:
            why.append(f"tensor patterns the site does not allow: {extra}")
        return why


FEATURE_MOMENTS_UNDER_DP = ("differential privacy is required and feature-norms=federated would send the site's "
                            "training-frame moments (fm-*) without noise")


SITE_NORMS_UNDER_PATIENT_DP = ("patient-level differential privacy is required and feature-norms=site would scale "
                               "every patient's features by the mean/std of all the site's training patients, a "
                               "function of every patient outside the DP-SGD accounting")


SITE_DP_WITH_SECAGG = ("site-level differential privacy with secure aggregation: the site's noise (z x C on every "
                       "number) takes its masked update far past the secure-aggregation clip bound, which would scale "
                       "the update away (a privacy review, session 41); use patient-level DP (dp.unit = patient)")


def join_refusals(site: SitePolicy, run: SitePolicy | None, base_sha256: str, participants: int,
                  feature_norms: str | None = None) -> list[str]:
    """Why a site with policy ``site`` must not join a run with policy ``run`` (empty: it may).
    ``feature_norms``: the run's (mllm_dr/config.py FEATURE_NORMS; None: the message does not say). ``federated`` asks for the site's frame
    moments, which no DP mechanism covers, so neither a site's nor a run's DP allows them; ``site`` scales
    each patient by statistics of all the site's patients, which patient-level DP does not allow."""
    why = run.weaker_than(site) if run else (
        ["the site requires differential privacy, the run has it off"] if site.dp.enabled else []) + (
        ["the site requires secure aggregation, the run has it off"] if site.secagg.enabled else [])
    if site.allowed_base_sha256 and base_sha256 not in site.allowed_base_sha256:
        why.append(f"base model sha256 {base_sha256[:12]}... is not in the site's allowed list")
    if participants < site.min_participants:
        why.append(f"{participants} labelled participant(s), the site's policy requires {site.min_participants}")
    dp = site.dp.strictest(run.dp if run else None)
    if feature_norms == "federated" and dp.enabled:
        why.append(FEATURE_MOMENTS_UNDER_DP)
    if feature_norms == "site" and dp.enabled and dp.unit == "patient":
        why.append(SITE_NORMS_UNDER_PATIENT_DP)
    floor = site.release_floor(run)
    if feature_norms == "federated" and participants < floor:   # session 41: the moments skipped the floor
        why.append(f"feature-norms=federated would send the frame moments of {participants} participant(s), fewer "
                   f"than the release floor of {floor}")
    if dp.enabled and dp.unit == "site" and (site.secagg.enabled or (run is not None and run.secagg.enabled)):
        why.append(SITE_DP_WITH_SECAGG)
    return why


def default_policy_path() -> Path:
    return HERE / "site-default.json"


def load_policy(path: Path | None = None) -> SitePolicy:
    path = Path(path) if path else default_policy_path()
    try:
        return SitePolicy.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as err:
        from mllm_dr.errors import InputError

        raise InputError(f"cannot read policy: {err.strerror}", path) from None
    except UnicodeDecodeError:
        from mllm_dr.errors import InputError

        raise InputError("not a policy: the file is not UTF-8 text (JSON)", path) from None
    except ValidationError as err:
        from mllm_dr.errors import InputError

        raise InputError(f"invalid policy: {invalid_because(err)}", path) from None


def invalid_because(err: ValidationError) -> str:
    """'dp.enable: Extra inputs are not permitted': the first thing wrong in a policy, in one line."""
    from mllm_dr.errors import first_problem

    return first_problem(err)
