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
import time
from pathlib import Path

import torch


def _timed_steps(step, batches, warmup: int = 1) -> tuple[float, int]:
    for b in batches[:warmup]:
        step(b)
    tokens, t0 = 0, time.perf_counter()
    for b in batches:
        step(b)
        tokens += int(b.attention_mask.sum())
    return time.perf_counter() - t0, tokens


def main() -> None:
    from cli.common import quiet_libraries

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--participants", type=int, default=8)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    ap.add_argument("--batch-size", type=int, default=4)
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
              "timed_batches": args.batches, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "torch": torch.__version__}
    fixed = {}
    for stage in (1, 2):
        exs = examples(ws, insts, stage)
        sm.processor.fit_norms(exs)
        fixed[stage] = [sm.processor.collate(b) for b in batches(sm, exs, args.batch_size, seed=0)][:args.batches + 1]
        opt = optimizer_for(sm, stage, cfg)
        sm.model.train()

        def step(batch, stage=stage, opt=opt):
            out = sm.model(batch)
            loss = stage_loss(out, stage, cfg, 0, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        seconds, tokens = _timed_steps(step, fixed[stage][1:])
        report[f"kit_stage{stage}"] = {"tokens_per_s": tokens / seconds, "s_per_batch": seconds / args.batches,
                                       "mean_tokens_per_example": tokens / (args.batches * args.batch_size)}

    # the anchor: plain peft LoRA on q/v over the stage-2 token batches, the model's own loss
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=DEFAULT_MODEL.lora.r, lora_alpha=DEFAULT_MODEL.lora.alpha,
                                                           lora_dropout=DEFAULT_MODEL.lora.dropout,
                                                           target_modules=list(DEFAULT_MODEL.lora.targets),
                                                           task_type="CAUSAL_LM"))
    plain.train()
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=cfg.lr_lora)

    def plain_step(batch):
        loss = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds, tokens = _timed_steps(plain_step, fixed[2][1:])
    report["plain_peft_lora"] = {"tokens_per_s": tokens / seconds, "s_per_batch": seconds / args.batches}
    report["kit_stage2_vs_plain_peft"] = report["kit_stage2"]["tokens_per_s"] / report["plain_peft_lora"]["tokens_per_s"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
