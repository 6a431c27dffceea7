"""Benchmark: rounds per minute and peak memory of a rehearsed consortium vs the number of sites.

Each point is `mllmdr-center simulate` (fl_server/simulation.py: the real ServerApp and ClientApp
under Flower's simulation engine, Ray actors) with N virtual sites from a synthetic corpus split
N ways (4 participants per site, seed 0), one round per stage unless told, no dropouts. The
baseline, measured in the same process: the real 3-site deployment (bench/deployment.py: SuperLink
and 3 SuperNodes on 127.0.0.1, TLS, node authentication) with the same base, rounds and corpus size.

- rounds_per_minute: 60 x rounds / the rounds' wall time (history.json's round_seconds: from
  sending the global to the signed checkpoint);
- run_seconds: submit -> finished (Ray start, handshake, rounds, pooled evaluation);
- peak_rss_bytes: the peak resident memory of the process tree (SuperLink, simulation process,
  Ray and its actors; the real deployment: SuperLink and SuperNodes with their ClientApps);
- machine: CPUs and the load average before and after (other jobs sharing the machine).

    .venv/bin/python -m bench.simulation --sweep tiny-random=10,50,100 --sweep smollm2=3,10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from bench.common import fresh_output, non_negative_int, positive_int, positive_int_list

BENCH = "bench.simulation"


def sweep(text: str) -> tuple[str, list[int]]:
    """``--sweep BASE=N1,N2,...``: a base and its site counts (``--sweep foo`` ended in a traceback)."""
    base, eq, counts = text.partition("=")
    if not eq or not base.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write BASE=N1,N2,... (e.g. tiny-random=10,50)")
    return base.strip(), positive_int_list(counts)


def run_point(root: Path, base: str, sites: int, args) -> dict:
    from fl_server.simulation import rehearse

    plan = {"run-name": f"bench-{base}-{sites}", "base-model": base, "stage1-rounds": args.stage1_rounds,
            "stage2-rounds": args.stage2_rounds, "min-sites": 2, "eval-max-new-tokens": args.max_new_tokens, "evaluate": args.evaluate}
    out = rehearse(root / f"{base}-{sites}", sites, plan, args.participants, 0, 0.0, args.actors, timeout=7200)
    keep = ("sites", "base_model", "flower_status", "status", "error", "prepare_seconds", "run_seconds",
            "round_seconds", "rounds_per_minute", "peak_rss_bytes", "actors", "joined", "stray_pids")
    return {k: out[k] for k in keep}


def baseline(root: Path, base: str, args) -> dict:
    """The real deployment with 3 sites: SuperLink + SuperNodes, each ClientApp a fresh process."""
    from bench.deployment import LocalFederation
    from fl_server.simulation import PeakMemory
    from mllm_dr.synth import SynthConfig, write_synthetic
    from policies.schema import load_policy

    corpora = write_synthetic(SynthConfig(root / "corpus", "edaic", 3 * args.participants, 3, 0, 1.0))
    policy = load_policy().model_dump()
    with LocalFederation(root / "deployment", corpora, policies={f"site{i + 1}": policy for i in range(3)}) as fed:
        fed.setup()
        fed.start()
        with PeakMemory(*fed.pids()) as memory:      # the SuperLink and every SuperNode, with their children
            t0 = time.perf_counter()
            fed.run("baseline", "--base-model", base, "--stage1-rounds", args.stage1_rounds, "--stage2-rounds",
                    args.stage2_rounds, "--min-sites", 2, "--eval-max-new-tokens", args.max_new_tokens,
                    *([] if args.evaluate else ["--no-evaluate"]))
            run_seconds = time.perf_counter() - t0
        hist = fed.history("baseline")
        stray = fed.stop()
    seconds = [r["round_seconds"] for r in hist["rounds"]]
    return {"what": "real 3-site deployment (SuperLink + 3 SuperNodes, TLS, node auth)", "sites": 3,
            "base_model": base, "run_seconds": round(run_seconds, 2), "round_seconds": [round(s, 2) for s in seconds],
            "rounds_per_minute": round(60 * len(seconds) / sum(seconds), 3),
            "peak_rss_bytes": memory.peak, "stray_pids": stray}


def figure(points: list[dict], base_line: dict | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for base in dict.fromkeys(p["base_model"] for p in points):
        pts = sorted((p for p in points if p["base_model"] == base and p["rounds_per_minute"]), key=lambda p: p["sites"])
        a.plot([p["sites"] for p in pts], [p["rounds_per_minute"] for p in pts], "o-", label=f"simulation, {base}")
        b.plot([p["sites"] for p in pts], [p["peak_rss_bytes"] / 2**30 for p in pts], "o-", label=f"simulation, {base}")
    if base_line:
        label = f"real 3-site deployment, {base_line['base_model']}"
        a.plot([3], [base_line["rounds_per_minute"]], "k*", ms=12, label=label)
        b.plot([3], [base_line["peak_rss_bytes"] / 2**30], "k*", ms=12, label=label)
    a.set(xlabel="virtual sites", ylabel="rounds per minute", title="rounds per minute vs sites", xscale="log", yscale="log")
    b.set(xlabel="virtual sites", ylabel="peak resident memory (GiB)", title="peak memory vs sites", xscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("mllmdr-center simulate on a 2-core CPU (synthetic corpus, 4 participants per site)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    from cli.common import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="append", default=None, type=sweep,
                    help="BASE=N1,N2,... (repeatable); default tiny-random=10,50,100")
    ap.add_argument("--participants", type=positive_int, default=4, help="per virtual site")
    ap.add_argument("--stage1-rounds", type=non_negative_int, default=1)
    ap.add_argument("--stage2-rounds", type=non_negative_int, default=1)
    ap.add_argument("--evaluate", action="store_true", help="a pooled evaluation after the rounds (not timed)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=16, help="pooled evaluation's generation length")
    ap.add_argument("--actors", type=positive_int, default=2, help="ClientApps at a time (Ray actors)")
    ap.add_argument("--baseline", default="tiny-random", help="base of the real 3-site baseline; 'none' to skip")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-simulation"),
                    help="emptied first: only a folder this benchmark made, or an empty one")
    args = ap.parse_args()
    sweeps = args.sweep or [sweep("tiny-random=10,50,100")]
    if args.sweep:                                   # the report's config holds the text, as before
        args.sweep = [f"{base}={','.join(map(str, ns))}" for base, ns in sweeps]
    fresh_output(args.out, BENCH)                    # never a folder this benchmark did not make
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}, "baseline": None, "points": []}
    if args.baseline != "none":
        report["baseline"] = baseline(args.out / "baseline", args.baseline, args)
        print(json.dumps({"baseline": report["baseline"]}), flush=True)
    for base, ns in sweeps:
        for n in ns:
            report["points"].append(run_point(args.out, base, n, args))
            print(json.dumps(report["points"][-1]), flush=True)
            shutil.rmtree(args.out / f"{base}-{n}", ignore_errors=True)    # 100 workspaces add up
    report["machine"]["loadavg_after"] = os.getloadavg()     # other jobs on the machine: say so with the figures
    report["figure"] = str(figure(report["points"], report["baseline"], args.out / "simulation.png"))
    (args.out / "simulation.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
