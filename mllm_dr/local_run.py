"""A site's local (non-federated) run: both stages on this site's data, one checkpoint per epoch.

The stages themselves are ``training.train_stage``, the same function a federated round runs.
A checkpoint is the adapters (``stage{N}-epoch{E}`` and ``latest``), within a stage the optimizer's state
(``optimizer-stage{N}.pt``) and ``state.json`` (where to go on: the stage, the epochs done, the checkpoint folder
and its adapter version, and the run's options), written in that order; since session 44 ``--resume``
continues with the optimizer's moments and the same LoRA A, so it ends where the run uninterrupted would
have; since session 46 it continues from the folder state.json names, with the run's own options and base
(other options are refused, named), and a fresh or zero-shot run removes the state of any earlier one.
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
from mllm_dr.dataset import examples, labelled_training_instances, rationale_sources, teacher_rationales
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


# the options of a run's state.json with the train --local option that sets each (others: the Python API's)
OPTION_FLAGS = {"train.stage1_epochs": "--stage1-epochs", "train.stage2_epochs": "--stage2-epochs",
                "train.batch_size": "--batch-size", "train.joint": "--no-joint", "train.moving_weight": "--moving-weight",
                "model.use_audio": "--no-audio/--no-lq", "model.use_visual": "--no-visual/--no-lq"}


def run_options(config: ModelConfig, cfg: TrainConfig) -> dict:
    """What a local run trains with, as its state.json records it (session 46: a resume compares them)."""
    return json.loads(json.dumps({"train": asdict(cfg), "model": config.to_dict()}))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def read_state(out_dir: Path) -> dict:
    """The interrupted run's state.json: where it stopped (stage, epochs done of it), the checkpoint folder
    it goes on from and that folder's adapter version, and the options it trained with; one InputError
    naming the file for a missing, unreadable or damaged one (session 46: a raw ENOENT or JSONDecodeError).
    A state of a kit before session 46 ({stage, epoch} alone) is read as it was meant: from ``latest``, its
    options unknown (``"legacy": True``; the resume says so)."""
    path = out_dir / "state.json"
    if not path.is_file():
        latest = settled(out_dir / "latest")
        raise InputError("--resume: no interrupted local run here" + (
            f" ({latest.name} has no state.json beside it: zero-shot adapters, a run stopped before its first "
            f"epoch ended, or the state was removed)"
            if latest.is_dir() else "") + "; train without --resume", path)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"--resume: cannot read the interrupted run's state ({err.strerror or err})", path) from None
    except ValueError as err:       # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"--resume: the interrupted run's state is damaged ({err}); train without --resume to "
                         f"start again", path) from None
    legacy = isinstance(state, dict) and set(state) == {"stage", "epoch"}
    fields = {"stage": int, "epoch": int} | ({} if legacy else {"checkpoint": str, "adapter_version": str,
                                                                "train": dict, "model": dict})
    if not isinstance(state, dict) or any(type(state.get(k)) is not t for k, t in fields.items()) \
            or state["stage"] < 1 or state["epoch"] < 0 \
            or not legacy and ("/" in state["checkpoint"] or state["checkpoint"] in ("", ".", "..")):
        raise InputError("--resume: the interrupted run's state is not a local run's state (stage, epoch, checkpoint, "
                         "adapter_version, train, model); train without --resume to start again", path)
    return state | {"checkpoint": "latest", "legacy": True} if legacy else state


def check_resume(state: dict, config: ModelConfig, cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume with other options than the interrupted run's (session 46: resumed at stage 2 epoch 2
    of 5 with the default 2 epochs it trained nothing and said 'trained in 0 s'), naming the first that differs
    and both values; and a run that finished.

    An option one side does not record counts at its default (``ModelConfig.to_dict`` leaves some out at their
    default, so a run interrupted with feature_norm "participant" resumed with the default unrefused: a second
    read, session 46); an option the defaults do not know either (one a later kit dropped) is no difference,
    so a resume across a kit update is not refused for it."""
    was = {} if state.get("legacy") else _flat({"train": state["train"], "model": state["model"]})
    now = _flat(run_options(config, cfg)) if was else {}
    # every field at its default, feature_norm included (to_dict drops it), as JSON holds them (tuples as lists)
    default = _flat(json.loads(json.dumps({"train": asdict(TrainConfig()), "model": asdict(ModelConfig())})))
    was, now = {**default, **was}, {**default, **now}
    for key in sorted(set(was) & set(now), key=lambda k: (k not in OPTION_FLAGS, k)):
        if was[key] != now[key]:
            flag = f" ({OPTION_FLAGS[key]})" if key in OPTION_FLAGS else ""
            raise InputError(f"--resume: the interrupted run trained with {key}{flag} {was[key]}, this run asks for "
                             f"{now[key]}; resume with the run's options, or train without --resume to start "
                             f"again", path)
    epochs = {1: cfg.stage1_epochs, 2: cfg.stage2_epochs}
    if not any(s > state["stage"] and e or s == state["stage"] and e > state["epoch"] for s, e in epochs.items()):
        raise InputError("--resume: the run finished (its last checkpoint is "
                         f"{state['checkpoint']}); nothing to resume: train without --resume to start again", path)


def resume_point(out_dir: Path, config: ModelConfig, cfg: TrainConfig) -> tuple[dict, Path]:
    """(state.json, the checkpoint folder it names, as ``settled`` takes it): checked before any model loads.
    The resume goes on from the checkpoint state.json names, never from ``latest`` (written before it: a run
    stopped between the two left ``latest`` an epoch ahead of the state)."""
    state = read_state(out_dir)
    check_resume(state, config, cfg, out_dir / "state.json")
    folder = settled(out_dir / state["checkpoint"])
    if not folder.is_dir():
        raise InputError(f"--resume: the checkpoint the interrupted run's state names ({state['checkpoint']}) is "
                         f"missing; train without --resume to start again", folder)
    version = read_meta(folder).get("version")
    if not state.get("legacy") and version != state["adapter_version"]:
        raise InputError(f"--resume: this checkpoint holds adapters {version}, the run's state "
                         f"({out_dir / 'state.json'}) names {state['adapter_version']}: not the checkpoint it "
                         f"belongs to; train without --resume to start again", folder)
    return state, folder


def forget_resume_point(out_dir: Path) -> None:
    """A run that starts afresh (or a zero-shot one) leaves no state a later --resume could continue from
    (session 46: a zero-shot run kept them and a resume went on mid-stage from untrained adapters)."""
    (out_dir / "state.json").unlink(missing_ok=True)
    for f in out_dir.glob("optimizer-stage*.pt"):
        f.unlink(missing_ok=True)


def resume_base(base_spec: str | None, resumed: Path | None) -> str:
    """The base to load: the one given; else on --resume the interrupted run's, that of the checkpoint it goes
    on from (``resume_point``'s folder; as score and evaluate take the adapters' own; session 46: it loaded the
    default smollm2); else the kit's default, smollm2."""
    if base_spec:
        return base_spec
    return read_meta(resumed)["base_model"] if resumed is not None else DEFAULT_BASE


DEFAULT_BASE = "smollm2"


def train_local(ws: Workspace, base_spec: str | None, config: ModelConfig, cfg: TrainConfig, device: str = "cpu",
                load_in_4bit: bool = False, resume: bool = False, zero_shot: bool = False,
                progress: Progress = None) -> dict:
    """Both stages on this site's data (``zero_shot``: none, the base untrained). ``resume``: go on from the
    checkpoint the interrupted run's state.json names, with that run's options (any other is refused, named:
    ``check_resume``). ``base_spec`` None: the interrupted run's base on resume, else smollm2. The result
    says how many stage-2 answers trained on a teacher rationale and how many on the extractive one
    (``dataset.rationale_sources``)."""
    if zero_shot and resume:
        raise InputError("--zero-shot and --resume: a zero-shot run trains nothing, so it continues no run "
                         "(it would mark trained adapters as untrained); give one of them")
    out_dir = run_dir(ws)
    state_path = out_dir / "state.json"
    done = {"stage": 1, "epoch": 0}
    resume_note, folder = None, None
    if resume:                                       # every check before minutes of model loading
        done, folder = resume_point(out_dir, config, cfg)
        if done.get("legacy"):
            resume_note = (f"{state_path} was written by a kit before session 46: it records neither the checkpoint "
                           f"it belongs to nor the run's options, so the run went on from latest with this run's "
                           f"options, unchecked")
    base, tok, info = load_base(resume_base(base_spec, folder), device, load_in_4bit)
    if resume:
        sm = load_adapters(base, tok, info, folder)
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
    options = run_options(config, cfg)
    if not zero_shot and not any(stage_trains(sm, s, cfg) and e > (done["epoch"] if s == done["stage"] else 0)
                                 for s, e in ((1, cfg.stage1_epochs), (2, cfg.stage2_epochs)) if s >= done["stage"]):
        raise InputError("--stage1-epochs, --stage2-epochs: nothing to train (stage 1 trains only with audio or visual "
                         "features); give epochs, or --zero-shot for the untrained base")   # before anything is removed
    if not resume:
        forget_resume_point(out_dir)              # a fresh or zero-shot run: no earlier run's state to go on from
    t0 = time.perf_counter()
    history: list[dict] = []
    restored = None          # resumed within a stage: whether its optimizer state was restored
    sources = None           # how the stage-2 answers were made, when stage 2 trained (dataset.rationale_sources)
    stages = [] if zero_shot else [(1, cfg.stage1_epochs), (2, cfg.stage2_epochs)]
    for stage, epochs in stages:
        if stage < done["stage"] or not stage_trains(sm, stage, cfg):
            continue  # done before a resume; or --no-lq / no audio/visual features: nothing to pre-train
        first = done["epoch"] if stage == done["stage"] else 0
        if first >= epochs:
            continue
        exs = examples(ws, insts, stage)
        if not sm.processor.norms:
            sm.processor.fit_norms(exs)
        if stage == 2:
            sources = rationale_sources(ws, insts, sm.processor)
        opt, opt_path = optimizer_for(sm, stage, cfg), optimizer_path(out_dir, stage)

        def checkpoint(epoch: int, _stats: dict, stage: int = stage, epochs: int = epochs, opt=opt,
                       opt_path: Path = opt_path) -> None:
            # the epoch's folder, latest, the optimizer, then state.json naming the folder and its version: a
            # resume goes on from the folder state.json names, so a run stopped between any two writes resumes
            # from one consistent point (session 46: from latest, which could be an epoch ahead of the state)
            tag = {"stage": stage, "epoch": epoch + 1, "trained_on": trained_on, "feature_columns": columns}
            name = f"stage{stage}-epoch{epoch + 1}"
            meta = save_adapters(sm, out_dir / name, tag)   # one folder per epoch
            save_adapters(sm, out_dir / "latest", tag)
            if epoch + 1 < epochs:
                save_optimizer(opt, opt_path, stage, epoch + 1)
            nxt = {"stage": stage, "epoch": epoch + 1} if epoch + 1 < epochs else {"stage": stage + 1, "epoch": 0}
            atomic_write_text(state_path, json.dumps(nxt | {"checkpoint": name, "adapter_version": meta["version"],
                                                            "base_model": sm.info.name, **options}))
            if epoch + 1 == epochs:
                opt_path.unlink(missing_ok=True)         # the stage is done: its optimizer is never resumed

        if first:
            restored = restore_optimizer(opt, opt_path, stage, first)
        history += train_stage(sm, exs, stage, epochs, cfg, progress, first, checkpoint, optimizer=opt)
    if zero_shot:
        save_adapters(sm, out_dir / "latest", {"zero_shot": True, "trained_on": []})
    meta = read_meta(out_dir / "latest")
    adapter_bytes = sum(f.stat().st_size for f in (out_dir / "latest").rglob("*") if f.is_file())
    return {"seconds": time.perf_counter() - t0, "history": history, "adapter_version": meta["version"],
            "adapter_bytes": adapter_bytes, "train_instances": len(insts), "base_model": info.name,
            "stale_teacher_rationales": stale, "rationale_sources": sources, "optimizer_restored": restored,
            "resume_unchecked": resume_note,
            "zero_shot": bool(meta.get("zero_shot")), "config": asdict(cfg), "model": sm.model.config.to_dict()}


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
