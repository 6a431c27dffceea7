"""Benchmark: training throughput of the kit's stage-1 and stage-2 steps, beside a plain peft LoRA
loop over the same token batches in the same process (the anchor: what the LLM itself costs).

Tokens/s counts every position of every batch (prompt, the 32 slots per modality, answer,
padding excluded). The plain loop trains LoRA q/v on the base with the model's own loss on the
same input ids (the slots are plain pad tokens there: no LQ-former, no MAA).

    .venv/bin/python -m bench.train_speed --base-model smollm2 --batches 6

On a GPU with a 4-bit base (issue 14.5; the plain loop is then a plain peft QLoRA loop on the same
4-bit base, bf16 compute), the synthetic workspace prepared on a CPU machine (opensmile runs there):

    .venv/bin/python -m bench.train_speed --prepare-only --out /tmp/speed      # CPU: corpus + features
    python -m bench.train_speed --workspace /tmp/speed/ws --base-model DIR --device cuda --load-in-4bit
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.common import check_fresh_output, fresh_output, positive_int

BENCH = "bench.train_speed"


def interleaved(steps: dict, batches: list, rounds: int = 2, sync=lambda: None) -> dict:
    """Time each named step on each batch, alternating between the steps batch by batch, so that
    whatever else runs on the machine weighs on all of them alike. Returns tokens/s per step (from
    the total time) and the median per-batch ratio of each step's time to the first step's."""
    times = {k: [] for k in steps}
    tokens = 0
    for _ in range(rounds):
        for b in batches:
            tokens += int(b.attention_mask.sum())
            for name, step in steps.items():
                sync()
                t0 = time.perf_counter()
                step(b)
                sync()
                times[name].append(time.perf_counter() - t0)
    first = next(iter(steps))
    return {name: {"tokens_per_s": round(tokens / sum(ts), 2), "s_per_batch": round(statistics.median(ts), 3),
                   f"time_vs_{first}": round(statistics.median(t / f for t, f in zip(ts, times[first])), 3)}
            for name, ts in times.items()}


def profile_steps(steps: dict, batch, out: Path, sync) -> None:
    """One step of each under torch.profiler: the top operators by self CPU time (and CUDA time on a
    GPU), and how many kernels each step launches, one text file per step."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            step(batch)
            sync()
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (out / f"profile_{name}.txt").write_text(
            f"kernel launches: {launches}\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=20)
            + "\n\n" + events.table(sort_by=sort, row_limit=20))


def main() -> None:
    from cli.common import quiet_libraries
    from mllm_dr.config import DEFAULT_MODEL, PROMPT_LAYOUTS

    quiet_libraries()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="smollm2")
    ap.add_argument("--participants", type=positive_int, default=8)
    ap.add_argument("--batches", type=positive_int, default=6, help="timed batches per measurement")
    ap.add_argument("--batch-size", type=positive_int, default=4)
    ap.add_argument("--mixed-items", action="store_true", help="batches mix items (only the system prompt shared)")
    ap.add_argument("--prompt-layout", default=DEFAULT_MODEL.prompt_layout, choices=PROMPT_LAYOUTS,
                    help="ModelConfig.prompt_layout; dialogue-first batches hold one participant")
    ap.add_argument("--threads", type=positive_int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mllmdr-bench-speed"),
                    help="where the synthetic corpus and workspace go (emptied first: only a folder this benchmark "
                         "made, or an empty one; without --workspace)")
    ap.add_argument("--prepare-only", action="store_true", help="write the corpus and features under --out and stop")
    ap.add_argument("--workspace", type=Path, default=None, help="a workspace made by --prepare-only (skips extraction)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes nf4 base (the kit's --load-in-4bit)")
    ap.add_argument("--profile-dir", type=Path, default=None,
                    help="also write a torch.profiler table of one step of each (stage 2) here")
    args = ap.parse_args()
    if args.workspace is None:
        check_fresh_output(args.out, BENCH)     # refused before anything loads, never deleted
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from mllm_dr.adapters import build_site_model
    from mllm_dr.base_model import load_base
    from mllm_dr.config import TrainConfig, model_with
    from mllm_dr.dataset import examples, labelled_training_instances
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.training import batches, optimizer_for, stage_loss
    from mllm_dr.workspace import Workspace

    if args.workspace is None:
        from mllm_dr.corpus import read_corpus
        from mllm_dr.features.extract import extract_corpus
        from mllm_dr.synth import SynthConfig, write_synthetic

        fresh_output(args.out, BENCH)
        site = write_synthetic(SynthConfig(args.out / "corpus", "edaic", args.participants, 1, 0))[0]
        ws = Workspace.init(args.out / "ws", "bench")
        ws.config.corpus_path, ws.config.corpus_format = str(site), "edaic"
        ws.save()
        extract_corpus(read_corpus(site), FeatureStore(ws.features_dir), ws.config.extraction)
        if args.prepare_only:
            print(json.dumps({"workspace": str(ws.root), "corpus": str(site)}))
            return
    else:   # a prepared workspace moved to another machine: its corpus sits beside it
        ws = Workspace(args.workspace)
        ws.config.corpus_path = str(args.workspace.parent / "corpus" / Path(ws.config.corpus_path).name)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    base, tok, info = load_base(args.base_model, args.device, args.load_in_4bit)
    load_s = time.perf_counter() - t0
    one_base_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    # the plain loop gets its own copy of the base (a 4-bit model cannot be deep-copied on the GPU)
    plain_base = load_base(args.base_model, args.device, args.load_in_4bit)[0] if args.load_in_4bit else copy.deepcopy(base)
    model_cfg = model_with(DEFAULT_MODEL.lora.r, prompt_layout=args.prompt_layout)
    sm = build_site_model(base, tok, info, FeatureStore(ws.features_dir).dims(), model_cfg, seed=0).to(args.device)
    cfg = TrainConfig(batch_size=args.batch_size)
    insts = labelled_training_instances(ws)
    report = {"base_model": args.base_model, "threads": args.threads, "batch_size": args.batch_size,
              "prompt_layout": model_cfg.prompt_layout,
              "batches": "mixed" if args.mixed_items else "one item per batch" if model_cfg.prompt_layout ==
              "instruction-first" else "one participant per batch",
              "timed_batches": args.batches, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "torch": torch.__version__, "device": args.device, "load_in_4bit": args.load_in_4bit,
              "base_parameters": sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) else p.numel()
                                        for p in plain_base.parameters()), "base_load_s": round(load_s, 1)}
    if cuda:
        report["gpu"] = torch.cuda.get_device_name()
        report["gpu_memory_one_base_gib"] = round(one_base_gib, 2)
        report["gpu_memory_after_loading_two_bases_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    plain = get_peft_model(plain_base, LoraConfig(r=DEFAULT_MODEL.lora.r, lora_alpha=DEFAULT_MODEL.lora.alpha,
                                                           lora_dropout=DEFAULT_MODEL.lora.dropout,
                                                           target_modules=list(DEFAULT_MODEL.lora.targets),
                                                           task_type="CAUSAL_LM"))
    plain.train()
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=cfg.lr_lora,
                                  weight_decay=0.0)      # as the kit's optimizer

    def plain_step(batch):
        """The anchor: plain peft LoRA on q/v over the same input ids (slots = pad tokens), the next-token
        loss on the supervised positions, the output layer computed there only, as the kit does (until
        session 41 the anchor ran the 49k-vocabulary output layer at every position through the model's
        own ``labels=`` loss: more work than the kit, which flattered the kit's ratio; a benchmark review).
        In stage 1 the anchor still trains LoRA, which the kit's stage 1 does not (LQ-formers only)."""
        import torch.nn.functional as F

        model = plain.get_base_model()
        ids, labels = batch.input_ids.to(args.device), batch.labels.to(args.device)
        hidden = model.model(input_ids=ids, attention_mask=batch.attention_mask.to(args.device)).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), target[keep])
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

        # the kit's rule for the shared prompt start (MLlmDR.share_prefix: on for a CPU, off for a GPU)
        # beside the other choice, to show the rule is the faster one on this device
        by_default = sm.model.shares_prefix
        other = f"kit_stage{stage}_" + ("one_pass" if by_default else "prefix_shared")

        def kit_other(batch, kit_step=kit_step):
            sm.model.share_prefix = not by_default
            try:
                kit_step(batch)
            finally:
                sm.model.share_prefix = None

        steps = {"plain_peft_lora": plain_step, f"kit_stage{stage}": kit_step, other: kit_other}
        for step in steps.values():                          # warm-up (optimizer state, allocator)
            step(fixed[0])
        res = interleaved(steps, fixed[1:], sync=sync)
        report[other] = res[other]
        if cuda:   # one step alone; the other model's base stays on the card (gpu_memory_one_base_gib)
            for name, step in (("plain_peft_lora", plain_step), (f"kit_stage{stage}", kit_step)):
                torch.cuda.reset_peak_memory_stats()
                step(fixed[1])
                res[name]["peak_gpu_memory_gib_with_the_other_base"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.profile_dir and stage == 2:
            profile_steps(steps, fixed[1], args.profile_dir, sync)
        report[f"kit_stage{stage}"] = res[f"kit_stage{stage}"] | {
            "mean_tokens_per_example": round(sum(int(b.attention_mask.sum()) for b in fixed[1:])
                                             / (args.batches * args.batch_size), 1),
            "mean_shared_prompt_start": round(statistics.fmean(b.prefix_len for b in fixed[1:]), 1)}
        report[f"plain_peft_lora_on_stage{stage}_batches"] = res["plain_peft_lora"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
