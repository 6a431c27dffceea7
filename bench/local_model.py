"""Benchmark: train both stages on a synthetic single site, score held-out participants.

Prints wall times, adapter size, held-out CCC/RMSE/MAE/format-violation rate and the
ratios against a zero-shot baseline (the same base model, untrained) run in the same
process on the same participants. ``--seed`` draws the corpus and seeds both models (their
initialisation and the training's shuffles and dropout); ``--threads`` sets torch's threads.
Both are in the JSON.

    .venv/bin/python -m bench.local_model --participants 20 --base-model smollm2 --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from bench.common import check_fresh_output, fresh_output, non_negative_int, positive_int

BENCH = "bench.local_model"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--participants", type=positive_int, default=20)
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--stage1-epochs", type=non_negative_int, default=1)
    ap.add_argument("--stage2-epochs", type=non_negative_int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench"),
                    help="emptied first: only a folder this benchmark made, or an empty one")
    ap.add_argument("--seed", type=non_negative_int, default=0,
                    help="the corpus's draw and both models' seed (TrainConfig.seed: initialisation, shuffles)")
    ap.add_argument("--threads", type=positive_int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
                    help="torch threads (default: OMP_NUM_THREADS, else every core)")
    return ap


def train_configs(args):
    """(the zero-shot baseline's TrainConfig, the trained model's): both with the run's ``--seed`` (until
    session 45 ``--seed`` changed the corpus only and training used TrainConfig's default seed)."""
    from mllm_dr.config import TrainConfig

    return (TrainConfig(seed=args.seed),
            TrainConfig(stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs, seed=args.seed))


def main() -> None:
    from cli.common import quiet_libraries

    quiet_libraries()
    args = parser().parse_args()
    check_fresh_output(args.out, BENCH)          # refused before anything loads, never deleted
    torch.set_num_threads(args.threads)

    from mllm_dr.corpus import read_corpus
    from mllm_dr.dataset import labelled_training_instances
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.config import ModelConfig
    from mllm_dr.evaluation import evaluate_split
    from mllm_dr.local_run import load_trained, train_local
    from mllm_dr.rationales import LocalTeacher, build_rationales
    from mllm_dr.synth import SynthConfig, write_synthetic
    from mllm_dr.config import DEFAULT_SCORING
    from mllm_dr.workspace import Workspace, write_jsonl

    fresh_output(args.out, BENCH)
    zero_shot_cfg, cfg = train_configs(args)
    timings = {}
    t = time.perf_counter()
    site = write_synthetic(SynthConfig(args.out / "corpus", "edaic", args.participants, 1, args.seed))[0]
    ws = Workspace.init(args.out / "ws", "bench")
    corpus = read_corpus(site)
    ws.config.corpus_path, ws.config.corpus_format = str(site), "edaic"
    ws.save()
    rep = extract_corpus(corpus, FeatureStore(ws.features_dir), ws.config.extraction)
    timings["extract_s"] = time.perf_counter() - t

    t = time.perf_counter()
    from mllm_dr.base_model import load_base

    model, tok, _ = load_base(args.base_model)
    insts = labelled_training_instances(ws)
    res = build_rationales(LocalTeacher(model, tok, "smollm2+prefilled", True, 40), insts, batch_size=8)
    write_jsonl(ws.rationales_path, res.accepted)
    write_jsonl(ws.rejects_path, res.rejects)
    timings["rationales_s"] = time.perf_counter() - t
    del model

    # baseline in the same process: the untrained model (zero-shot)
    train_local(ws, args.base_model, ModelConfig(), zero_shot_cfg, zero_shot=True)
    t = time.perf_counter()
    base_metrics = evaluate_split(ws, load_trained(ws), "test", DEFAULT_SCORING.max_new_tokens).metrics()
    timings["zero_shot_eval_s"] = time.perf_counter() - t

    shutil.rmtree(ws.checkpoints_dir / "local")
    t = time.perf_counter()
    trained = train_local(ws, args.base_model, ModelConfig(), cfg)
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = evaluate_split(ws, load_trained(ws), "test", DEFAULT_SCORING.max_new_tokens)
    metrics, rows = result.metrics(), result.rows
    timings["eval_s"] = time.perf_counter() - t
    n_test = len(rows)
    report = {
        "base_model": args.base_model, "participants": args.participants, "seed": args.seed,
        "threads": torch.get_num_threads(), "train_instances": trained["train_instances"],
        "held_out_participants": n_test, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "seconds_per_scored_participant": round(timings["eval_s"] / max(n_test, 1), 1),
        "extraction_real_time_factor": rep.real_time_factor,
        "rationale_acceptance_rate": res.acceptance_rate, "rationale_first_try": res.first_try_accepted / max(res.total, 1),
        "adapter_bytes": trained["adapter_bytes"], "history": trained["history"],
        "trained": metrics, "zero_shot": base_metrics,
        "ratios_vs_zero_shot": {k: (metrics[k] / base_metrics[k] if base_metrics[k] not in (0, 0.0) else None)
                                for k in ("rmse", "mae")},
        "rows": rows,
    }
    print(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
