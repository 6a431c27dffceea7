"""Benchmark: what secure aggregation costs per round, beside the plain round in the same process.

Computed part (always): for each base's real adapter shapes (the run's round-0 state) and each
stage's uplink (stage 1 ``lq.*``; stage 2 with ffa-lora: ``lora_B`` + ``maa.*``; and exact-lora's
A + B + MAA for reference), at K sites:
- messages per round (plain: train down + up; masked: + key exchange down + up);
- bytes up per site (plain float32; masked int64 ring elements + the weight) and the roster's bytes;
- CPU of one site's masking (K-1 X25519 + HKDF + ChaCha20 streams; measured) and of the center's
  unmasking (`unmask_sum` over K masked replies; measured), beside the plain weighted average of K updates;
- at K = 3 the whole pipeline, checked against the plain weighted average (max abs error).
Sites mask in parallel, so the round's added wall time is one site's masking + the unmasking +
the key exchange's message round trip (measured in the deployment part).

Deployment part (``--deployment``): a center and 3 sites on 127.0.0.1 (tiny-random, ffa-lora,
1 + 1 rounds, no evaluation), four runs on the same federation in the order plain, masked, masked,
plain (A B B A: the run that goes second finds warm caches, so each kind runs once early and once
late; compare each kind's two runs and the pairs): bytes up per site and wall time per round from
each run's history.

    .venv/bin/python -m bench.secagg --bases tiny-random,smollm2 --sites 3,10,50 [--deployment]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import comma_list, positive_int


def site_count(text: str) -> int:
    """A masked sum needs at least 2 sites (with fewer there is no one to mask against)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: a masked sum needs at least 2 sites")
    return value


def uplinks(base: str) -> dict[str, dict[str, torch.Tensor]]:
    from fl_server.plan import RunPlan
    from mllm_dr.base_model import base_info
    from mllm_dr.federated import RunSpec, allowed, initial_state

    out = {}
    for aggregation in ("ffa-lora", "exact-lora"):
        plan = RunPlan.model_validate({"center-dir": "/x", "run-name": "b", "aggregation": aggregation})
        spec = RunSpec("b", base, base_info(base).sha256, {"audio": 25, "visual": 49}, plan.architecture())
        state = initial_state(spec)
        for stage in (1, 2):
            if stage == 1 and aggregation == "exact-lora":
                continue
            name = "stage1" if stage == 1 else f"stage2-{aggregation}"
            out[name] = {n: t for n, t in state.items() if allowed(n, stage, spec.config)}
    return out


def _timed(fn, repeat: int = 1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return result, best


def one_shape(tensors: dict[str, torch.Tensor], k: int, full: bool) -> dict:
    """Plain vs masked costs of one round at ``k`` sites for this uplink."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from mllm_dr.adapters import state_bytes
    from mllm_dr.aggregation import weighted_average
    from mllm_dr.secagg import WEIGHT, apply_sum, format_roster, mask_update, public_hex, unmask_sum

    n = sum(t.numel() for t in tensors.values())
    names = [f"site{i:03d}" for i in range(k)]
    keys = {s: X25519PrivateKey.generate() for s in names}
    roster = {s: public_hex(key) for s, key in keys.items()}
    g = torch.Generator().manual_seed(0)
    sites = range(k) if full else range(1)
    ups = [{n_: t + 1e-3 * torch.randn(t.shape, generator=g) for n_, t in tensors.items()} for _ in sites]
    weights = [8 * (10 + i) for i in range(k)]
    masked, mask_s = [], []
    for i in sites:
        m, s = _timed(lambda i=i: mask_update(ups[i], tensors, weights[i], names[i], keys[names[i]], roster, "b", 1,
                                              1e6)[0], 2)
        masked.append(m)
        mask_s.append(s)
    plain_avg, avg_s = _timed(lambda: weighted_average([ups[0]] * k, weights), 2)
    # the center's whole step, unmasking and the division into the new global, against the plain average's
    # whole step (a benchmark review, session 43: apply_sum was left out of the masked side)
    if full:
        new, unmask_s = _timed(lambda: apply_sum(tensors, *unmask_sum(masked, tensors, sum(weights))), 2)
        exact = weighted_average(ups, weights)
        err = max(float((new[x].double() - exact[x].double()).abs().max()) for x in new)
    else:       # the center's work (unmask_sum) does not depend on the content: k copies of the one masked
        # reply, and the weight they sum to in the ring as the declared one (a benchmark review, session 41:
        # this timed a bare sum of random vectors, not unmask_sum's flattening and decoding)
        copies = [masked[0]] * k
        ring_weight = int((masked[0][WEIGHT].numpy().view(np.uint64) * np.uint64(k)).view(np.int64)[0])
        _, unmask_s = _timed(lambda: apply_sum(tensors, *unmask_sum(copies, tensors, ring_weight)), 2)
        err = None
    roster_bytes = len(format_roster(roster).encode())
    return {"sites": k, "coordinates": n,
            "plain": {"messages": 2 * k, "bytes_up_per_site": state_bytes(tensors), "center_combine_s": round(avg_s, 4)},
            "secagg": {"messages": 4 * k, "bytes_up_per_site": 8 * (n + 1), "key_exchange_bytes_up_per_site": 64,
                       "roster_bytes_down_per_site": roster_bytes, "site_mask_s": round(float(np.median(mask_s)), 4),
                       "center_unmask_s": round(unmask_s, 4), "max_abs_error_vs_plain_average": err}}


def computed(bases: list[str], ks: list[int]) -> dict:
    out = {}
    for base in bases:
        for name, tensors in uplinks(base).items():
            out[f"{base}/{name}"] = [one_shape(tensors, k, full=(k <= 3)) for k in ks]
            print(json.dumps({f"{base}/{name}": out[f"{base}/{name}"]}), flush=True)
    return out


def deployment(root: Path) -> dict:
    """Plain and masked ffa-lora runs (tiny-random, 3 sites), in the order A B B A, on one local federation."""
    from bench.deployment import LocalFederation
    from mllm_dr.synth import SynthConfig, write_synthetic
    from policies.schema import load_policy

    corpora = write_synthetic(SynthConfig(root / "synth", "edaic", participants=12, sites=3, seed=5, seconds=3.0))
    policy = load_policy().model_dump() | {"min_participants": 2}
    masked_policy = json.loads(json.dumps(policy))
    masked_policy["secagg"].update(enabled=True, min_sites=3)
    (root / "plain.json").write_text(json.dumps(policy))
    (root / "secagg.json").write_text(json.dumps(masked_policy))
    out = {}
    with LocalFederation(root / "fed", corpora, policies={f"site{i + 1}": policy for i in range(3)}) as fed:
        fed.setup()
        fed.start()
        # A B B A: the run that goes second finds warm caches (a benchmark review, session 43: one plain run
        # then one masked run understated the masked cost); compare each kind's two runs and the pairs
        for name in ("plain", "secagg", "secagg-2", "plain-2"):
            t0 = time.perf_counter()
            fed.run(name, "--base-model", "tiny-random", "--aggregation", "ffa-lora", "--stage1-rounds", "1",
                    "--stage2-rounds", "1", "--no-evaluate", "--min-sites", "3",
                    "--policy", root / f"{name.split('-')[0]}.json")
            hist = fed.history(name)
            out[name] = {"run_seconds": round(time.perf_counter() - t0, 1),
                         "rounds": [{"round": r["round"], "stage": r["stage"], "round_seconds": round(r["round_seconds"], 2),
                                     "slowest_site_train_seconds": round(max(s["train_seconds"] for s in r["sites"].values()), 2),
                                     "bytes_up_per_site": max(s["bytes_up"] for s in r["sites"].values()),
                                     "secagg": r["secagg"]} for r in hist["rounds"]]}
            print(json.dumps({name: out[name]}), flush=True)
    return out


def main() -> None:
    from cli.common import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bases", default="tiny-random,smollm2", type=comma_list(str, "base"),
                    help="comma-separated bases whose adapter shapes are measured")
    ap.add_argument("--sites", default="3,10,50", type=comma_list(site_count, "site count"),
                    help="comma-separated numbers of sites")
    ap.add_argument("--deployment", action="store_true", help="also run the 3-site deployment (real processes)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-secagg"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"computed": computed(args.bases, args.sites)}
    if args.deployment:
        report["deployment"] = deployment(args.out)
    (args.out / "secagg.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({"json": str(args.out / "secagg.json")}))


if __name__ == "__main__":
    main()
