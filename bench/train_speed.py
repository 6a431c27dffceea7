"""Benchmark: training throughput of the kit's stage-1 and stage-2 steps, beside a plain peft LoRA
loop over the same token batches in the same process (the anchor: what the LLM itself costs).

Tokens/s counts every position of every batch (prompt, the 32 slots per modality, answer,
padding excluded). The plain loop trains LoRA q/v on the base with the model's own loss on the
same input ids (the slots are plain pad tokens there: no LQ-former, no MAA).

    .venv/bin/python -m bench.train_speed --base-model smollm2 --batches 6
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch


def interleaved(steps: dict, batches: list, rounds: int = 2) -> dict:
    """Time each named step on each batch, alternating between the steps batch by batch, so that
    whatever else runs on the machine weighs on all of them alike. Returns tokens/s per step (from
    the total time) and the median per-batch ratio of each step's time to the first step's."""
    times = {k: [] for k in steps}
    tokens = 0
    for _ in range(rounds):
        for b in batches:
            tokens += int(b.attention_mask.sum())
            for name, step in steps.items():
                t0 = time.perf_counter()
                step(b)
                times[name].append(time.perf_counter() - t0)
    first = next(iter(steps))
    return {name: {"tokens_per_s": round(tokens / sum(ts), 2), "s_per_batch": round(statistics.median(ts), 3),
                   f"time_vs_{first}": round(statistics.median(t / f for t, f in zip(ts, times[first])), 3)}
            for name, ts in times.items()}


def main() -> None:
    from cli.common import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--participants", type=int, default=8)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--mixed-items", action="store_true", help="batches mix items (only the system prompt shared)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-speed"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from mllm_dr.adapters import build_site_model
    from mllm_dr.base_model import load_base
    from mllm_dr.config import DEFAULT_MODEL, TrainConfig
    from mllm_dr.corpus import read_corpus
    from mllm_dr.dataset import examples, labelled_training_instances
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.synth import SynthConfig, write_synthetic
    from mllm_dr.training import batches, optimizer_for, stage_loss
    from mllm_dr.workspace import Workspace

    shutil.rmtree(args.out, ignore_errors=True)
    site = write_synthetic(SynthConfig(args.out / "corpus", "edaic", args.participants, 1, 0))[0]
    ws = Workspace.init(args.out / "ws", "bench")
    ws.config.corpus_path, ws.config.corpus_format = str(site), "edaic"
    ws.save()
    extract_corpus(read_corpus(site), FeatureStore(ws.features_dir), ws.config.extraction)
    base, tok, info = load_base(args.base_model)
    sm = build_site_model(copy.deepcopy(base), tok, info, FeatureStore(ws.features_dir).dims(), DEFAULT_MODEL, seed=0)
    cfg = TrainConfig(batch_size=args.batch_size)
    insts = labelled_training_instances(ws)
    report = {"base_model": args.base_model, "threads": args.threads, "batch_size": args.batch_size,
              "batches": "mixed items" if args.mixed_items else "one item per batch",
              "timed_batches": args.batches, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "torch": torch.__version__}
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=DEFAULT_MODEL.lora.r, lora_alpha=DEFAULT_MODEL.lora.alpha,
                                                           lora_dropout=DEFAULT_MODEL.lora.dropout,
                                                           target_modules=list(DEFAULT_MODEL.lora.targets),
                                                           task_type="CAUSAL_LM"))
    plain.train()
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=cfg.lr_lora)

    def plain_step(batch):
        """The anchor: plain peft LoRA on q/v, the model's own loss, the same input ids (slots = pad tokens)."""
        loss = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    for stage in (1, 2):
        exs = examples(ws, insts, stage)
        sm.processor.fit_norms(exs)
        fixed = [sm.processor.collate(b) for b in batches(sm, exs, args.batch_size, 0, not args.mixed_items)]
        fixed = sorted(fixed, key=lambda b: -len(b.input_ids))[:args.batches + 1]   # full batches first
        opt = optimizer_for(sm, stage, cfg)
        sm.model.train()

        def kit_step(batch, stage=stage, opt=opt):
            out = sm.model(batch)
            loss = stage_loss(out, stage, cfg, 0, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        kit_step(fixed[0])          # warm-up (first optimizer construction, allocator)
        plain_step(fixed[0])
        res = interleaved({"plain_peft_lora": plain_step, f"kit_stage{stage}": kit_step}, fixed[1:])
        report[f"kit_stage{stage}"] = res[f"kit_stage{stage}"] | {
            "mean_tokens_per_example": round(sum(int(b.attention_mask.sum()) for b in fixed[1:])
                                             / (args.batches * args.batch_size), 1),
            "mean_shared_prompt_start": round(statistics.fmean(b.prefix_len for b in fixed[1:]), 1)}
        report[f"plain_peft_lora_on_stage{stage}_batches"] = res["plain_peft_lora"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
