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
  * ``randomized`` (larger R): cost linear in the number of sites, float32. Every site
    starts a round from the same global adapter, so with B_bar = sum_k c_k B_k,
    M = B_bar A_bar + sum_k c_k (B_k - B_bar)(A_k - A_bar) (c normalised): range(B_bar) is
    the dominant column space up to second-order terms in the sites' differences. So Q =
    orth(B_bar) (one pass of adds), then Q^T M = sum_k c_k (Q^T B_k) A_k in one more pass.
    What Q misses, ||(I - QQ^T) M||_F^2, is estimated in that same pass from PROBES Gaussian
    directions orthogonal to Q and is part of the reported residual, so the loss is
    measured, not assumed. If that estimate is above RETRY_SHARE of the energy (sites that
    disagree, or cancel out in the average), a Gaussian range finder with one power iteration
    is tried as well and the better basis kept. bench/aggregation.py prints the error beside
    the best rank-r factorization and the reported residual beside the true one.

- ``server_step`` (and ``exact_lora(..., reference, server_lr)``): the server learning rate of
  FedOpt (Reddi et al., ICLR 2021): new = old + server_lr * (average - old). With K sites each
  taking n_k / batch local steps, the averaged move is about 1/K of what one epoch over the
  pooled data makes; server_lr > 1 takes a longer step along the average (1 = plain FedAvg).
  For exact-lora the step is taken on the products: (1 - server_lr) * B_old A_old +
  server_lr * sum_k c_k B_k A_k, re-factorized like any other combination.

- ``screen_updates``: non-finite updates and norm outliers (median-based bound, and the run's
  absolute bound if it sets one) are rejected by name before anything is averaged.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]

LORA_A, LORA_B = "lora_A", "lora_B"
EXACT_MAX_TOTAL_RANK = 64     # up to here the exact path is exact and about as fast (bench/aggregation.py)
PROBES = 4                    # Gaussian directions that estimate what the randomized basis misses
RETRY_SHARE = 0.1             # missed share of the energy above which the Gaussian fallback is tried
OVERSAMPLE = 4                # extra directions of that fallback beyond the rank
MAX_EXAMPLES_ALLOWANCE = 10.0  # the norm screen lets a site with k x the median site's examples step <= min(k, this) x further


# The dtype of every aggregate: the kit's adapter globals are float32 (a site may send fp16 or bf16 replies, which
# the center accepts under the fp32 uplink; the aggregate used to take the alphabetically first site's dtype, so one
# bf16 site rounded every site's contribution: an error 1.25x the round's step, an aggregation review, session 45).
GLOBAL_DTYPE = torch.float32


def weighted_average(states: list[State], weights: list[float]) -> State:
    """sum_k w_k state_k / sum_k w_k per tensor name (FedAvg; also the sum-only mode of FFA-LoRA)."""
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
        floating = states[0][n].is_floating_point()     # not the first site's dtype: a bf16 reply rounded everyone's
        out[n] = acc.to(GLOBAL_DTYPE if floating else states[0][n].dtype)          # (session 45); counters keep theirs
    return out


def server_step(reference: State, averaged: State, server_lr: float) -> State:
    """old + server_lr * (averaged - old) per tensor of ``averaged`` (server_lr 1: ``averaged`` itself)."""
    if server_lr == 1.0:
        return averaged
    return {n: (reference[n].float() + server_lr * (t.float() - reference[n].float())).to(t.dtype)
            for n, t in averaged.items()}


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


class GlobalSVD:
    """U, S, Vh of each LoRA layer's product ``scaling`` * B @ A in ``state`` (a round's global), computed once a
    layer (``low_rank_product_svd``) and kept. Under exact-lora, the screening's ``starting_point`` of every site
    at its own LoRA rank and ``own_rank_corrections`` both need it: each computed it again, once per such site
    and once more to combine (session 47). The caller holding the round's global makes one a round
    (``fl_server/strategy.py``) and hands it to ``screen_updates`` and ``exact_lora``; without one, each makes its
    own. It keeps the float64 factors of every layer asked for while it lives: about twice the global adapter."""

    def __init__(self, state: State, scaling: float):
        self.state, self.scaling = state, scaling
        self._layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, svd: GlobalSVD | None, state: State, scaling: float) -> GlobalSVD:
        """``svd`` when it is the SVD of ``state`` at ``scaling`` (ValueError when it is another's), else a new one."""
        if svd is None:
            return cls(state, scaling)
        if svd.state is not state or svd.scaling != scaling:
            raise ValueError("the GlobalSVD given is of another state or scaling")
        return svd

    def layer(self, a_name: str, b_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if b_name not in self._layers:
            self._layers[b_name] = low_rank_product_svd([self.state[b_name]], [self.state[a_name]], [self.scaling])
        return self._layers[b_name]


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def _times(bs, as_, coefs, w: torch.Tensor) -> torch.Tensor:
    """M @ w through the factors: sum_k c_k B_k (A_k w)."""
    y = torch.zeros(bs[0].shape[0], w.shape[1])
    for b, a, c in zip(bs, as_, coefs):
        y.addmm_(b.float(), a.float() @ w, alpha=c)
    return y


def _times_t(bs, as_, coefs, q: torch.Tensor) -> torch.Tensor:
    """M^T @ q through the factors: sum_k c_k A_k^T (B_k^T q)."""
    z = torch.zeros(as_[0].shape[1], q.shape[1])
    for b, a, c in zip(bs, as_, coefs):
        z.addmm_(a.float().T, b.float().T @ q, alpha=c)
    return z


def _project(bs, as_, coefs, q: torch.Tensor, generator: torch.Generator,
             probes: int = PROBES) -> tuple[torch.Tensor, float]:
    """Q^T M in one pass, and ||(I - QQ^T) M||_F^2 estimated in the same products.

    The estimate: H = (I - QQ^T) G for ``probes`` Gaussian columns G, so E ||H^T M||_F^2 =
    probes * ||(I - QQ^T) M||_F^2; H^T M comes out of the same per-site products as Q^T M.
    ``probes`` = 0 (bench/aggregation.py's cost without the estimate) returns nan for it.
    """
    h = torch.randn(q.shape[0], probes, generator=generator)
    h -= q @ (q.T @ h)
    qh_t = torch.cat([q, h], dim=1).T.contiguous()
    x = torch.zeros(qh_t.shape[0], as_[0].shape[1])
    for b, a, c in zip(bs, as_, coefs):
        x.addmm_(qh_t @ b.float(), a.float(), alpha=c)
    k = q.shape[1]
    return x[:k], float(x[k:].double().pow(2).sum()) / probes if probes else float("nan")


def _averaged_b(bs, coefs) -> torch.Tensor:
    """sum_k c_k B_k in float32, one pass of adds: one sum per rank, side by side (the sites at one rank
    started from the same factors; a site at its own rank started from the global re-expressed in its SVD
    basis, so adding its columns into the first ones of the others' mixed two bases and the basis missed its
    step: 16x the best rank-r error in `test_a_site_at_its_own_rank_adds_its_step_*`)."""
    by_rank: dict[int, torch.Tensor] = {}
    for b, c in zip(bs, coefs):
        if b.shape[1] not in by_rank:
            by_rank[b.shape[1]] = torch.zeros(b.shape[0], b.shape[1])
        by_rank[b.shape[1]].add_(b, alpha=c)
    sums = [by_rank[r] for r in sorted(by_rank, reverse=True)]
    return sums[0] if len(sums) == 1 else torch.cat(sums, dim=1)


def _svd_of_projection(q: torch.Tensor, x: torch.Tensor):
    """U, S, Vh of Q @ X (Q orthonormal, X = Q^T M short): X = Rx^T Qx^T, so only a small SVD is needed.

    In the inputs' float32, like the rest of this path: the sketch's own error (the reported
    residual, ~1e-3 in bench/aggregation.py) is far above float32 round-off (U S Vh differs from
    the float64 route by ~1e-6 relative), and in float64 this step with ``refactorize`` took
    twice as long (1.5 against 0.8 ms for a 4096 x 4096 layer).
    """
    qx, rx = torch.linalg.qr(x.T)
    w, s, vt = torch.linalg.svd(rx.T)
    return q @ w, s, vt @ qx.T


def randomized_product_svd(bs: list[torch.Tensor], as_: list[torch.Tensor], coefs: list[float], rank: int,
                           generator: torch.Generator):
    """Approximate SVD of M = sum_k c_k B_k A_k, float32, cost linear in the number of sites.

    Basis Q = orth(sum_k c_k B_k) (one cheap pass: adds only), then Q^T M (one pass, two small
    products per site). Returns U, S, Vh of Q Q^T M and the estimated missed energy
    ||(I - QQ^T) M||_F^2. When that estimate says the averaged B misses more than RETRY_SHARE
    of the energy (sites that disagree), a Gaussian range finder with one power iteration
    (four more passes) is tried too and the better of the two kept.
    """
    q = _orthonormal(_averaged_b(bs, coefs))
    x, missed = _project(bs, as_, coefs, q, generator)
    if missed > RETRY_SHARE * (missed + float(x.double().pow(2).sum())):
        g = torch.randn(as_[0].shape[1], rank + OVERSAMPLE, generator=generator)
        q2 = _orthonormal(_times(bs, as_, coefs, g))
        q2 = _orthonormal(_times(bs, as_, coefs, _orthonormal(_times_t(bs, as_, coefs, q2))))
        x2, missed2 = _project(bs, as_, coefs, q2, generator)
        if missed2 < missed:
            q, x, missed = q2, x2, missed2
    u, s, vh = _svd_of_projection(q, x)
    return u, s, vh, missed


def refactorize(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, scaling: float):
    """B, A of ``rank`` with scaling * B @ A = best rank-``rank`` approximation of U S Vh.

    A direction the product does not use (rank above the product's numerical rank: a zero global, the
    first stage-2 round at a site training at its own rank) gets a fresh A row, drawn as peft draws LoRA
    A (uniform, bound 1 / sqrt(columns), a fixed seed), and a zero B column: the product is unchanged and
    the direction can learn. Zero in both factors, its gradients were zero for good (a privacy review,
    session 41: a site at its own rank never moved from a zero global)."""
    if not torch.isfinite(s).all():       # never a silently zero product (screening drops such updates first)
        raise ValueError("the product to refactorize is not finite")
    k = min(rank, s.numel())
    tol = (float(s[0]) if s.numel() else 0.0) * max(u.shape[0], vh.shape[1]) * torch.finfo(s.dtype).eps
    used = int((s[:k] > tol).sum())
    root = torch.sqrt(s[:used] / scaling)
    b = torch.zeros(u.shape[0], rank, dtype=u.dtype)
    a = torch.zeros(rank, vh.shape[1], dtype=vh.dtype)
    b[:, :used] = u[:, :used] * root
    a[:used] = root[:, None] * vh[:used]
    if used < rank:
        bound = 1.0 / math.sqrt(vh.shape[1])
        gen = torch.Generator().manual_seed(rank * 1_000_003 + vh.shape[1])
        a[used:] = (torch.rand(rank - used, vh.shape[1], generator=gen, dtype=torch.float64) * 2 - 1).to(a.dtype) * bound
    return b, a


def map_layers(fn, items: list) -> list:
    """[fn(x) for x in items] on torch.get_num_threads() Python threads, torch single-threaded inside.

    A layer's merge is hundreds of small products, which split badly across threads inside one
    product (and stall when other processes load the machine); whole layers per thread do not.
    torch's thread count is restored afterwards.
    """
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(before)


@dataclass
class ExactLoraResult:
    state: State
    residual: float = 0.0     # share of the averaged update's energy (Frobenius) not in the result (0 = exact)
    layers: int = 0
    method: str = "exact"     # "exact", "randomized" or "exact+randomized" (per-layer choice)
    residual_estimated: bool = False   # True when part of the residual comes from held-out probes


def exact_lora(states: list[State], weights: list[float], scalings: list[float], rank: int,
               global_scaling: float, method: str = "auto", seed: int = 0, reference: State | None = None,
               server_lr: float = 1.0, reference_svd: GlobalSVD | None = None) -> ExactLoraResult:
    """Average the LoRA products; other tensors get the weighted average.

    ``scalings[k]`` is site k's alpha/r (its update is scalings[k] * B_k @ A_k); the result
    is expressed at ``rank`` with ``global_scaling``. ``method``: "auto" (exact while the
    sites' total rank is at most EXACT_MAX_TOTAL_RANK, randomized above), "exact" or
    "randomized". The randomized path is deterministic for a given ``seed``. With
    ``server_lr`` != 1 the step from ``reference`` (the round's global, at ``global_scaling``)
    is scaled: (1 - server_lr) * reference + server_lr * average, products and other tensors alike.
    With ``reference``, a site at its own LoRA rank adds its step from where it started, not its product
    (``own_rank_corrections``; ``reference_svd``: the reference's ``GlobalSVD`` the screening used, if any).
    """
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"unknown exact-lora method {method!r}")
    if server_lr != 1.0:
        if reference is None:
            raise ValueError("a server learning rate needs the round's global state (reference)")
        total = float(sum(weights))
        states = [*states, {n: reference[n] for n in states[0]}]
        weights = [server_lr * w / total for w in weights] + [1.0 - server_lr]
        scalings = [*scalings, global_scaling]
    total = float(sum(weights))
    coefs = [w / total * sc for w, sc in zip(weights, scalings)]
    pairs = lora_pairs(states[0].keys())
    lora_names = {n for ab in pairs.values() for n in ab}
    rest = [{n: t for n, t in s.items() if n not in lora_names} for s in states]
    out = weighted_average(rest, weights) if rest[0] else {}
    terms = list(zip(states, coefs))
    if reference is not None:
        terms += own_rank_corrections(states, [w / total for w in weights], scalings, reference, global_scaling,
                                      reference_svd)

    def merge(item):
        index, (a_name, b_name) = item
        bs, as_ = [st[b_name] for st, _ in terms], [st[a_name] for st, _ in terms]
        coefs = [c for _, c in terms]
        exact = method == "exact" or (method == "auto" and sum(a.shape[0] for a in as_) <= EXACT_MAX_TOTAL_RANK)
        if exact:
            u, s, vh = low_rank_product_svd(bs, as_, coefs)
            missed = 0.0
        else:                                             # a generator per layer: same result on any thread
            gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
            u, s, vh, missed = randomized_product_svd(bs, as_, coefs, rank, gen)
        b, a = refactorize(u, s, vh, rank, global_scaling)
        energy = s.double().pow(2)
        return ({a_name: a.to(GLOBAL_DTYPE), b_name: b.to(GLOBAL_DTYPE)}, float(energy[:rank].sum()),
                float(energy[rank:].sum()) + missed, "exact" if exact else "randomized")

    kept = lost = 0.0
    used = set()
    for tensors, kept_layer, lost_layer, how in map_layers(merge, list(enumerate(pairs.values()))):
        out |= tensors
        kept, lost = kept + kept_layer, lost + lost_layer
        used.add(how)
    residual = math.sqrt(lost / (lost + kept)) if lost + kept > 0 else 0.0
    return ExactLoraResult(out, residual, len(pairs), "+".join(sorted(used)) or "exact", "randomized" in used)


def own_rank_corrections(states: list[State], shares: list[float], scalings: list[float], reference: State,
                         reference_scaling: float, reference_svd: GlobalSVD | None = None
                         ) -> list[tuple[State, float]]:
    """An extra (state, coefficient) term for ``exact_lora`` so that a site training below the global's LoRA rank
    contributes its step, not its truncation of the global: share_k * (global - where the site started), and
    where it started is the global cut to rank r_k (``starting_point``), so that difference is the tail of the
    global's SVD beyond r_k. Without it the average held share_k * s_k B_k A_k: a round in which nobody trained
    moved the global product by 0.23 of its norm with one rank-4 site of three, every round toward rank 4 (an
    aggregation review, session 45). The tails of every such site fold into one term, U diag(sigma_i w_i) Vh
    with w_i the summed shares of the sites whose rank is <= i, of rank (global rank - the lowest such rank):
    the total rank the "auto" method counts grows by what those sites lack, no more. Sites at the global's
    rank need none, nor do sites above it (their start is the global itself, padded). The global's SVD per layer
    comes from ``reference_svd`` (``GlobalSVD``: computed once a round)."""
    pairs = lora_pairs(reference)
    if not pairs:
        return []
    a0 = next(iter(pairs.values()))[0]
    full = reference[a0].shape[0]
    share_at: dict[int, float] = {}                     # rank below the global's -> the summed shares
    for st, share in zip(states, shares):
        rank = st[a0].shape[0] if a0 in st else full
        if rank < full:
            share_at[rank] = share_at.get(rank, 0.0) + share
    if not share_at:
        return []
    low = min(share_at)
    weight = torch.tensor([sum(sh for r, sh in share_at.items() if r <= i) for i in range(low, full)],
                          dtype=torch.float64)
    svd, tail = GlobalSVD.of(reference_svd, reference, reference_scaling), {}
    for a_name, b_name in pairs.values():
        u, s, vh = svd.layer(a_name, b_name)
        tail[b_name] = (u[:, low:full] * (s[low:full] * weight)).to(GLOBAL_DTYPE)
        tail[a_name] = vh[low:full].to(GLOBAL_DTYPE)
    return [(tail, 1.0)]


def resize_lora(state: State, rank: int, scaling_in: float, scaling_out: float, svd: GlobalSVD | None = None
                ) -> State:
    """Re-express every LoRA pair of ``state`` at another rank (a site whose rank differs); ``svd``: the
    ``GlobalSVD`` of ``state`` at ``scaling_in`` when the caller keeps one."""
    out, svd = dict(state), GlobalSVD.of(svd, state, scaling_in)
    for _, (a_name, b_name) in lora_pairs(state.keys()).items():
        u, s, vh = svd.layer(a_name, b_name)
        b, a = refactorize(u, s, vh, rank, scaling_out)
        out[a_name], out[b_name] = a.to(state[a_name].dtype), b.to(state[b_name].dtype)
    return out


# ----------------------------------------------------------------------------- screening
@dataclass
class Screening:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)   # index -> reason
    norms: list[float] = field(default_factory=list)


def update_norms(updates: list[State], reference: State) -> list[float]:
    """L2 norm of (update - reference) over the tensors each update carries, for every update
    (inf or nan where a value is not finite; a tensor the reference lacks counts whole).

    Tensor by tensor across the updates, whole tensors per thread (``map_layers``: torch
    single-threaded inside): each tensor's difference is small, and splitting one small
    subtraction and reduction across threads made the screening 2-4x a plain accumulate at
    idle, run to run, and far slower under load (bench/aggregation.py). The
    differences go to one buffer per thread and tensor, not a fresh tensor per site.
    """
    names = list(dict.fromkeys(n for up in updates for n in up))

    def squares(name: str) -> list[float]:
        ref, buf, out = reference.get(name), None, [0.0] * len(updates)
        for i, up in enumerate(updates):
            t = up.get(name)
            if t is None:
                continue
            if ref is not None and ref.shape == t.shape:
                dtype = torch.promote_types(t.dtype, ref.dtype)
                if buf is None or buf.dtype != dtype:
                    buf = torch.empty(t.shape, dtype=dtype)
                d = torch.sub(t, ref, out=buf)
            else:
                d = t
            d = d.float().reshape(-1)                     # .float(): no copy for float32
            out[i] = float(torch.dot(d, d))
        return out

    per_name = map_layers(squares, names)
    return [math.sqrt(sum(sq[i] for sq in per_name)) for i in range(len(updates))]


def starting_point(update: State, reference: State, scaling: float, reference_scaling: float,
                   reference_svd: GlobalSVD | None = None) -> tuple[State, float]:
    """The global as the site that sent ``update`` started from it, and its scaling: the reference itself, or,
    for a site training at its own LoRA rank, the reference re-expressed at that rank (``resize_lora``, as
    ``SiteSession.load_global`` does). Measured against the full-rank reference, such a site's distance held
    the truncation of the global, not its update: an honest rank-4 site was an outlier once the global had
    energy beyond rank 4 (an aggregation review, session 45). ``reference_svd``: the reference's ``GlobalSVD``."""
    pairs = list(lora_pairs(update).values())
    if not pairs or all(update[a].shape == reference[a].shape for a, _ in pairs if a in reference):
        return reference, reference_scaling
    return resize_lora(reference, update[pairs[0][0]].shape[0], reference_scaling, scaling, reference_svd), scaling


def product_distances(updates: list[State], reference: State, scalings: list[float], reference_scaling: float,
                      reference_svd: GlobalSVD | None = None) -> list[float]:
    """Per update, || s_k B_k A_k - s B A ||_F over its LoRA pairs (the factors' product, whatever their
    rank; B A: where the site started, ``starting_point``), from r x r Gram matrices: ||P - Q||^2 = ||P||^2 + ||Q||^2 - 2 <P, Q>, <sBA, s'B'A'> =
    s s' tr((B^T B')(A' A^T)). NaN where a value is not finite. The reference's SVD (``reference_svd``, else one
    made here) serves every site at its own rank."""
    def inner(b1, a1, b2, a2) -> float:
        return float(((b1.T @ b2) * (a1 @ a2.T)).sum())

    out, svd = [], GlobalSVD.of(reference_svd, reference, reference_scaling)
    for up, s in zip(updates, scalings):
        start, s_start = starting_point(up, reference, s, reference_scaling, svd)
        total = 0.0
        for a_name, b_name in lora_pairs(up).values():
            b, a = up[b_name].double(), up[a_name].double()
            rb, ra = start[b_name].double(), start[a_name].double()
            total += (s * s * inner(b, a, b, a) + s_start ** 2 * inner(rb, ra, rb, ra)
                      - 2 * s * s_start * inner(b, a, rb, ra))
        out.append(math.sqrt(max(total, 0.0)) if math.isfinite(total) else float("nan"))
    return out


def screen_updates(updates: list[State], reference: State, outlier_factor: float = 3.0,
                   lora_scalings: list[float] | None = None, reference_scaling: float = 1.0,
                   max_norm: float = 0.0, examples: list[float] | None = None,
                   reference_svd: GlobalSVD | None = None) -> Screening:
    """Reject non-finite updates, then those whose distance to ``reference`` exceeds
    ``outlier_factor`` x the median distance (robust to a minority of bad sites; needs >= 3 finite
    updates) or ``max_norm`` (an absolute bound, 0 = none: the only screen a round of 2 sites has).

    ``lora_scalings`` (exact-lora, where a site may train at its own rank): every update's LoRA pairs
    are measured by their product's distance (``product_distances``), the rest tensor by tensor. The
    factors' own distance measured a rank-4 site's whole factors against the global's rank-16 ones
    (shapes differ): an honest site at its own rank was an outlier every round (a review, session 42).

    ``examples`` (each site's training examples, when a round is a number of epochs: a site's steps grow
    with its data): a site with more examples than the median site may move that many times further,
    bound_k = outlier_factor x median x min(max(1, n_k / median n), MAX_EXAMPLES_ALLOWANCE). Without it an
    honest site with 10x the median's patients, whose epoch takes 10x the steps, was rejected every round (an
    aggregation review, session 45); a site with fewer examples keeps the plain bound. The count is the site's
    own (bounded by what it declared at the handshake), the same number that weighs its update; the cap keeps a
    site declaring 1000x the median's examples from escaping the screen (a second read, session 46).

    ``reference_svd``: the reference's ``GlobalSVD`` at ``reference_scaling``, which the caller keeps for
    ``exact_lora`` (its own-rank corrections need the same SVD)."""
    res = Screening()
    finite = []
    if lora_scalings is None:
        norms = update_norms(updates, reference)
    else:
        pairs = {n for up in updates for pair in lora_pairs(up).values() for n in pair}
        rest = update_norms([{n: t for n, t in up.items() if n not in pairs} for up in updates], reference)
        products = product_distances(updates, reference, lora_scalings, reference_scaling, reference_svd)
        norms = [math.hypot(r, p) for r, p in zip(rest, products)]      # NaN or inf stays non-finite
    for i, (up, norm) in enumerate(zip(updates, norms)):
        if not math.isfinite(norm):                  # names are looked up only when it is not finite
            bad = [n for n, t in up.items() if not torch.isfinite(t).all()]
            res.rejected[i] = (f"non-finite values in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                               if bad else "update norm overflows float32")
            res.norms.append(float("nan"))
        else:
            finite.append(i)
            res.norms.append(norm)
    if len(finite) >= 3:
        median = sorted(res.norms[i] for i in finite)[len(finite) // 2]
        typical = sorted(examples[i] for i in finite)[len(finite) // 2] if examples else 0.0
        for i in finite:
            more = min(examples[i] / typical, MAX_EXAMPLES_ALLOWANCE) if typical > 0 and examples[i] > typical else 1.0
            if res.norms[i] > outlier_factor * median * more + 1e-12:
                res.rejected[i] = (f"update norm {res.norms[i]:.3g} exceeds {outlier_factor:g} x median {median:.3g}"
                                   + (f" x {more:.3g} (its examples over the median site's)" if more > 1 else ""))
    for i in finite:
        if max_norm and res.norms[i] > max_norm and i not in res.rejected:
            res.rejected[i] = f"update norm {res.norms[i]:.3g} exceeds the run's max-update-norm {max_norm:g}"
    res.accepted = [i for i in finite if i not in res.rejected]
    return res
