"""A site's local (non-federated) run: train both stages, score, evaluate.

Shared by the CLI and the benchmark; the federation reuses the same stage functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from mllm_dr.adapters import build_from_adapters, read_meta, save_adapters
from mllm_dr.atomic import atomic_write_text
from mllm_dr.base_model import load_base
from mllm_dr.dataset import examples, feature_norms, instances_by_split, load_corpus
from mllm_dr.errors import InputError
from mllm_dr.features.store import FeatureStore
from mllm_dr.metrics import SufficientStats, compute
from mllm_dr.progress import Progress
from mllm_dr.model import MLlmDR, ModelOptions
from mllm_dr.scoring import score_examples, summarize
from mllm_dr.training import TrainConfig, optimizer_for, train_epoch
from mllm_dr.workspace import Workspace


def run_dir(ws: Workspace) -> Path:
    return ws.checkpoints_dir / "local"


def train_local(ws: Workspace, base_spec: str, opts: ModelOptions, cfg: TrainConfig, device: str = "cpu",
                load_in_4bit: bool = False, resume: bool = False, zero_shot: bool = False,
                progress: Progress | None = None) -> dict:
    out_dir = run_dir(ws)
    state_path = out_dir / "state.json"
    base, tok, info = load_base(base_spec, device, load_in_4bit)
    state = {"stage": 1, "epoch": 0}
    if resume and (out_dir / "latest").is_dir():
        model = build_from_adapters(base, tok, info, out_dir / "latest")
        state = json.loads(state_path.read_text())
    else:
        dims = FeatureStore(ws.features_dir).dims()
        model = MLlmDR(base, tok, info.hidden_size, dims, opts)
    model.to(device)
    train_insts = instances_by_split(ws, ("train", "dev"))
    train_insts = [i for i in train_insts if i.label is not None]
    if not train_insts:
        raise InputError("no labelled training participants (train/dev split) in the workspace's corpus", ws.root)
    t0 = time.perf_counter()
    history = []
    stages = [] if zero_shot else [(1, cfg.stage1_epochs), (2, cfg.stage2_epochs)]
    for stage, epochs in stages:
        if stage == 1 and not model.lq:
            continue  # --no-lq or no audio/visual features: nothing to pre-train
        exs = examples(ws, train_insts, stage)
        if not model.norms:
            model.norms = feature_norms(exs, model.dims)
        opt = optimizer_for(model, stage, cfg)
        for epoch in range(epochs):
            if (stage, epoch) < (state["stage"], state["epoch"]):
                continue  # done before the interruption
            if progress:
                progress(f"stage {stage} epoch {epoch + 1}/{epochs}", 0, len(exs))
            stats = train_epoch(model, exs, stage, cfg, opt, epoch, epochs,
                                lambda n, s: progress and progress("", n, 0))
            history.append({"stage": stage, "epoch": epoch + 1, **stats})
            tag = {"stage": stage, "epoch": epoch + 1}
            save_adapters(model, info, out_dir / f"stage{stage}-epoch{epoch + 1}", tag)   # one folder per epoch
            save_adapters(model, info, out_dir / "latest", tag)
            state = {"stage": stage, "epoch": epoch + 1} if epoch + 1 < epochs else {"stage": stage + 1, "epoch": 0}
            atomic_write_text(state_path, json.dumps(state))
    if zero_shot or not stages:
        save_adapters(model, info, out_dir / "latest", {"zero_shot": True})
    meta = read_meta(out_dir / "latest")
    adapter_bytes = sum(f.stat().st_size for f in (out_dir / "latest").rglob("*") if f.is_file())
    return {"seconds": time.perf_counter() - t0, "history": history, "adapter_version": meta["version"],
            "adapter_bytes": adapter_bytes, "train_instances": len(train_insts), "base_model": info.name,
            "config": asdict(cfg), "options": opts.to_dict()}


def load_trained(ws: Workspace, base_spec: str | None = None, device: str = "cpu", load_in_4bit: bool = False):
    path = run_dir(ws) / "latest"
    if not path.is_dir():
        raise InputError("no trained adapters; run 'mllmdr-site train --local' first", path)
    meta = read_meta(path)
    base, tok, info = load_base(base_spec or meta["base_model"], device, load_in_4bit)
    model = build_from_adapters(base, tok, info, path)
    model.to(device).eval()
    return model, info, meta


def score_participant(ws: Workspace, model, info, meta, participant: str, max_new_tokens: int = 80) -> dict:
    corpus = load_corpus(ws)
    try:
        corpus.get(participant)
    except KeyError:
        raise InputError(f"participant {participant!r} is not in the workspace's corpus", ws.config.corpus_path) from None
    insts = [i for i in instances_by_split(ws, ("train", "dev", "test")) if i.participant == participant]
    items = score_examples(model, examples(ws, insts, 2, with_answers=False), max_new_tokens)
    return summarize(participant, items, info.name, meta["version"], info.is_test_model)


def evaluate(ws: Workspace, model, info, meta, split: str = "test", max_new_tokens: int = 80,
             progress: Progress | None = None) -> tuple[dict, list[dict], SufficientStats]:
    corpus = load_corpus(ws)
    from mllm_dr.corpus.labels import effective_split

    people = [p for p in corpus.participants if effective_split(p.id, p.split) == split and p.total is not None]
    if not people:
        raise InputError(f"no participants with a known total in split {split!r}", ws.config.corpus_path)
    stats = SufficientStats()
    rows, violations, n_items = [], 0, 0
    if progress:
        progress(f"evaluating {split}", 0, len(people))
    for p in people:
        res = score_participant(ws, model, info, meta, p.id, max_new_tokens)
        violations += sum(i["source"] == "regression" for i in res["items"])
        n_items += len(res["items"])
        stats.add(p.total, res["total"])
        rows.append({"participant": p.id, "true": p.total, "pred": res["total"],
                     "regression_total": round(sum(i["regression_score"] for i in res["items"]), 2)})
        if progress:
            progress("", 1, 0)
    metrics = compute(stats) | {"format_violation_rate": violations / n_items if n_items else 0.0}
    return metrics, rows, stats
