"""The run plan: Flower's run config (flat, hyphenated keys from pyproject.toml) as a model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RunPlan(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    center_dir: str = Field(alias="center-dir")
    run_name: str = Field(alias="run-name", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    base_model: str = Field("smollm2", alias="base-model")
    stage1_rounds: int = Field(1, ge=0, alias="stage1-rounds")
    stage2_rounds: int = Field(1, ge=0, alias="stage2-rounds")
    local_epochs: int = Field(1, ge=1, alias="local-epochs")
    batch_size: int = Field(4, ge=1, alias="batch-size")
    lr_lq: float = Field(1e-3, gt=0, alias="lr-lq")
    lr_lora: float = Field(5e-4, gt=0, alias="lr-lora")
    lr_maa: float = Field(1e-3, gt=0, alias="lr-maa")
    aggregation: str = Field("exact-lora", pattern="^(fedavg|exact-lora)$")
    lora_rank: int = Field(16, ge=1, alias="lora-rank")
    max_frames: int = Field(256, ge=8, alias="max-frames")
    min_sites: int = Field(2, ge=1, alias="min-sites")
    outlier_factor: float = Field(3.0, gt=1, alias="outlier-factor")
    node_timeout: float = Field(120, gt=0, alias="node-timeout")
    round_timeout: float = Field(1800, gt=0, alias="round-timeout")
    evaluate: bool = True
    eval_max_new_tokens: int = Field(60, ge=8, alias="eval-max-new-tokens")
    resume: bool = False
    seed: int = 0
    policy: str = Field("", description="the run's required policy (JSON, policies/schema.py); '' = the default")

    @field_validator("center_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("center-dir must be an absolute path")
        return v

    @property
    def total_rounds(self) -> int:
        return self.stage1_rounds + self.stage2_rounds

    def to_run_config(self) -> dict:
        return self.model_dump(by_alias=True)
