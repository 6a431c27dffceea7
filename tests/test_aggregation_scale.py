"""Aggregation at many sites: the randomized exact-lora path against the exact one, and FedAvg in float32."""

from __future__ import annotations

import math

import pytest
import torch

from mllm_dr.aggregation import (EXACT_MAX_TOTAL_RANK, exact_lora, low_rank_product_svd, screen_updates,
                                 weighted_average)

PREFIX = "lora.layers.{i}.q_proj"


def _sites(k, rank=8, d_out=96, d_in=80, noise=0.1, layers=2, ranks=None, shared_a=False, seed=0):
    """k site updates: common factors + ``noise`` x independent ones (noise=None: unrelated factors)."""
    g = torch.Generator().manual_seed(seed)
    sites = [{} for _ in range(k)]
    for i in range(layers):
        b0, a0 = torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g)
        for j, s in enumerate(sites):
            r = ranks[j] if ranks else rank
            b, a = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
            if noise is not None:
                b, a = b0[:, :r] + noise * b, a0[:r] + noise * a
            s[f"{PREFIX.format(i=i)}.lora_B.weight"] = b
            s[f"{PREFIX.format(i=i)}.lora_A.weight"] = a0[:r].clone() if shared_a else a
    return sites


def _errors(sites, weights, scalings, rank, result):
    """(error of ``result``, error of the best rank-``rank`` factorization), relative to ||M||_F."""
    total = float(sum(weights))
    coefs = [w / total * s for w, s in zip(weights, scalings)]
    sq_m = sq_res = sq_best = 0.0
    for i in range(len([n for n in sites[0] if n.endswith("lora_A.weight")])):
        a_n, b_n = f"{PREFIX.format(i=i)}.lora_A.weight", f"{PREFIX.format(i=i)}.lora_B.weight"
        m = sum(c * s[b_n].double() @ s[a_n].double() for s, c in zip(sites, coefs))
        _, sv, _ = low_rank_product_svd([s[b_n] for s in sites], [s[a_n] for s in sites], coefs)
        got = 2.0 * result.state[b_n].double() @ result.state[a_n].double()
        sq_m += float(m.pow(2).sum())
        sq_res += float((m - got).pow(2).sum())
        sq_best += float(sv[rank:].double().pow(2).sum())
    return math.sqrt(sq_res / sq_m), math.sqrt(sq_best / sq_m)


def test_randomized_path_is_close_to_the_best_low_rank_average_and_reports_its_loss():
    sites = _sites(30)
    weights, scalings = [float(10 + i) for i in range(30)], [2.0] * 30
    res = exact_lora(sites, weights, scalings, rank=8, global_scaling=2.0, method="randomized")
    err, best = _errors(sites, weights, scalings, 8, res)
    print(f"randomized: error {err:.5f}, best rank-8 {best:.5f}, reported residual {res.residual:.5f}")
    assert res.method == "randomized" and res.residual_estimated
    assert best > 1e-3                                  # a real truncation, not a trivially exact problem
    assert err <= 1.1 * best                            # within 10 % of the optimum error (second order)
    assert res.residual == pytest.approx(err, rel=0.15)  # the estimate tracks the truth


def test_randomized_path_is_exact_when_the_average_has_the_global_rank():
    """FFA-LoRA-like sites (one shared A): the average is rank 8 and must come out exactly."""
    sites = _sites(40, shared_a=True)
    res = exact_lora(sites, [1.0] * 40, [2.0] * 40, rank=8, global_scaling=2.0, method="randomized")
    err, _ = _errors(sites, [1.0] * 40, [2.0] * 40, 8, res)
    assert err < 1e-5 and res.residual < 1e-5


def test_flat_spectrum_estimate_and_mixed_ranks():
    """Unrelated sites at ranks 2..8: no rank-8 summary is good, but the loss is reported honestly."""
    ranks = [2, 4, 8] * 10
    sites = _sites(30, ranks=ranks, noise=None)
    scalings = [16.0 / r for r in ranks]
    res = exact_lora(sites, [1.0] * 30, scalings, rank=8, global_scaling=2.0)
    err, best = _errors(sites, [1.0] * 30, scalings, 8, res)
    assert res.method == "randomized"                   # total rank 140 > EXACT_MAX_TOTAL_RANK
    assert best > 0.5 and err <= 1.3 * best
    assert res.residual == pytest.approx(err, rel=0.1)


def test_auto_keeps_the_exact_path_for_few_sites_and_results_are_reproducible():
    few = _sites(3)
    assert 3 * 8 <= EXACT_MAX_TOTAL_RANK
    res = exact_lora(few, [1, 2, 3], [2.0] * 3, rank=8, global_scaling=2.0)
    assert res.method == "exact" and not res.residual_estimated
    many = _sites(20)
    one = exact_lora(many, [1.0] * 20, [2.0] * 20, rank=8, global_scaling=2.0, seed=1)
    two = exact_lora(many, [1.0] * 20, [2.0] * 20, rank=8, global_scaling=2.0, seed=1)
    other = exact_lora(many, [1.0] * 20, [2.0] * 20, rank=8, global_scaling=2.0, seed=2)
    assert all(torch.equal(one.state[n], two.state[n]) for n in one.state) and one.residual == two.residual
    # the basis comes from the averaged B, not from the seed: only the residual's probes are random
    assert all(torch.equal(one.state[n], other.state[n]) for n in one.state)
    assert other.residual != one.residual and other.residual == pytest.approx(one.residual, rel=0.3)
    with pytest.raises(ValueError, match="unknown exact-lora method"):
        exact_lora(many, [1.0] * 20, [2.0] * 20, rank=8, global_scaling=2.0, method="svd")


def test_float32_fedavg_matches_a_float64_average_at_many_sites():
    g = torch.Generator().manual_seed(3)
    sites = [{"w": torch.randn(1000, generator=g), "steps": torch.tensor([i], dtype=torch.int64)} for i in range(100)]
    weights = [float(i % 7 + 1) for i in range(100)]
    got = weighted_average(sites, weights)
    want = sum(s["w"].double() * w for s, w in zip(sites, weights)) / sum(weights)
    assert got["w"].dtype == torch.float32 and got["steps"].dtype == torch.int64
    assert float((got["w"].double() - want).abs().max() / want.abs().max()) < 1e-6


def test_screening_rejects_an_update_whose_norm_overflows():
    ref = {"w": torch.zeros(4)}
    ups = [{"w": torch.full((4,), 0.1)}, {"w": torch.full((4,), 3e38)}]
    res = screen_updates(ups, ref)
    assert res.accepted == [0] and "overflows" in res.rejected[1]


def test_screening_norms_equal_the_plain_formula_for_every_site():
    """update_norms goes tensor by tensor across the sites on worker threads, with one difference
    buffer per tensor: every site's norm must still be its own, across shapes, dtypes, a tensor
    the reference lacks and one a site lacks, and a non-finite site must not leak into another's."""
    from mllm_dr.aggregation import update_norms

    g = torch.Generator().manual_seed(5)
    ref = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(9, generator=g).half()}
    ref |= {f"layer{i}": torch.randn(50, 7, generator=g) for i in range(12)}
    ups = [{"a": torch.randn(6, 4, generator=g).to(dt), "b": torch.randn(9, generator=g).half(),
            "extra": torch.randn(3, generator=g), "steps": torch.tensor([7 + i]),
            **{f"layer{j}": torch.randn(50, 7, generator=g) for j in range(12)}}
           for i, dt in enumerate((torch.float32, torch.float16, torch.bfloat16, torch.float64))]
    ref["steps"] = torch.tensor([2])
    del ups[2]["layer3"]
    ups[1]["a"][0, 0] = float("inf")
    before = torch.get_num_threads()
    torch.set_num_threads(2)                                 # two workers share the tensors
    try:
        got = update_norms(ups, ref)
    finally:
        torch.set_num_threads(before)
    want = [math.sqrt(sum(float((t.double() - ref[n].double()).pow(2).sum()) if n in ref else float(t.double().pow(2).sum())
                          for n, t in u.items())) for u in ups]
    assert not math.isfinite(got[1])
    assert [x for i, x in enumerate(got) if i != 1] == pytest.approx([x for i, x in enumerate(want) if i != 1], rel=1e-3)  # half - half rounds in half
    res = screen_updates(ups, ref)
    assert 1 in res.rejected and "non-finite values in a" in res.rejected[1]
    assert res.norms[0] == pytest.approx(want[0], rel=1e-5) and res.norms[3] == pytest.approx(want[3], rel=1e-5)


def test_sites_whose_factors_cancel_in_the_average_fall_back_to_a_gaussian_range_finder():
    """B_k A_k = (-B_k)(-A_k): the averaged B is zero, the averaged update is not."""
    half = _sites(15)
    sites = half + [{n: -t for n, t in s.items()} for s in half]
    res = exact_lora(sites, [1.0] * 30, [2.0] * 30, rank=8, global_scaling=2.0, method="randomized")
    err, best = _errors(sites, [1.0] * 30, [2.0] * 30, 8, res)
    assert err <= 1.1 * best and res.residual == pytest.approx(err, rel=0.15)


def test_server_learning_rate_scales_the_step_from_the_global_exactly():
    """FedOpt's server step: new = old + lr * (average - old); for exact-lora on the products. With a
    rank that holds the whole combination the re-factorized product is that line exactly; lr 1 is
    plain averaging, bit for bit."""
    from mllm_dr.aggregation import server_step

    sites = _sites(2, rank=4, d_out=24, d_in=20, layers=1, seed=3)
    old = _sites(1, rank=4, d_out=24, d_in=20, layers=1, seed=4)[0]
    for s in (*sites, old):
        s["maa.w"] = torch.randn(5)
    a_n, b_n = f"{PREFIX.format(i=0)}.lora_A.weight", f"{PREFIX.format(i=0)}.lora_B.weight"
    weights, lr = [1.0, 3.0], 2.5
    plain = exact_lora(sites, weights, [1.0, 1.0], 12, 1.0)
    same = exact_lora(sites, weights, [1.0, 1.0], 12, 1.0, reference=old, server_lr=1.0)
    assert all(torch.equal(plain.state[n], same.state[n]) for n in plain.state)
    stepped = exact_lora(sites, weights, [1.0, 1.0], 12, 1.0, reference=old, server_lr=lr)
    product = lambda st: st[b_n].double() @ st[a_n].double()                    # noqa: E731
    avg = sum(w / 4.0 * product(s) for s, w in zip(sites, weights))
    want = product(old) + lr * (avg - product(old))
    assert torch.allclose(product(stepped.state), want, atol=1e-5) and stepped.residual < 1e-6
    maa_avg = (sites[0]["maa.w"] + 3 * sites[1]["maa.w"]) / 4
    assert torch.allclose(stepped.state["maa.w"], old["maa.w"] + lr * (maa_avg - old["maa.w"]), atol=1e-6)
    dense = server_step(old, weighted_average(sites, weights), lr)
    assert torch.allclose(dense[b_n], old[b_n] + lr * (weighted_average(sites, weights)[b_n] - old[b_n]), atol=1e-6)
    assert server_step(old, plain.state, 1.0) is plain.state
    with pytest.raises(ValueError, match="reference"):
        exact_lora(sites, weights, [1.0, 1.0], 12, 1.0, server_lr=2.0)


def test_randomized_path_gives_zeros_for_a_layer_no_site_moved():
    """All B = 0 (a layer no site trained): the randomized path returns a zero product (B = 0; A fresh rows,
    so the layer can still learn: `refactorize`), finite, and reports no loss."""
    sites = _sites(40)
    for s in sites:
        for n in s:
            if "lora_B" in n:
                s[n] = torch.zeros_like(s[n])
    res = exact_lora(sites, [1.0] * 40, [2.0] * 40, rank=8, global_scaling=2.0, method="randomized")
    lora = {n: t for n, t in res.state.items() if "lora_" in n}
    assert len(lora) == 4 and all(torch.isfinite(t).all() for t in lora.values())
    assert all(not t.any() for n, t in lora.items() if "lora_B" in n)
    assert all((t.norm(dim=1) > 0).all() for n, t in lora.items() if "lora_A" in n)
    assert res.residual == 0.0


def test_the_aggregate_is_float32_whatever_dtype_the_first_site_sent():
    """The aggregate took the alphabetically first site's dtype: one bf16 reply rounded every site's contribution
    (an error 1.25x a small round's step; an aggregation review, session 45). It is float32, and equals the float32
    average."""
    from mllm_dr.aggregation import weighted_average

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=gen) * 0.05
    steps = [torch.randn(64, generator=gen) * 1e-4 for _ in range(3)]
    sites = [base + d for d in steps]
    got = weighted_average([{"w": sites[0].bfloat16()}, {"w": sites[1]}, {"w": sites[2]}], [1, 1, 1])["w"]
    want = weighted_average([{"w": s} for s in (sites[0].bfloat16().float(), sites[1], sites[2])], [1, 1, 1])["w"]
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-7)


def test_an_honest_site_at_its_own_rank_is_measured_from_where_it_started():
    """A rank-4 site starts from the rank-16 global re-expressed at rank 4 (``resize_lora``); measured against the
    full global, its distance held that truncation (49% of the product's energy here) and it was rejected as an
    outlier every round although it stepped as far as the others (an aggregation review, session 45)."""
    from mllm_dr.aggregation import resize_lora
    from mllm_dr.config import LoRAConfig

    g = torch.Generator().manual_seed(0)
    run = LoRAConfig(r=16, alpha=32)
    s, d, step = run.scaling, 64, 0.002
    a_name, b_name = "lora.l.q_proj.lora_A.weight", "lora.l.q_proj.lora_B.weight"
    glob = {a_name: torch.randn(16, d, generator=g) * 0.05, b_name: torch.randn(d, 16, generator=g) * 0.05,
            "maa.w": torch.zeros(4)}

    def site(rank):
        start = glob if rank == 16 else resize_lora(glob, rank, s, run.at_rank(rank).scaling)
        return {a_name: start[a_name] + step * torch.randn(rank, d, generator=g),
                b_name: start[b_name] + step * torch.randn(d, rank, generator=g), "maa.w": step * torch.randn(4, generator=g)}

    ups = [site(16), site(16), site(4)]
    res = screen_updates(ups, glob, 3.0, [s, s, run.at_rank(4).scaling], s)
    assert res.rejected == {} and max(res.norms) < 2 * min(res.norms)


@pytest.mark.parametrize("server_lr", [1.0, 1.5])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_a_site_at_its_own_rank_adds_its_step_not_its_truncation_of_the_global(method, server_lr):
    """Each site's contribution is its step from where it started: for a rank-4 site of a rank-16 run, the
    global cut to rank 4. Averaging its whole product pulled the global toward rank 4 every round: with nobody
    training (every site sends back its start) the global product moved by ~0.2 of its norm (an aggregation
    review, session 45). Now a no-training round keeps it, and a training round adds the weighted steps."""
    from mllm_dr.aggregation import resize_lora
    from mllm_dr.config import LoRAConfig

    g = torch.Generator().manual_seed(1)
    run = LoRAConfig(r=16, alpha=32)
    s, s4, d = run.scaling, run.at_rank(4).scaling, 48
    a_name, b_name = "lora.l.q_proj.lora_A.weight", "lora.l.q_proj.lora_B.weight"
    glob = {a_name: torch.randn(16, d, generator=g) * 0.1, b_name: torch.randn(d, 16, generator=g) * 0.1}
    start4 = resize_lora(glob, 4, s, s4)

    def product(st, sc):
        return sc * st[b_name].double() @ st[a_name].double()

    still = exact_lora([dict(glob), dict(glob), dict(start4)], [1, 1, 2], [s, s, s4], 16, s, method=method,
                       reference=glob, server_lr=server_lr)
    before = product(glob, s)
    assert float((product(still.state, s) - before).norm() / before.norm()) < 2e-4

    step = 0.01
    ups = [{a_name: st[a_name] + step * torch.randn(st[a_name].shape, generator=g),
            b_name: st[b_name] + step * torch.randn(st[b_name].shape, generator=g)}
           for st in (glob, glob, start4)]
    res = exact_lora(ups, [1, 1, 2], [s, s, s4], 16, s, method=method, reference=glob, server_lr=server_lr)
    steps = [product(u, sc) - product(st, sc) for u, sc, st in zip(ups, [s, s, s4], [glob, glob, start4])]
    want = before + server_lr * (0.25 * steps[0] + 0.25 * steps[1] + 0.5 * steps[2])
    _, sv, _ = torch.linalg.svd(want)
    best = float(sv[16:].pow(2).sum().sqrt())          # what rank 16 cannot hold
    err = float((product(res.state, s) - want).norm())
    assert err <= best * (1.05 if method == "exact" else 1.2) + 1e-4 * float(want.norm()), (err, best)


@pytest.mark.parametrize("ranks", [[16, 8, 4, 4], [16, 32, 4], [32, 32]])
def test_sites_below_and_above_the_global_rank_keep_a_still_global_and_the_exact_path(ranks):
    """Sites at several ranks, none training: the global product stays. The corrections fold into one term of the
    rank the own-rank sites lack, so 3 sites at 16 and one at 8 stay on the exact path (64), and a site above the
    global's rank needs none (a second read, session 46: they added 16 + each distinct rank, and a rank-32 site a
    term that cancelled to zero, moving such rounds to the randomized path)."""
    from mllm_dr.aggregation import own_rank_corrections, resize_lora
    from mllm_dr.config import LoRAConfig

    g = torch.Generator().manual_seed(2)
    run, d = LoRAConfig(r=16, alpha=32), 40
    a_name, b_name = "lora.l.q_proj.lora_A.weight", "lora.l.q_proj.lora_B.weight"
    glob = {a_name: torch.randn(16, d, generator=g) * 0.1, b_name: torch.randn(d, 16, generator=g) * 0.1}
    scal = [run.at_rank(r).scaling for r in ranks]
    starts = [resize_lora(glob, r, run.scaling, sc) for r, sc in zip(ranks, scal)]
    res = exact_lora(starts, [1.0] * len(ranks), scal, 16, run.scaling, reference=glob)
    before = run.scaling * glob[b_name].double() @ glob[a_name].double()
    after = run.scaling * res.state[b_name].double() @ res.state[a_name].double()
    assert float((after - before).norm() / before.norm()) < 1e-5
    extra = own_rank_corrections(starts, [1 / len(ranks)] * len(ranks), scal, glob, run.scaling)
    lacking = 16 - min([r for r in ranks if r < 16], default=16)
    assert sum(t[a_name].shape[0] for t, _ in extra) == lacking
    assert res.method == "exact"


def test_three_sites_at_the_global_rank_and_one_below_stay_exact():
    """3 x 16 + 8 + the 8 the rank-8 site lacks = 64 <= EXACT_MAX_TOTAL_RANK: the auto method stays exact."""
    from mllm_dr.aggregation import resize_lora
    from mllm_dr.config import LoRAConfig

    g = torch.Generator().manual_seed(3)
    run = LoRAConfig(r=16, alpha=32)
    a_name, b_name = "lora.l.q_proj.lora_A.weight", "lora.l.q_proj.lora_B.weight"
    glob = {a_name: torch.randn(16, 30, generator=g), b_name: torch.randn(30, 16, generator=g)}
    ups = [dict(glob), dict(glob), dict(glob), resize_lora(glob, 8, run.scaling, run.at_rank(8).scaling)]
    res = exact_lora(ups, [1.0] * 4, [run.scaling] * 3 + [run.at_rank(8).scaling], 16, run.scaling, reference=glob)
    assert res.method == "exact"


def test_a_site_with_more_examples_may_step_further_in_proportion_but_no_further():
    """Rounds are epochs, so a site with 10x the median site's examples takes 10x the steps: its honest update
    was rejected by the 3 x median screen every round (an aggregation review, session 45). Its bound grows with
    its examples over the median site's; a small site keeps the plain bound, and without counts nothing changes."""
    ref = {"w": torch.zeros(8)}
    def at(norm):
        return {"w": torch.full((8,), norm / math.sqrt(8))}
    honest = [at(1.0), at(1.1), at(0.9), at(9.5)]
    examples = [10.0, 12.0, 9.0, 100.0]
    assert 3 in screen_updates(honest, ref).rejected                     # the plain screen drops the big site
    res = screen_updates(honest, ref, examples=examples)
    assert res.rejected == {}
    attacker = [at(1.0), at(1.1), at(0.9), at(9.5)]                      # 9.5x the median with the median's data
    res = screen_updates(attacker, ref, examples=[10.0, 12.0, 9.0, 11.0])
    assert list(res.rejected) == [3] and "median" in res.rejected[3]
    too_far = screen_updates([at(1.0), at(1.1), at(0.9), at(40.0)], ref, examples=examples)
    assert list(too_far.rejected) == [3] and "its examples over the median site's" in too_far.rejected[3]
    # declaring 1000x the median's examples buys at most MAX_EXAMPLES_ALLOWANCE x (a second read, session 46)
    huge = screen_updates([at(1.0), at(1.1), at(0.9), at(200.0)], ref, examples=[10.0, 12.0, 9.0, 10_000.0])
    assert list(huge.rejected) == [3]
    assert screen_updates([at(1.0), at(1.1), at(0.9), at(25.0)], ref, examples=[10.0, 12.0, 9.0, 10_000.0]).rejected == {}
