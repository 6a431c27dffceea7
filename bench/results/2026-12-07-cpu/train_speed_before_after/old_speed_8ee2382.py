"""Session 45: the kit's training step at commit 8ee2382 (before issue 12's throughput work), timed the way
HEAD's bench.train_speed times it: fixed batches, interleaved with a plain peft LoRA step on the same ids.
Batches as 8ee2382's train_epoch makes them (shuffled, mixed items, no sorting)."""
import argparse, copy, json, os, platform, random, shutil, statistics, time
from pathlib import Path
import torch

def interleaved(steps, batches, rounds=2):
    times = {k: [] for k in steps}; tokens = 0
    for _ in range(rounds):
        for b in batches:
            tokens += int(b.attention_mask.sum())
            for name, step in steps.items():
                t0 = time.perf_counter(); step(b); times[name].append(time.perf_counter() - t0)
    first = next(iter(steps))
    return {n: {"tokens_per_s": round(tokens / sum(ts), 2), "s_per_batch": round(statistics.median(ts), 3),
                f"time_vs_{first}": round(statistics.median(t / f for t, f in zip(ts, times[first])), 3)}
            for n, ts in times.items()}

def main():
    from cli.common import quiet_libraries
    quiet_libraries()
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=4); ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2); ap.add_argument("--participants", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(); torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model
    from mllm_dr.base_model import load_base
    from mllm_dr.corpus import read_corpus
    from mllm_dr.dataset import examples, feature_norms, instances_by_split
    from mllm_dr.features.extract import extract_corpus
    from mllm_dr.features.store import FeatureStore
    from mllm_dr.model import MLlmDR, ModelOptions
    from mllm_dr.synth import SynthConfig, write_synthetic
    from mllm_dr.training import TrainConfig, optimizer_for, stage_loss
    from mllm_dr.workspace import Workspace
    shutil.rmtree(a.out, ignore_errors=True)
    site = write_synthetic(SynthConfig(a.out / "corpus", "edaic", a.participants, 1, 0))[0]
    ws = Workspace.init(a.out / "ws", "bench")
    ws.config.corpus_path, ws.config.corpus_format = str(site), "edaic"; ws.save()
    extract_corpus(read_corpus(site), FeatureStore(ws.features_dir), ws.config.extraction)
    base, tok, info = load_base("smollm2")
    opts = ModelOptions()
    model = MLlmDR(copy.deepcopy(base), tok, info.hidden_size, FeatureStore(ws.features_dir).dims(), opts)
    cfg = TrainConfig(batch_size=a.batch_size)
    insts = [i for i in instances_by_split(ws, ("train", "dev")) if i.label is not None]
    lcfg = opts.lora if hasattr(opts, "lora") else None
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                           target_modules=list(opts.lora_targets), task_type="CAUSAL_LM"))
    plain.train()
    popt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=cfg.lr_lora)
    def plain_step(b):
        loss = plain(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        popt.zero_grad(set_to_none=True); loss.backward(); popt.step()
    rep = {"commit": "8ee2382", "threads": a.threads, "batch_size": a.batch_size, "timed_batches": a.batches,
           "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
           "lora": repr(lcfg)}
    for stage in (1, 2):
        exs = examples(ws, insts, stage)
        if not model.norms:
            model.norms = feature_norms(exs, model.dims)
        order = list(range(len(exs))); random.Random(cfg.seed * 1000 + stage * 100).shuffle(order)
        fixed = [model.collate([exs[i] for i in order[s:s + a.batch_size]])
                 for s in range(0, len(order), a.batch_size)][:a.batches + 1]
        opt = optimizer_for(model, stage, cfg); model.train()
        def kit_step(b, stage=stage, opt=opt):
            out = model(b); loss = stage_loss(out, stage, cfg, 0, 1)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        kit_step(fixed[0]); plain_step(fixed[0])
        res = interleaved({"plain_peft_lora": plain_step, f"kit_stage{stage}": kit_step}, fixed[1:])
        rep[f"kit_stage{stage}"] = res[f"kit_stage{stage}"] | {"mean_tokens_per_example": round(
            sum(int(b.attention_mask.sum()) for b in fixed[1:]) / (a.batches * a.batch_size), 1)}
        rep[f"plain_peft_lora_on_stage{stage}_batches"] = res["plain_peft_lora"]
    print(json.dumps(rep, indent=1))

if __name__ == "__main__":
    main()
