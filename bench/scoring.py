"""Benchmark: scoring wall time per participant on CPU, torch fp32 vs ONNX Runtime fp32 vs ONNX int8,
batched (a participant's items in one batch, as `mllmdr-site score` runs) vs item by item.

The baseline (torch, batched: the kit's default path) runs in the same process, and the engines
take turns participant by participant so that other load on the machine weighs on all alike.
"Identical" counts the items whose score equals the torch batched score; "generated" the items
whose text followed the format (the others fall back to MAA, which makes identity easier).

    .venv/bin/python -m bench.scoring --workspace /tmp/ws     # trained adapters of a workspace
    .venv/bin/python -m bench.scoring --base-model smollm2     # a synthetic site, random adapters
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.common import check_fresh_output, comma_list, fresh_output, positive_int

ENGINES = ("torch", "onnx", "onnx-int8")
BENCH = "bench.scoring"


def engine_name(text: str) -> str:
    if text not in ENGINES:
        raise argparse.ArgumentTypeError(f"not one of {', '.join(ENGINES)}")
    return text


def synthetic_site(out: Path, base_model: str, participants: int):
    """A one-site synthetic workspace and a model with seeded random adapters (LoRA included)."""
    from mllm_dr.adapters import build_site_model
    from mllm_dr.base_model import load_base
    from mllm_dr.config import DEFAULT_MODEL
    from mllm_dr.corpus import read_corpus
    from mllm_dr.dataset import examples, labelled_training_instances
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.synth import SynthConfig, write_synthetic
    from mllm_dr.workspace import Workspace

    fresh_output(out, BENCH)                 # never a folder this benchmark did not make
    site = write_synthetic(SynthConfig(out / "corpus", "edaic", participants, 1, 0))[0]
    ws = Workspace.init(out / "ws", "bench")
    ws.config.corpus_path, ws.config.corpus_format = str(site), "edaic"
    ws.save()
    extract_corpus(read_corpus(site), FeatureStore(ws.features_dir), ws.config.extraction)
    base, tok, info = load_base(base_model)
    sm = build_site_model(base, tok, info, FeatureStore(ws.features_dir).dims(), DEFAULT_MODEL, seed=0)
    sm.model.enable_lora()
    sm.processor.fit_norms(examples(ws, labelled_training_instances(ws), 2))
    sm.model.eval()
    return ws, sm


def participants(ws, split: str | None, limit: int) -> list[list]:
    """Each participant's items as examples (the split's, or every participant's), at most ``limit``."""
    from mllm_dr.dataset import examples, instances_by_split

    splits = (split,) if split else ("train", "dev", "test")
    by: dict[str, list] = {}
    for inst in instances_by_split(ws, splits):
        by.setdefault(inst.participant, []).append(inst)
    return [examples(ws, insts, 2, with_answers=False) for insts in list(by.values())[:limit]]


def timed(fn) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    from cli.common import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, help="a site workspace with trained adapters (federated if it has them, else local)")
    ap.add_argument("--base-model", default="smollm2", help="without --workspace: the base of the random model")
    ap.add_argument("--participants", type=positive_int, default=4)
    ap.add_argument("--split", default=None, help="participants of this split only (default: any)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=48)
    ap.add_argument("--item-by-item", default=",".join(ENGINES), type=comma_list(engine_name, "engine", allow_empty=True),
                    help="engines also timed item by item (comma-separated; '' for none)")
    ap.add_argument("--threads", type=positive_int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-scoring"),
                    help="emptied first (the ONNX exports, the synthetic site): only a folder this benchmark made, "
                         "or an empty one")
    args = ap.parse_args()
    check_fresh_output(args.out, BENCH)          # refused before anything loads, never deleted
    torch.set_num_threads(args.threads)

    from mllm_dr.onnx_engine import make_engine
    from mllm_dr.scoring import score_examples

    load_before = os.getloadavg()
    if args.workspace:
        from cli.site_model import Adapters, adapter_choice, load_model
        from mllm_dr.workspace import resolve_workspace

        ws = resolve_workspace(args.workspace)
        sm = load_model(ws, Adapters.auto, None, "cpu")     # what `mllmdr-site score` would use
        adapters = f"{adapter_choice(ws, Adapters.auto)[0]} (adapters {sm.version})"
        cache = fresh_output(args.out, BENCH) / "onnx"            # setup times then include the export
    else:
        ws, sm = synthetic_site(args.out, args.base_model, max(args.participants * 2, 8))
        adapters = "random (seeded LQ-formers, MAA and LoRA; untrained)"
        cache = ws.checkpoints_dir / "onnx"
    people = participants(ws, args.split, args.participants)
    engines, setup = {}, {}
    for name in ENGINES:
        setup[name], engines[name] = timed(lambda name=name: make_engine(name, sm, cache, threads=args.threads))
    item_engines = args.item_by_item

    def run(engine, exs, batched: bool) -> list:
        if batched:
            return score_examples(sm, exs, args.max_new_tokens, engines[engine])
        return [s for ex in exs for s in score_examples(sm, [ex], args.max_new_tokens, engines[engine])]

    for name in ENGINES:                                          # warm-up: first-call allocations
        run(name, people[0][:2], True)
    modes = [(e, True) for e in ENGINES] + [(e, False) for e in item_engines]
    seconds = {m: [] for m in modes}
    scored = {m: [] for m in modes}
    for exs in people:                                            # interleaved: participant by participant
        for mode in modes:
            t, items = timed(lambda mode=mode: run(mode[0], exs, mode[1]))
            seconds[mode].append(t)
            scored[mode].append(items)

    reference = [s for items in scored[("torch", True)] for s in items]
    results = {}
    for (engine, batched), ts in seconds.items():
        items = [s for part in scored[(engine, batched)] for s in part]
        base_ts = seconds[("torch", True)]
        results[f"{engine} {'batched' if batched else 'item-by-item'}"] = {
            "s_per_participant_median": round(statistics.median(ts), 2), "s_per_participant_mean": round(statistics.mean(ts), 2),
            "s_per_participant_min_max": [round(min(ts), 2), round(max(ts), 2)],
            "speedup_vs_torch_batched": round(statistics.median(b / t for b, t in zip(base_ts, ts)), 2),
            "identical_scores_vs_torch_batched": round(sum(a.score == b.score for a, b in zip(items, reference)) / len(items), 4),
            "identical_text_vs_torch_batched": round(sum(a.raw_text == b.raw_text for a, b in zip(items, reference)) / len(items), 4),
            "generated_share": round(sum(s.source == "generated" for s in items) / len(items), 4)}
    for engine in item_engines:
        b, i = seconds[(engine, True)], seconds[(engine, False)]
        results[f"{engine} batched"]["speedup_vs_item_by_item"] = round(statistics.median(x / y for x, y in zip(i, b)), 2)
    prompt_tokens = [len(sm.processor.encode(ex)["ids"]) for exs in people for ex in exs]
    report = {"base_model": sm.info.name, "adapters": adapters, "participants": len(people),
              "items": len(reference), "items_per_participant": round(len(reference) / len(people), 1),
              "prompt_tokens_mean": round(statistics.mean(prompt_tokens)), "max_new_tokens": args.max_new_tokens,
              "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
              "setup_s (export once, load)": {k: round(v, 1) for k, v in setup.items()},
              "results": results}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
