"""Combining site updates into one global adapter state (no Flower here: plain tensors).

- ``weighted_average``: FedAvg, weights = training examples per site.
- ``exact_lora``: averaging LoRA's A and B separately is NOT the average of the updates
  B @ A (the cross terms are wrong). Here the products are averaged exactly and
  re-factorized to the global rank with an SVD computed through thin QR factors, so a
  site may use any rank and a 4096-wide layer never needs a 4096 x 4096 SVD.
- ``screen_updates``: non-finite updates and norm outliers (median-based bound) are
  rejected by name before anything is averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]

LORA_A, LORA_B = "lora_A", "lora_B"


def weighted_average(states: list[State], weights: list[float]) -> State:
    if not states:
        raise ValueError("nothing to aggregate")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    names = states[0].keys()
    for s in states[1:]:
        if s.keys() != names:
            raise ValueError("site updates carry different tensor names")
    return {n: sum(s[n].double() * (w / total) for s, w in zip(states, weights)).to(states[0][n].dtype)
            for n in names}


def lora_pairs(names) -> dict[str, tuple[str, str]]:
    """prefix -> (A name, B name) for every LoRA-wrapped layer in ``names``."""
    pairs = {}
    for n in names:
        if f".{LORA_A}." in n:
            prefix = n.split(f".{LORA_A}.")[0]
            b = n.replace(f".{LORA_A}.", f".{LORA_B}.")
            if b in names:
                pairs[prefix] = (n, b)
    return pairs


def low_rank_product_svd(bs: list[torch.Tensor], as_: list[torch.Tensor], coefs: list[float]):
    """SVD of sum_k c_k B_k A_k without forming the dense matrix.

    sum_k c_k B_k A_k = [c_1 B_1 .. c_K B_K] @ [A_1; ..; A_K] = Bc @ Ac; with Bc = Qb Rb and
    Ac^T = Qa Ra, the product is Qb (Rb Ra^T) Qa^T and only the small core needs an SVD.
    """
    bc = torch.cat([c * b.double() for b, c in zip(bs, coefs)], dim=1)
    ac = torch.cat([a.double() for a in as_], dim=0)
    qb, rb = torch.linalg.qr(bc)
    qa, ra = torch.linalg.qr(ac.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def refactorize(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, scaling: float):
    """B, A of ``rank`` with scaling * B @ A = best rank-``rank`` approximation of U S Vh."""
    k = min(rank, s.numel())
    root = torch.sqrt(s[:k] / scaling)
    b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


@dataclass
class ExactLoraResult:
    state: State
    residual: float = 0.0     # share of the averaged update's energy lost to the rank limit (0 = exact)
    layers: int = 0


def exact_lora(states: list[State], weights: list[float], scalings: list[float], rank: int,
               global_scaling: float) -> ExactLoraResult:
    """Average the LoRA products exactly; other tensors get the weighted average.

    ``scalings[k]`` is site k's alpha/r (its update is scalings[k] * B_k @ A_k); the result
    is expressed at ``rank`` with ``global_scaling``.
    """
    total = float(sum(weights))
    coefs = [w / total * sc for w, sc in zip(weights, scalings)]
    pairs = lora_pairs(states[0].keys())
    lora_names = {n for ab in pairs.values() for n in ab}
    rest = [{n: t for n, t in s.items() if n not in lora_names} for s in states]
    out = weighted_average(rest, weights) if rest[0] else {}
    lost = kept = 0.0
    for prefix, (a_name, b_name) in pairs.items():
        u, s, vh = low_rank_product_svd([st[b_name] for st in states], [st[a_name] for st in states], coefs)
        b, a = refactorize(u, s, vh, rank, global_scaling)
        out[a_name], out[b_name] = a.to(states[0][a_name].dtype), b.to(states[0][b_name].dtype)
        energy = s.double().pow(2)
        kept += energy[:rank].sum().item()
        lost += energy[rank:].sum().item()
    residual = math.sqrt(lost / (lost + kept)) if lost + kept > 0 else 0.0
    return ExactLoraResult(out, residual, len(pairs))


def resize_lora(state: State, rank: int, scaling_in: float, scaling_out: float) -> State:
    """Re-express every LoRA pair of ``state`` at another rank (a site whose rank differs)."""
    out = dict(state)
    for _, (a_name, b_name) in lora_pairs(state.keys()).items():
        u, s, vh = low_rank_product_svd([state[b_name]], [state[a_name]], [scaling_in])
        b, a = refactorize(u, s, vh, rank, scaling_out)
        out[a_name], out[b_name] = a.to(state[a_name].dtype), b.to(state[b_name].dtype)
    return out


# ----------------------------------------------------------------------------- screening
@dataclass
class Screening:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)   # index -> reason
    norms: list[float] = field(default_factory=list)


def update_norm(update: State, reference: State) -> float:
    """L2 norm of (update - reference) over the tensors the update carries."""
    sq = 0.0
    for n, t in update.items():
        ref = reference.get(n)
        d = t.double() - (ref.double() if ref is not None and ref.shape == t.shape else 0.0)
        sq += float(d.pow(2).sum())
    return math.sqrt(sq)


def screen_updates(updates: list[State], reference: State, outlier_factor: float = 3.0) -> Screening:
    """Reject non-finite updates, then those whose distance to ``reference`` exceeds
    ``outlier_factor`` x the median distance (robust to a minority of bad sites)."""
    res = Screening()
    finite = []
    for i, up in enumerate(updates):
        bad = [n for n, t in up.items() if not torch.isfinite(t).all()]
        if bad:
            res.rejected[i] = f"non-finite values in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            res.norms.append(float("nan"))
        else:
            finite.append(i)
            res.norms.append(update_norm(up, reference))
    if len(finite) >= 3:
        median = sorted(res.norms[i] for i in finite)[len(finite) // 2]
        bound = outlier_factor * median + 1e-12
        for i in finite:
            if res.norms[i] > bound:
                res.rejected[i] = f"update norm {res.norms[i]:.3g} exceeds {outlier_factor:g} x median {median:.3g}"
    res.accepted = [i for i in finite if i not in res.rejected]
    return res
