"""Differential privacy of a site's adapter updates, and the site's (epsilon, delta) ledger.

Site-level DP (the unit protected is the site's whole contribution in a round): the
update's difference from the global state is clipped to L2 norm ``clip_norm`` and
Gaussian noise N(0, (noise_multiplier * clip_norm)^2) is added to every coordinate, on
site, before anything leaves. Each round is one Gaussian mechanism (sampling rate 1);
the composition over rounds is accounted with Opacus' RDP accountant. The ledger lives in
the workspace (``privacy.json``) and a site stops contributing once the next round would
take it past its budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mllm_dr.atomic import atomic_write_text
from mllm_dr.errors import MllmDrError

class BudgetSpent(MllmDrError):
    """The site's epsilon budget would be exceeded by one more round."""


def clipped_delta(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], clip_norm: float
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """(update - reference) scaled to L2 norm <= ``clip_norm`` (float64), and its norm before clipping."""
    deltas = {n: t.double() - reference[n].double() for n, t in update.items()}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: d * scale for n, d in deltas.items()}, norm


def clip_and_noise(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], clip_norm: float,
                   noise_multiplier: float, seed: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """reference + clip(update - reference) + noise; returns (private update, norm before clipping)."""
    deltas, norm = clipped_delta(update, reference, clip_norm)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = {}
    for n, d in deltas.items():
        noise = torch.randn(d.shape, generator=gen, dtype=torch.float64) * (noise_multiplier * clip_norm)
        out[n] = (reference[n].double() + d + noise).to(update[n].dtype)
    return out, norm


def epsilon_after(rounds: list[float], delta: float) -> float:
    """Epsilon after Gaussian mechanisms with these noise multipliers (sampling rate 1)."""
    if not rounds:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for z in rounds:
        acc.step(noise_multiplier=z, sample_rate=1.0)
    return float(acc.get_epsilon(delta))


@dataclass
class PrivacyLedger:
    path: Path

    def _data(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"rounds": []}

    def noise_multipliers(self) -> list[float]:
        return [r["noise_multiplier"] for r in self._data()["rounds"]]

    def spent(self, delta: float) -> float:
        return epsilon_after(self.noise_multipliers(), delta)

    def check(self, noise_multiplier: float, delta: float, budget: float) -> float:
        """Epsilon after one more round; raises BudgetSpent if that is over ``budget``."""
        nxt = epsilon_after(self.noise_multipliers() + [noise_multiplier], delta)
        if nxt > budget:
            raise BudgetSpent(f"privacy budget: one more round would bring epsilon to {nxt:.2f} > budget "
                              f"{budget:g} (delta {delta:g}); this site stops contributing")
        return nxt

    def record(self, run: str, round_: int, noise_multiplier: float, clip_norm: float, delta: float) -> tuple[float, float]:
        """Append a round; returns (epsilon of this round alone, cumulative epsilon)."""
        data = self._data()
        data["rounds"].append({"run": run, "round": round_, "noise_multiplier": noise_multiplier,
                               "clip_norm": clip_norm})
        total = epsilon_after([r["noise_multiplier"] for r in data["rounds"]], delta)
        data["epsilon"], data["delta"] = total, delta
        atomic_write_text(self.path, json.dumps(data, indent=1))
        return epsilon_after([noise_multiplier], delta), total
