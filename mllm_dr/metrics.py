"""Metrics on participant totals: CCC (population moments, as AVEC 2019), RMSE, MAE, P/R/F1.

Everything is computed from sufficient statistics, so a federation can pool sites exactly
without any per-patient value leaving a site.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mllm_dr.phq import BINARY_CUTOFF


@dataclass
class SufficientStats:
    n: int = 0
    sx: float = 0.0    # sum of true totals
    sy: float = 0.0    # sum of predicted totals
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0
    sae: float = 0.0   # sum of absolute errors
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, true: float, pred: float) -> None:
        self.n += 1
        self.sx += true
        self.sy += pred
        self.sxx += true * true
        self.syy += pred * pred
        self.sxy += true * pred
        self.sae += abs(true - pred)
        t, p = true >= BINARY_CUTOFF, pred >= BINARY_CUTOFF
        self.tp += t and p
        self.fp += (not t) and p
        self.fn += t and not p
        self.tn += (not t) and not p

    def merge(self, other: "SufficientStats") -> "SufficientStats":
        return SufficientStats(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def to_dict(self) -> dict:
        return asdict(self)


def compute(stats: SufficientStats) -> dict[str, float | int]:
    n = stats.n
    if n == 0:
        return {"n": 0, "ccc": float("nan"), "rmse": float("nan"), "mae": float("nan"),
                "precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    mx, my = stats.sx / n, stats.sy / n
    vx, vy = stats.sxx / n - mx * mx, stats.syy / n - my * my
    cov = stats.sxy / n - mx * my
    denom = vx + vy + (mx - my) ** 2
    ccc = 2 * cov / denom if denom > 0 else float("nan")
    mse = (stats.syy - 2 * stats.sxy + stats.sxx) / n
    precision = stats.tp / (stats.tp + stats.fp) if stats.tp + stats.fp else 0.0
    recall = stats.tp / (stats.tp + stats.fn) if stats.tp + stats.fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "ccc": ccc, "rmse": math.sqrt(max(mse, 0.0)), "mae": stats.sae / n,
            "precision": precision, "recall": recall, "f1": f1}


def evaluate_totals(true: list[float], pred: list[float]) -> dict[str, float | int]:
    stats = SufficientStats()
    for t, p in zip(true, pred, strict=True):
        stats.add(float(t), float(p))
    return compute(stats)
