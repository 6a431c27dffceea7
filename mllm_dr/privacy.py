"""Differential privacy of a site's adapter updates, and the site's (epsilon, delta) ledgers.

Site-level DP (the unit protected is the site's whole contribution in a round): the
update's difference from the global state is clipped to L2 norm ``clip_norm`` and
Gaussian noise N(0, (noise_multiplier * clip_norm)^2) is added to every coordinate, on
site, before anything leaves. Each round is one Gaussian mechanism (sampling rate 1);
the composition over rounds is accounted with Opacus' RDP accountant. The ledger lives in
the workspace (``privacy.json``) and a site stops contributing once the next round would
take it past its budget.

Patient-level DP (the unit protected is one patient, all 8 of their item instances) is DP-SGD
inside the site's training (``training.py``): its steps are accounted here too, in a ledger of
their own (``privacy-patient.json``): epsilons of different units never add up.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mllm_dr.atomic import atomic_write_text, file_lock
from mllm_dr.errors import InputError, MllmDrError

class BudgetSpent(MllmDrError):
    """The site's epsilon budget would be exceeded by one more round."""


class PrivateRandom:
    """The randomness of DP (Poisson sampling and Gaussian noise) from a ChaCha20 keystream under a fresh
    256-bit key from the OS (``cryptography``), so nobody outside the site can replay it. torch's global
    generator cannot serve: training reseeds it with numbers the center knows (the round, for dropout),
    and a seeded ``torch.Generator`` keeps 64 bits at most (found by a privacy review, session 41: the
    center recovered a site's clipped update from its noised one). ``seed`` (tests, benchmarks) makes
    the stream repeat. Normals by Box-Muller over 53-bit uniforms (float64); the known floating-point
    attacks on such samplers (Mironov 2012, Jin et al. 2022) are not defended against."""

    SEGMENT = 2 ** 37      # bytes under one nonce: 2^31 blocks of 64, so the 32-bit block counter never wraps

    def __init__(self, seed: int | None = None):
        self._key = os.urandom(32) if seed is None else hashlib.sha256(f"mllm-dr dp seed {seed}".encode()).digest()
        self._segment, self._left, self._stream = 0, 0, None

    def _keystream(self, n: int) -> bytes:
        """``n`` bytes of the stream; a new nonce (the segment's number) every ``SEGMENT`` bytes (a long
        DP-SGD run draws hundreds of GiB of noise; the cipher refuses to wrap its counter)."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        parts = []
        while n:
            if not self._left:
                nonce = bytes(4) + self._segment.to_bytes(12, "little")     # block counter 0, then the segment
                self._stream = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
                self._segment, self._left = self._segment + 1, self.SEGMENT
            k = min(n, self._left)
            parts.append(self._stream.update(bytes(k)))
            self._left, n = self._left - k, n - k
        return b"".join(parts)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` floats uniform in (0, 1)."""
        raw = np.frombuffer(self._keystream(8 * n), dtype=np.uint64)
        return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53

    def normal(self, shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standard normal draws of ``shape``."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        radius, angle = np.sqrt(-2.0 * np.log(u[:half])), 2.0 * np.pi * u[half:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z).reshape(tuple(shape)).to(dtype)

    def permutation(self, n: int) -> list[int]:
        return np.argsort(self.uniform(n), kind="stable").tolist()


def clipped_delta(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], clip_norm: float
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """(update - reference) scaled to L2 norm <= ``clip_norm`` (float64), and its norm before clipping."""
    odd = [n for n, t in update.items() if t.shape != reference[n].shape]
    if odd:                      # never a broadcast difference (a rank-1 factor against the run's rank)
        raise ValueError(f"update {odd[0]} has shape {tuple(update[odd[0]].shape)}, the global "
                         f"{tuple(reference[odd[0]].shape)}")
    deltas = {n: t.double() - reference[n].double() for n, t in update.items()}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: d * scale for n, d in deltas.items()}, norm


def clip_and_noise(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], clip_norm: float,
                   noise_multiplier: float, seed: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """reference + clip(update - reference) + noise; returns (private update, norm before clipping).
    The noise comes from a :class:`PrivateRandom` (``seed``: a repeatable one, for tests)."""
    deltas, norm = clipped_delta(update, reference, clip_norm)
    rng = PrivateRandom(seed)
    out = {}
    for n, d in deltas.items():
        noise = rng.normal(d.shape) * (noise_multiplier * clip_norm)
        out[n] = (reference[n].double() + d + noise).to(update[n].dtype)
    return out, norm


Mechanism = tuple[float, float, int]      # (noise multiplier, sampling rate, steps): Opacus' accountant history


def epsilon_after(history: list[Mechanism], delta: float) -> float:
    """Epsilon after these (subsampled) Gaussian mechanisms, composed with Opacus' RDP accountant."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(z), float(q), int(k)) for z, q, k in history]
    return float(acc.get_epsilon(delta))


def dp_sgd_steps(epochs: int, sample_rate: float, items: int = 1) -> int:
    """Steps of patient-level DP-SGD in ``epochs`` epochs: one epoch = 1 / sample_rate Poisson batches,
    for each of the ``items`` items when a step trains one item (``dp.step = "item"``)."""
    return epochs * max(1, round(1 / sample_rate)) * max(1, items)


def mechanism_possible(noise_multiplier, sample_rate, steps) -> bool:
    """A Gaussian mechanism the accountant may compose: noise > 0, rate in (0, 1], a whole number of steps
    >= 0 (Opacus composes negative steps as a negative cost: budget given back)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (noise_multiplier, sample_rate, steps))
    return (numbers and math.isfinite(noise_multiplier) and noise_multiplier > 0 and 0 < sample_rate <= 1
            and float(steps).is_integer() and steps >= 0)


UNIT_FILES = {"site": "privacy.json", "patient": "privacy-patient.json"}


@dataclass
class PrivacyLedger:
    """A site's (epsilon, delta) spent for one privacy unit: each entry one Gaussian mechanism with its
    sampling rate and number of steps (site level: the whole update once per round, rate 1, 1 step;
    patient level: a round's DP-SGD steps with Poisson sampling of patients)."""

    path: Path
    unit: str = "site"

    @classmethod
    def of(cls, workspace_root: Path, unit: str) -> "PrivacyLedger":
        return cls(Path(workspace_root) / UNIT_FILES[unit], unit)

    def _data(self) -> dict:
        """The ledger file's content; a damaged one is an error naming it (the site stops contributing
        until it is restored: a ledger cannot be guessed)."""
        if not self.path.is_file():
            return {"unit": self.unit, "rounds": []}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
                raise ValueError("no list of rounds")
            for k, r in enumerate(data["rounds"]):      # what check() refuses to add, refused when read
                if not isinstance(r, dict) or not mechanism_possible(r.get("noise_multiplier"),
                                                                     r.get("sample_rate", 1.0), r.get("steps", 1)):
                    raise ValueError(f"round entry {k} is not a possible mechanism")
            return data
        except (OSError, ValueError) as err:
            raise InputError(f"the privacy ledger is unreadable ({type(err).__name__}: {str(err)[:120]}); restore it "
                             f"from a backup: the epsilon spent cannot be recomputed without it", self.path) from None

    def own(self, data: dict | None = None) -> list[Mechanism]:
        return [(r["noise_multiplier"], r.get("sample_rate", 1.0), r.get("steps", 1))
                for r in (data or self._data())["rounds"]]

    def inherited(self) -> list[Mechanism]:
        """What this unit's loss must also count: for a patient, the site-level rounds of the same workspace
        (a policy may switch units). One patient moves a site's clipped update by at most 2C, so each such
        round is, per patient, a Gaussian with half its noise multiplier."""
        if self.unit != "patient":
            return []
        site = PrivacyLedger.of(self.path.parent, "site")
        return [(z / 2, q, k) for z, q, k in site.own()] if site.path.is_file() else []

    def history(self) -> list[Mechanism]:
        return self.inherited() + self.own()

    def spent(self, delta: float) -> float:
        return epsilon_after(self.history(), delta)

    def check(self, noise_multiplier: float, delta: float, budget: float, sample_rate: float = 1.0,
              steps: int = 1, history: list[Mechanism] | None = None) -> float:
        """Epsilon after one more round; raises BudgetSpent if that is over ``budget``. Only a preview:
        what binds is ``spend``, which checks and records as one step. A mechanism that cannot be (steps
        < 0, a rate outside (0, 1], noise <= 0) is a ValueError: Opacus composes negative steps as a
        negative cost, which would give budget back."""
        if not (mechanism_possible(noise_multiplier, sample_rate, steps) and 0 < delta < 1):
            raise ValueError(f"no such DP mechanism: {steps} steps at sample rate {sample_rate}, noise multiplier "
                             f"{noise_multiplier}, delta {delta}")
        nxt = epsilon_after((self.history() if history is None else history)
                            + [(noise_multiplier, sample_rate, steps)], delta)
        if nxt > budget:
            who = "per patient" if self.unit == "patient" else "for this site"
            raise BudgetSpent(f"privacy budget: one more round would bring epsilon {who} to {nxt:.2f} > budget "
                              f"{budget:g} (delta {delta:g}); this site stops contributing")
        return nxt

    @contextmanager
    def _locked(self):
        """This ledger's lock, and first the site-level ledger's for a patient ledger (which counts it,
        ``inherited``): always site before patient, so two ledgers never wait on each other."""
        with ExitStack() as stack:
            if self.unit == "patient":
                stack.enter_context(file_lock(PrivacyLedger.of(self.path.parent, "site").path))
            stack.enter_context(file_lock(self.path))
            yield

    def spend(self, run: str, round_: int, noise_multiplier: float, clip_norm: float, delta: float,
              budget: float = math.inf, sample_rate: float = 1.0, steps: int = 1,
              charge: str = "") -> tuple[float, float]:
        """Charge one round before its mechanism runs: check the budget and append the round as one step
        under the ledger's lock (``mllm_dr.atomic.file_lock``), so two runs training at once cannot both
        pass the check on the same history and together overspend. Returns (epsilon of this round alone,
        cumulative epsilon); raises BudgetSpent with nothing recorded. ``refund(charge)`` takes the
        charge back when the round released nothing (``charge``: an id unique to this try of the round)."""
        with self._locked():
            data = self._data()      # the total with this round is what the check computes
            total = self.check(noise_multiplier, delta, budget, sample_rate, steps, self.inherited() + self.own(data))
            data["rounds"].append({"run": run, "round": round_, "noise_multiplier": noise_multiplier,
                                   "clip_norm": clip_norm, "sample_rate": sample_rate, "steps": steps}
                                  | ({"charge": charge} if charge else {}))
            data["epsilon"], data["delta"], data["unit"] = total, delta, self.unit
            atomic_write_text(self.path, json.dumps(data, indent=1))
        return epsilon_after([(noise_multiplier, sample_rate, steps)], delta), total

    def record(self, run: str, round_: int, noise_multiplier: float, clip_norm: float, delta: float,
               sample_rate: float = 1.0, steps: int = 1) -> tuple[float, float]:
        """``spend`` with no budget to check (a round already decided)."""
        return self.spend(run, round_, noise_multiplier, clip_norm, delta, math.inf, sample_rate, steps)

    def refund(self, charge: str, delta: float) -> None:
        """Take back the round charged as ``charge`` (``spend``): for a round whose training failed, so that
        nothing it computed left the site. By id, so another try of the same round (a resumed run's) keeps
        its own charge. A crash before the refund keeps the charge (the ledger errs on the patients' side)."""
        with self._locked():
            data = self._data()
            hits = [i for i, r in enumerate(data["rounds"]) if charge and r.get("charge") == charge]
            if not hits:
                return
            del data["rounds"][hits[0]]
            data["epsilon"] = epsilon_after(self.inherited() + self.own(data), delta)
            atomic_write_text(self.path, json.dumps(data, indent=1))
