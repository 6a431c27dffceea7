"""Combining site updates into one global adapter state (no Flower here: plain tensors).

- ``weighted_average``: FedAvg, weights = training examples per site; accumulated in float32
  (relative round-off below sites x 2^-24, far under one round's training noise), in place, so
  it costs about one read of the updates.
- ``exact_lora``: averaging LoRA's A and B separately is NOT the average of the updates
  B @ A (the cross terms are wrong). Here M = sum_k c_k B_k A_k is re-factorized to the
  global rank without ever forming M (a 4096 x 4096 layer never needs a dense SVD), by one
  of two methods, picked per layer by the sites' total rank R = sum_k r_k:

  * ``exact`` (R <= EXACT_MAX_TOTAL_RANK, e.g. 3 sites at rank 16): thin QR factors of the
    stacked factors and an SVD of the R x R core, in float64. Exact to round-off, but its
    cost grows with R^2 per layer (100 sites at rank 16: ~11 s per LLaMA-3-8B layer).
  * ``randomized`` (larger R): a range finder applied through the factors, cost linear in
    the number of sites. The basis is warm-started with the averaged B factor (sites start
    each round from the same global adapter, so sum_k c_k B_k spans almost exactly the
    dominant column space) plus OVERSAMPLE Gaussian directions M @ G; one second pass
    projects M onto that basis exactly (Q^T M = sum_k c_k (Q^T B_k) A_k). What the basis
    misses, ||(I - QQ^T) M||_F, is estimated from PROBES held-out Gaussian directions and
    reported in the residual, so the loss is measured, not assumed: bench/aggregation.py
    shows the estimate beside the truth and the error beside the best rank-r factorization.

- ``screen_updates``: non-finite updates and norm outliers (median-based bound) are
  rejected by name before anything is averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]

LORA_A, LORA_B = "lora_A", "lora_B"
EXACT_MAX_TOTAL_RANK = 64     # up to here the exact path is exact and about as fast (bench/aggregation.py)
OVERSAMPLE = 4                # Gaussian directions added to the averaged-B basis
PROBES = 4                    # held-out Gaussian directions that estimate what the basis misses


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
    out = {}
    for n in names:
        acc = torch.zeros(states[0][n].shape, dtype=torch.promote_types(states[0][n].dtype, torch.float32))
        for s, w in zip(states, weights):
            acc.add_(s[n], alpha=w / total)
        out[n] = acc.to(states[0][n].dtype)
    return out


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
    """SVD of sum_k c_k B_k A_k without forming the dense matrix (exact, float64).

    sum_k c_k B_k A_k = [c_1 B_1 .. c_K B_K] @ [A_1; ..; A_K] = Bc @ Ac; with Bc = Qb Rb and
    Ac^T = Qa Ra, the product is Qb (Rb Ra^T) Qa^T and only the small core needs an SVD.
    """
    bc = torch.cat([c * b.double() for b, c in zip(bs, coefs)], dim=1)
    ac = torch.cat([a.double() for a in as_], dim=0)
    qb, rb = torch.linalg.qr(bc)
    qa, ra = torch.linalg.qr(ac.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def randomized_product_svd(bs: list[torch.Tensor], as_: list[torch.Tensor], coefs: list[float], rank: int,
                           generator: torch.Generator):
    """Approximate SVD of M = sum_k c_k B_k A_k in two passes over the factors, float32.

    Returns U, S, Vh of Q Q^T M (U = Q U_x: ``rank`` + OVERSAMPLE columns at least) and the
    estimated missed energy ||(I - QQ^T) M||_F^2. Every product is site by site, so a site's
    factors are read from memory once per pass and the cost is linear in the number of sites.
    """
    d_out, d_in = bs[0].shape[0], as_[0].shape[1]
    r_max = max(b.shape[1] for b in bs)
    extra = max(OVERSAMPLE, rank + OVERSAMPLE - r_max)
    g = torch.randn(d_in, extra + PROBES, generator=generator)
    y = torch.zeros(d_out, extra + PROBES)
    b_avg = torch.zeros(d_out, r_max)
    for b, a, c in zip(bs, as_, coefs):                   # pass 1: M @ G and the averaged B
        b, a = b.float(), a.float()
        y.addmm_(b, a @ g, alpha=c)
        b_avg[:, : b.shape[1]].add_(b, alpha=c)
    q, _ = torch.linalg.qr(torch.cat([b_avg, y[:, :extra]], dim=1))
    held_out = y[:, extra:]
    missed = held_out - q @ (q.T @ held_out)
    missed_energy = float(missed.double().pow(2).sum()) / PROBES
    qt = q.T.contiguous()
    xt = torch.zeros(d_in, q.shape[1])
    for b, a, c in zip(bs, as_, coefs):                   # pass 2: (Q^T M)^T = sum_k c_k A_k^T (B_k^T Q)
        xt.addmm_(a.float().T, (qt @ b.float()).T, alpha=c)
    u, s, vh = torch.linalg.svd(xt.T.double(), full_matrices=False)
    return q.double() @ u, s, vh, missed_energy


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
    residual: float = 0.0     # share of the averaged update's energy (Frobenius) not in the result (0 = exact)
    layers: int = 0
    method: str = "exact"     # "exact", "randomized" or "exact+randomized" (per-layer choice)
    residual_estimated: bool = False   # True when part of the residual comes from held-out probes


def exact_lora(states: list[State], weights: list[float], scalings: list[float], rank: int,
               global_scaling: float, method: str = "auto", seed: int = 0) -> ExactLoraResult:
    """Average the LoRA products; other tensors get the weighted average.

    ``scalings[k]`` is site k's alpha/r (its update is scalings[k] * B_k @ A_k); the result
    is expressed at ``rank`` with ``global_scaling``. ``method``: "auto" (exact while the
    sites' total rank is at most EXACT_MAX_TOTAL_RANK, randomized above), "exact" or
    "randomized". The randomized path is deterministic for a given ``seed``.
    """
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"unknown exact-lora method {method!r}")
    total = float(sum(weights))
    coefs = [w / total * sc for w, sc in zip(weights, scalings)]
    pairs = lora_pairs(states[0].keys())
    lora_names = {n for ab in pairs.values() for n in ab}
    rest = [{n: t for n, t in s.items() if n not in lora_names} for s in states]
    out = weighted_average(rest, weights) if rest[0] else {}
    lost = kept = 0.0
    used = set()
    gen = torch.Generator().manual_seed(seed)
    for prefix, (a_name, b_name) in pairs.items():
        bs, as_ = [st[b_name] for st in states], [st[a_name] for st in states]
        total_rank = sum(a.shape[0] for a in as_)
        exact = method == "exact" or (method == "auto" and total_rank <= EXACT_MAX_TOTAL_RANK)
        if exact:
            u, s, vh = low_rank_product_svd(bs, as_, coefs)
            missed = 0.0
        else:
            u, s, vh, missed = randomized_product_svd(bs, as_, coefs, rank, gen)
        used.add("exact" if exact else "randomized")
        b, a = refactorize(u, s, vh, rank, global_scaling)
        out[a_name], out[b_name] = a.to(states[0][a_name].dtype), b.to(states[0][b_name].dtype)
        energy = s.double().pow(2)
        kept += energy[:rank].sum().item()
        lost += energy[rank:].sum().item() + missed
    residual = math.sqrt(lost / (lost + kept)) if lost + kept > 0 else 0.0
    return ExactLoraResult(out, residual, len(pairs), "+".join(sorted(used)) or "exact", "randomized" in used)


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
    """L2 norm of (update - reference) over the tensors the update carries (inf if any value is not finite)."""
    sq = 0.0
    for n, t in update.items():
        ref = reference.get(n)
        d = t - ref if ref is not None and ref.shape == t.shape else t
        sq += float(torch.linalg.vector_norm(d.float())) ** 2
    return math.sqrt(sq)


def screen_updates(updates: list[State], reference: State, outlier_factor: float = 3.0) -> Screening:
    """Reject non-finite updates, then those whose distance to ``reference`` exceeds
    ``outlier_factor`` x the median distance (robust to a minority of bad sites)."""
    res = Screening()
    finite = []
    for i, up in enumerate(updates):
        norm = update_norm(up, reference)        # one pass; names are looked up only when it is not finite
        if not math.isfinite(norm):
            bad = [n for n, t in up.items() if not torch.isfinite(t).all()]
            res.rejected[i] = (f"non-finite values in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                               if bad else "update norm overflows float32")
            res.norms.append(float("nan"))
        else:
            finite.append(i)
            res.norms.append(norm)
    if len(finite) >= 3:
        median = sorted(res.norms[i] for i in finite)[len(finite) // 2]
        bound = outlier_factor * median + 1e-12
        for i in finite:
            if res.norms[i] > bound:
                res.rejected[i] = f"update norm {res.norms[i]:.3g} exceeds {outlier_factor:g} x median {median:.3g}"
    res.accepted = [i for i in finite if i not in res.rejected]
    return res
