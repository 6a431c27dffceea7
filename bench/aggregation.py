"""Benchmark: center-side aggregation cost vs the number of sites, beside a plain fp32 accumulate.

For each number of sites, random LoRA updates of the given base-model shapes (rank 16, q and v
projections per layer) are aggregated by every mode, timed against a baseline that reads the
same bytes: ``acc.add_(t, alpha=c)`` per tensor per site, in float32, in the same process.

- ``fedavg``: ``weighted_average`` of A and B (and its error: none, it is linear).
- ``exact_lora_new``: ``exact_lora`` as the center runs it (method "auto": randomized above
  EXACT_MAX_TOTAL_RANK, which every site count here exceeds).
- ``exact_lora_old``: the exact stacked-QR path (method "exact"); slow at many sites, so it runs
  on ``--old-layers`` layers and is scaled to all layers (per-layer cost x layers; stated in JSON).
- ``sum_only``: ``weighted_average`` of B alone (FFA-LoRA: A frozen and shared, only B travels);
  its ratio is to a baseline over the B bytes only.
- ``screen``: ``screen_updates``, which the center runs before any mode.

``exact_lora_error`` compares, on one layer (q and v), the randomized result with the best
rank-r factorization (the exact path): relative errors ||M - M_hat||_F / ||M||_F, the excess
over the best error, and the residual the result reports (estimated) beside the true one, for
two kinds of updates: "shared" (a common factor pair + 10% independent noise per site: every
site starts a round from the same global adapter) and "independent" (unrelated random factors:
a flat spectrum, the worst case). ``--codec`` adds uplink encode/decode time for one site's update.
``--breakdown`` times the randomized path's phases on layer 0 at the largest site count, one
thread (as each ``map_layers`` worker runs), beside the plain accumulate of the same factors: the
averaged-B pass, the projection Q^T M as the center runs it (rank + PROBES rows) and at rank rows
alone (what dropping the error estimate would save), and the final QR + SVD.

    .venv/bin/python -m bench.aggregation --sites 10,50,100 --shape llama3-8b
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import threading
import time

import torch

from bench.common import comma_list, positive_int
from mllm_dr.aggregation import (PROBES, _averaged_b, _orthonormal, _project, _svd_of_projection, exact_lora,
                                 low_rank_product_svd, randomized_product_svd, screen_updates, weighted_average)

SHAPES = {  # name: (layers, {projection: (out, in)})
    "llama3-8b": (32, {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}),
    "smollm2": (30, {"q_proj": (576, 576), "v_proj": (192, 576)}),   # GQA: 3 kv heads x 64
}
RANK, SCALING = 16, 2.0
NAME = "lora.base_model.model.model.layers.{i}.self_attn.{p}.{f}.weight"


def make_sites(shape: str, layers: int, sites: int, kind: str, seed: int) -> list[dict[str, torch.Tensor]]:
    """Site updates: 'shared' = common factors + 10% noise per site, 'independent' = unrelated factors."""
    g = torch.Generator().manual_seed(seed)
    states = [{} for _ in range(sites)]
    for i in range(layers):
        for p, (d_out, d_in) in SHAPES[shape][1].items():
            b0, a0 = torch.randn(d_out, RANK, generator=g), torch.randn(RANK, d_in, generator=g)
            for st in states:
                b, a = torch.randn(d_out, RANK, generator=g), torch.randn(RANK, d_in, generator=g)
                if kind == "shared":
                    b.mul_(0.1).add_(b0)
                    a.mul_(0.1).add_(a0)
                st[NAME.format(i=i, p=p, f="lora_B")], st[NAME.format(i=i, p=p, f="lora_A")] = b, a
    return states


def baseline(states, weights):
    """The yardstick: a plain float32 weighted accumulate of every tensor, in place."""
    total = sum(weights)
    for n in states[0]:
        acc = torch.zeros_like(states[0][n])
        for s, w in zip(states, weights):
            acc.add_(s[n], alpha=w / total)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_extra_mb(fn) -> float:
    """Resident memory above the level before ``fn``, sampled every ~1 ms from /proc/self/statm."""
    start, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return round((max(peak[0], _rss()) - start) / 2 ** 20, 1)


def time_modes(modes: dict, repeats: int) -> dict:
    """Interleaved repeats (every mode once per round), so load from other processes hits all alike."""
    walls = {m: [] for m in modes}
    for _ in range(repeats):
        for m, fn in modes.items():
            t = time.perf_counter()
            fn()
            walls[m].append(time.perf_counter() - t)
    return {m: {"wall_s": min(w), "wall_median_s": sorted(w)[len(w) // 2]} for m, w in walls.items()}


def run_sites(args, k: int) -> dict:
    states = make_sites(args.shape, args.layers, k, "shared", args.seed)
    weights = torch.randint(20, 200, (k,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    scalings = [SCALING] * k
    b_only = [{n: t for n, t in s.items() if "lora_B" in n} for s in states]
    reference = {n: torch.zeros_like(t) for n, t in states[0].items()}
    old_names = {n for n in states[0] if int(n.split("layers.")[1].split(".")[0]) < args.old_layers}
    old_states = [{n: t for n, t in s.items() if n in old_names} for s in states]
    modes = {
        "baseline": lambda: baseline(states, weights),
        "fedavg": lambda: weighted_average(states, weights),
        "exact_lora_new": lambda: exact_lora(states, weights, scalings, RANK, SCALING),
        "baseline_b_only": lambda: baseline(b_only, weights),
        "sum_only": lambda: weighted_average(b_only, weights),
        "screen": lambda: screen_updates(states, reference),
    }
    out = time_modes(modes, args.repeats)
    for m, fn in modes.items():
        out[m]["peak_extra_mb"] = peak_extra_mb(fn)
    t = time.perf_counter()         # the slow exact path: once, timed and sampled together, on a few layers
    mem = peak_extra_mb(lambda: exact_lora(old_states, weights, scalings, RANK, SCALING, method="exact"))
    scale = args.layers / args.old_layers
    out["exact_lora_old"] = {"wall_s": (time.perf_counter() - t) * scale, "peak_extra_mb": mem,
                             "derived": f"measured once on {args.old_layers} layer(s), x {scale:g} (per-layer cost "
                                        f"x layers)" if scale != 1 else "measured once on all layers"}
    for m, r in out.items():
        if not m.startswith("baseline"):
            r["ratio_to_baseline"] = round(r["wall_s"] / out["baseline_b_only" if m == "sum_only" else "baseline"]["wall_s"], 2)
    for r in out.values():
        r |= {k: round(r[k], 4) for k in ("wall_s", "wall_median_s") if k in r}
    res = exact_lora(states, weights, scalings, RANK, SCALING)
    out["exact_lora_new"].update(method=res.method, residual_reported=round(res.residual, 6))
    return {"bytes_per_site": sum(t.numel() * t.element_size() for t in states[0].values()), "modes": out}


def error_vs_best(args, k: int, kind: str) -> dict:
    """Randomized vs exact on layer 0 (q and v): errors relative to ||M||_F, summed over both, and
    each method's wall time there, called directly (the randomized one includes its Gaussian fallback
    when the sites disagree, as "independent" sites do)."""
    states = make_sites(args.shape, 1, k, kind, args.seed + 1)
    coefs = [1.0 / k] * k
    sq = {"norm": 0.0, "best": 0.0, "new": 0.0, "diff": 0.0, "reported": 0.0, "exact_s": 0.0, "randomized_s": 0.0}
    for p in SHAPES[args.shape][1]:
        bs = [s[NAME.format(i=0, p=p, f="lora_B")] for s in states]
        as_ = [s[NAME.format(i=0, p=p, f="lora_A")] for s in states]
        m = torch.cat([c * b.double() for b, c in zip(bs, coefs)], 1) @ torch.cat([a.double() for a in as_])
        t = time.perf_counter()
        u, s, vh = low_rank_product_svd(bs, as_, coefs)
        sq["exact_s"] += time.perf_counter() - t
        best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        t = time.perf_counter()
        ur, sr, vhr, missed = randomized_product_svd(bs, as_, coefs, RANK, torch.Generator().manual_seed(args.seed))
        sq["randomized_s"] += time.perf_counter() - t
        new = (ur[:, :RANK] * sr[:RANK]) @ vhr[:RANK]
        sq["norm"] += float(m.pow(2).sum())
        sq["best"] += float((m - best).pow(2).sum())
        sq["new"] += float((m - new).pow(2).sum())
        sq["diff"] += float((new - best).pow(2).sum())
        sq["reported"] += float(sr[RANK:].pow(2).sum()) + missed
    rel = {n: math.sqrt(sq[n] / sq["norm"]) for n in ("best", "new", "diff", "reported")}
    return {"best_rank_r_error": round(rel["best"], 6), "new_error": round(rel["new"], 6),
            "excess_over_best": round(rel["new"] / rel["best"] - 1, 5), "distance_to_best": round(rel["diff"], 6),
            "residual_reported": round(rel["reported"], 6), "residual_true": round(rel["new"], 6),
            "layer0_wall_s": {"exact": round(sq["exact_s"], 3), "randomized": round(sq["randomized_s"], 3)}}


def best_of(fn, repeats: int = 5):
    """(result, least wall time in seconds) over ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def codec(args) -> dict:
    """Uplink encode/decode of one site's LoRA update (all layers), per mode; bitsandbytes for comparison."""
    from mllm_dr.compression import MODES, decode, encode, wire_bytes

    update = make_sites(args.shape, SHAPES[args.shape][0], 1, "shared", args.seed)[0]
    out = {"values": sum(t.numel() for t in update.values()), "timing": "least of 5 calls"}
    for mode in MODES:
        wire, t_enc = best_of(lambda: encode(update, mode))
        back, t_dec = best_of(lambda: decode(wire))
        err = max(float((back[n] - x).norm() / x.norm()) for n, x in update.items())
        out[mode] = {"encode_s": round(t_enc, 4), "decode_s": round(t_dec, 4), "bytes": wire_bytes(wire),
                     "worst_tensor_relative_error": round(err, 6)}
    try:
        import bitsandbytes.functional as bnbf

        enc, t_enc = best_of(lambda: {n: bnbf.quantize_blockwise(x, blocksize=64) for n, x in update.items()})
        back, t_dec = best_of(lambda: {n: bnbf.dequantize_blockwise(q, st) for n, (q, st) in enc.items()})
        err = max(float((back[n] - x).norm() / x.norm()) for n, x in update.items())
        out["bitsandbytes_blockwise8"] = {"encode_s": round(t_enc, 4), "decode_s": round(t_dec, 4),
                                          "worst_tensor_relative_error": round(err, 6)}
    except Exception as e:          # optional comparison only
        out["bitsandbytes_blockwise8"] = {"error": str(e)[:200]}
    return out


def breakdown(args, k: int) -> dict:
    """Milliseconds per phase of the randomized exact-lora path on layer 0 (q and v), one thread."""
    states = make_sites(args.shape, 1, k, "shared", args.seed)
    coefs = [1.0 / k] * k
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {"sites": k, "threads": 1, "timing": "least of 7 calls, milliseconds"}

    def least_ms(fn):
        return round(best_of(fn, 7)[1] * 1e3, 3)

    try:
        for p in SHAPES[args.shape][1]:
            layer = [{n: t for n, t in s.items() if f".{p}." in n} for s in states]
            bs = [s[NAME.format(i=0, p=p, f="lora_B")] for s in layer]
            as_ = [s[NAME.format(i=0, p=p, f="lora_A")] for s in layer]
            q = _orthonormal(_averaged_b(bs, coefs))
            gen = torch.Generator().manual_seed(args.seed)
            x, _ = _project(bs, as_, coefs, q, gen)
            t = {"plain_accumulate": least_ms(lambda: baseline(layer, [1.0] * k)),
                 "averaged_b_pass": least_ms(lambda: _averaged_b(bs, coefs)),
                 f"projection_{q.shape[1] + PROBES}_rows": least_ms(lambda: _project(bs, as_, coefs, q, gen)),
                 f"projection_{q.shape[1]}_rows_no_estimate": least_ms(lambda: _project(bs, as_, coefs, q, gen, probes=0)),
                 "final_qr_svd": least_ms(lambda: _svd_of_projection(q, x))}
            path = t["averaged_b_pass"] + t[f"projection_{q.shape[1] + PROBES}_rows"] + t["final_qr_svd"]
            no_est = t["averaged_b_pass"] + t[f"projection_{q.shape[1]}_rows_no_estimate"] + t["final_qr_svd"]
            out[p] = t | {"ratio_path_to_plain": round(path / t["plain_accumulate"], 2),
                          "ratio_without_estimate_to_plain": round(no_est / t["plain_accumulate"], 2)}
    finally:
        torch.set_num_threads(before)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="10,50,100", type=comma_list(positive_int, "site count"),
                    help="comma-separated numbers of sites")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=positive_int, default=None, help="layers timed (default: all of the shape)")
    ap.add_argument("--old-layers", type=positive_int, default=2, help="layers the slow exact path runs on")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codec", action="store_true", help="also time the uplink codec on one site's update")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the randomized path's phases on layer 0 at the largest site count")
    args = ap.parse_args()
    args.layers = args.layers or SHAPES[args.shape][0]
    args.old_layers = min(args.old_layers, args.layers)
    libc = ctypes.CDLL("libc.so.6")           # M_MMAP_THRESHOLD = -3: big blocks are unmapped when freed,
    libc.mallopt(-3, 1 << 16)                  # so resident memory follows live tensors
    sites = args.sites
    report = {"shape": args.shape, "projections": SHAPES[args.shape][1], "layers": args.layers, "rank": RANK,
              "seed": args.seed, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "timing": "wall_s = min over interleaved repeats (median beside it); ratio = wall_s / baseline wall_s",
              "memory": "peak_extra_mb = resident memory above the level before the call, sampled every ~1 ms "
                        "from /proc/self/statm (glibc mmap threshold 64 KiB so freed tensors leave RSS)",
              "sites": {}, "exact_lora_error": {"layers": "layer 0, q and v"}}
    for k in sites:
        report["sites"][str(k)] = run_sites(args, k)
        report["exact_lora_error"][str(k)] = {kind: error_vs_best(args, k, kind) for kind in ("shared", "independent")}
    if args.codec:
        report["codec_one_site_update"] = codec(args)
    if args.breakdown:
        report["randomized_path_breakdown_layer0"] = breakdown(args, max(sites))
    report["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["load_average_1_5_15_min_at_end"] = [round(x, 2) for x in os.getloadavg()]   # the machine is shared
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
