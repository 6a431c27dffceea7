"""A site's local (non-federated) run: both stages on this site's data, one checkpoint per epoch.

The stages themselves are ``training.train_stage``, the same function a federated round runs.
A checkpoint is the adapters (``stage{N}-epoch{E}`` and ``latest``), within a stage the optimizer's state
(``optimizer-stage{N}.pt``) and ``state.json`` (where to go on), written in that order; since session 44
``--resume`` continues with the optimizer's moments and the same LoRA A, so it ends where the run
uninterrupted would have.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mllm_dr.adapters import (SiteModel, build_site_model, check_feature_columns, load_adapters, participant_keys,
                              read_meta, save_adapters)
from mllm_dr.atomic import atomic_write_bytes, atomic_write_text, settled
from mllm_dr.base_model import load_base
from mllm_dr.config import ModelConfig, TrainConfig
from mllm_dr.dataset import examples, labelled_training_instances, teacher_rationales
from mllm_dr.errors import InputError
from mllm_dr.features.store import FeatureStore
from mllm_dr.progress import Progress
from mllm_dr.training import optimizer_for, stage_trains, train_stage
from mllm_dr.workspace import Workspace


def run_dir(ws: Workspace) -> Path:
    return ws.checkpoints_dir / "local"


def optimizer_path(out_dir: Path, stage: int) -> Path:
    return out_dir / f"optimizer-stage{stage}.pt"


def save_optimizer(opt: torch.optim.Optimizer, path: Path, stage: int, epochs_done: int) -> None:
    """The optimizer's state after ``epochs_done`` epochs of ``stage``, tagged with that point, written
    atomically (session 44)."""
    buf = io.BytesIO()
    torch.save({"stage": stage, "epoch": epochs_done, "state": opt.state_dict()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def restore_optimizer(opt: torch.optim.Optimizer, path: Path, stage: int, epochs_done: int) -> bool:
    """Load into ``opt`` the state kept after ``epochs_done`` epochs of ``stage`` (``save_optimizer``; read
    with ``weights_only``: tensors and plain values, never code). False where none was kept for that point
    (a checkpoint of a kit before session 44, or a crash between the optimizer's file and state.json): the
    stage then goes on with a fresh optimizer, as every resume did before, and the result says so; so too
    where the resumed run trains other parameters (``--no-joint`` given or dropped on resume)."""
    if not path.is_file():
        return False
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:     # torch raises pickle's, zipfile's or its own errors for a damaged file
        raise InputError(f"the optimizer state of the interrupted run is damaged ({err}); delete it to resume "
                         f"with a fresh optimizer", path) from None
    if not isinstance(kept, dict) or (kept.get("stage"), kept.get("epoch")) != (stage, epochs_done):
        return False
    rates = [(g["lr"], g.get("initial_lr", g["lr"])) for g in opt.param_groups]
    try:
        opt.load_state_dict(kept["state"])     # checks the groups' sizes before it changes anything
    except ValueError:
        return False
    for group, (lr, initial) in zip(opt.param_groups, rates):   # the moments are kept, the rates are this run's:
        group["lr"], group["initial_lr"] = lr, initial          # load_state_dict brought back the old run's
    return True


def train_local(ws: Workspace, base_spec: str, config: ModelConfig, cfg: TrainConfig, device: str = "cpu",
                load_in_4bit: bool = False, resume: bool = False, zero_shot: bool = False,
                progress: Progress = None) -> dict:
    out_dir = run_dir(ws)
    state_path = out_dir / "state.json"
    base, tok, info = load_base(base_spec, device, load_in_4bit)
    done = {"stage": 1, "epoch": 0}
    if resume and (out_dir / "latest").is_dir():
        sm = load_adapters(base, tok, info, out_dir / "latest")
        done = json.loads(state_path.read_text())
    else:
        sm = build_site_model(base, tok, info, FeatureStore(ws.features_dir).dims(), config, seed=cfg.seed)
    sm.model.lora_seed = cfg.seed     # LoRA A: the same draw in a fresh and a resumed run (session 44)
    sm.to(device)
    insts = labelled_training_instances(ws)
    if not insts:
        raise InputError("no labelled training participants (train/dev split) in the workspace's corpus", ws.root)
    stale = teacher_rationales(ws, insts)[1]      # the rationales training reads, counted once up front
    # who these adapters learn from (a resumed run: those of its first part too), kept in their metadata
    trained_on = sorted({*(sm.meta.get("trained_on", []) if resume else []), *participant_keys(i.participant for i in insts)})
    columns = FeatureStore(ws.features_dir).feature_columns()      # and from which feature columns
    t0 = time.perf_counter()
    history: list[dict] = []
    restored = None          # resumed within a stage: whether its optimizer state was restored
    stages = [] if zero_shot else [(1, cfg.stage1_epochs), (2, cfg.stage2_epochs)]
    for stage, epochs in stages:
        if stage < done["stage"] or not stage_trains(sm, stage, cfg):
            continue  # done before a resume; or --no-lq / no audio/visual features: nothing to pre-train
        exs = examples(ws, insts, stage)
        if not sm.processor.norms:
            sm.processor.fit_norms(exs)
        opt, opt_path = optimizer_for(sm, stage, cfg), optimizer_path(out_dir, stage)

        def checkpoint(epoch: int, _stats: dict, stage: int = stage, epochs: int = epochs, opt=opt,
                       opt_path: Path = opt_path) -> None:
            tag = {"stage": stage, "epoch": epoch + 1, "trained_on": trained_on, "feature_columns": columns}
            save_adapters(sm, out_dir / f"stage{stage}-epoch{epoch + 1}", tag)   # one folder per epoch
            save_adapters(sm, out_dir / "latest", tag)
            if epoch + 1 < epochs:
                save_optimizer(opt, opt_path, stage, epoch + 1)
            nxt = {"stage": stage, "epoch": epoch + 1} if epoch + 1 < epochs else {"stage": stage + 1, "epoch": 0}
            atomic_write_text(state_path, json.dumps(nxt))
            if epoch + 1 == epochs:
                opt_path.unlink(missing_ok=True)         # the stage is done: its optimizer is never resumed

        first = done["epoch"] if stage == done["stage"] else 0
        if first:
            restored = restore_optimizer(opt, opt_path, stage, first)
        history += train_stage(sm, exs, stage, epochs, cfg, progress, first, checkpoint, optimizer=opt)
    if zero_shot or not stages:
        save_adapters(sm, out_dir / "latest", {"zero_shot": True, "trained_on": []})
    meta = read_meta(out_dir / "latest")
    adapter_bytes = sum(f.stat().st_size for f in (out_dir / "latest").rglob("*") if f.is_file())
    return {"seconds": time.perf_counter() - t0, "history": history, "adapter_version": meta["version"],
            "adapter_bytes": adapter_bytes, "train_instances": len(insts), "base_model": info.name,
            "stale_teacher_rationales": stale, "optimizer_restored": restored,
            "config": asdict(cfg), "model": config.to_dict()}


def load_trained(ws: Workspace, base_spec: str | None = None, device: str = "cpu",
                 load_in_4bit: bool = False) -> SiteModel:
    path = settled(run_dir(ws) / "latest")
    if not path.is_dir():
        raise InputError("no trained adapters; run 'mllmdr-site train --local' first", path)
    meta = read_meta(path)
    have = FeatureStore(ws.features_dir).dims()
    if any(have.values()) and any(have.get(m) != d for m, d in meta["dims"].items()):   # before any model loads
        raise InputError(f"these adapters read feature widths {meta['dims']}, the site's features now have "
                         f"{ {m: d for m, d in have.items() if d} } (extracted again with other settings): retrain "
                         f"('mllmdr-site train --local') or extract as before", ws.features_dir)
    check_feature_columns(meta.get("feature_columns"), ws.features_dir)
    base, tok, info = load_base(base_spec or meta["base_model"], device, load_in_4bit)
    sm = load_adapters(base, tok, info, path).to(device)
    sm.model.eval()
    return sm
