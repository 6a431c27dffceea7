"""Benchmark: the verbatim-quotes rule (mllm_dr/quotes.py) on a trained workspace.

The same model and participants scored twice in one process: decoding without the rule (the
baseline: plain greedy) and with it (the kit's default). Prints JSON: per arm the rationale
checks (item-grounded, repeated, opposite severity), CCC, item MAE, format violations and wall
time, and how many item scores differ between the two.

    .venv/bin/python -m bench.quotes --workspace /tmp/mllmdr-demo/ws-site1 --split test
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from cli.common import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="a site workspace with trained adapters")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cli.site_model import Adapters, adapter_choice, load_model
    from mllm_dr.evaluation import evaluate_split
    from mllm_dr.workspace import resolve_workspace

    ws = resolve_workspace(args.workspace)
    sm = load_model(ws, Adapters.auto, None, "cpu")     # what `mllmdr-site evaluate` would use
    report, items = {"workspace": str(args.workspace), "adapters": adapter_choice(ws, Adapters.auto)[0]}, {}
    for name, rule in (("plain_greedy", False), ("verbatim_quotes", True)):
        t = time.perf_counter()
        result = evaluate_split(ws, sm, args.split, args.max_new_tokens, verbatim_quotes=rule)
        m = result.metrics()
        report[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
                        if k.startswith("rationale_") or k in ("n", "n_items", "ccc", "item_mae", "format_violation_rate")}
        report[name]["seconds"] = round(time.perf_counter() - t, 1)
        items[name] = [(r["participant"], k, v["pred"]) for r in result.rows for k, v in r["items"].items()]
    report["item_scores_changed"] = sum(a != b for a, b in zip(items["plain_greedy"], items["verbatim_quotes"]))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
