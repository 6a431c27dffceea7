"""Saving and loading what a site trains: LoRA (peft format), LQ-formers, MAA, feature norms.

Adapters record the base model's identity (SHA-256 of its weights) and are refused on
any other base. No base weights and no embedding matrix are ever saved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mllm_dr.base_model import BaseInfo
from mllm_dr.errors import InputError, ModelMismatchError
from mllm_dr.model import MLlmDR, ModelOptions

META = "adapter_meta.json"
MODULES = "modules.safetensors"
NORMS = "feature_norm.safetensors"   # site-local statistics: never part of a federated payload


def module_state(model: MLlmDR) -> dict[str, torch.Tensor]:
    state = {f"lq.{k}": v for k, v in model.lq.state_dict().items()}
    state |= {f"maa.{k}": v for k, v in model.maa.state_dict().items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def lora_state(model: MLlmDR) -> dict[str, torch.Tensor]:
    if not model.has_lora:
        return {}
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model.base).items()}


def adapter_version(model: MLlmDR) -> str:
    h = hashlib.sha256()
    for name, t in sorted((module_state(model) | {f"lora.{k}": v for k, v in lora_state(model).items()}).items()):
        h.update(name.encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapters(model: MLlmDR, info: BaseInfo, out: Path, extra: dict | None = None) -> dict:
    """Write to a temporary folder and rename: a crash never leaves a half adapter."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(module_state(model), str(tmp / MODULES))
    if model.has_lora:
        model.base.save_pretrained(str(tmp / "lora"))
    if model.norms:
        save_file({f"{m}.{k}": t.contiguous() for m, (mean, std) in model.norms.items()
                   for k, t in (("mean", mean), ("std", std))}, str(tmp / NORMS))
    meta = {"base_model": info.name, "base_sha256": info.sha256, "hidden_size": info.hidden_size,
            "dims": model.dims, "options": model.opts.to_dict(), "has_lora": model.has_lora,
            "version": adapter_version(model), **(extra or {})}
    (tmp / META).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return meta


def read_meta(path: Path) -> dict:
    p = Path(path) / META
    if not p.is_file():
        raise InputError("not an adapter folder (adapter_meta.json missing)", path)
    return json.loads(p.read_text())


def build_from_adapters(base, tok, info: BaseInfo, path: Path) -> MLlmDR:
    """An MLlmDR with the saved adapters on ``base``; refuses a different base model."""
    meta = read_meta(path)
    if meta["base_sha256"] != info.sha256:
        raise ModelMismatchError(
            f"{path}: adapters were trained on base '{meta['base_model']}' (sha256 {meta['base_sha256'][:12]}...), "
            f"not on the loaded '{info.name}' (sha256 {info.sha256[:12]}...); load the matching base model")
    opts = meta["options"]
    opts["lora_targets"] = tuple(opts["lora_targets"])
    model = MLlmDR(base, tok, info.hidden_size, meta["dims"], ModelOptions(**opts))
    load_modules(model, load_file(str(Path(path) / MODULES)))
    if meta["has_lora"]:
        from peft import PeftModel

        model.base = PeftModel.from_pretrained(model.base, str(Path(path) / "lora"), is_trainable=True)
        model.has_lora = True
    if (Path(path) / NORMS).is_file():
        t = load_file(str(Path(path) / NORMS))
        model.norms = {m: (t[f"{m}.mean"], t[f"{m}.std"]) for m in model.dims if f"{m}.mean" in t}
    return model


def load_modules(model: MLlmDR, state: dict[str, torch.Tensor]) -> None:
    model.lq.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("lq.")})
    model.maa.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("maa.")})
