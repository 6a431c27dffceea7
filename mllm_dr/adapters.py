"""What a site trains and keeps: the adapter state (LQ-formers, MAA, LoRA) and the folder it lives in.

One naming for the adapter state everywhere (local folders, federated messages, signed
checkpoints): ``lq.<modality>.*`` and ``maa.*`` from the modules' ``state_dict`` (buffers
included), ``lora.*`` from peft. ``get_adapter_state`` / ``set_adapter_state`` are the one
pair that reads and writes it (as peft keeps ``get/set_peft_model_state_dict`` together).
Adapters record the base model's identity (SHA-256 of its weights) and are refused on any
other base. No base weights and no embedding matrix are ever saved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mllm_dr.atomic import atomic_folder
from mllm_dr.base_model import BaseInfo, import_peft
from mllm_dr.config import ModelConfig
from mllm_dr.errors import InputError, ModelMismatchError
from mllm_dr.features.store import FeatureStore
from mllm_dr.model import MLlmDR
from mllm_dr.processor import Processor

META = "adapter_meta.json"
TENSORS = "adapters.safetensors"
NORMS = "feature_norm.safetensors"   # site-local statistics: never part of a federated payload
TRAINED_ON = "trained_on.json"       # beside a federated global: this site's participants it trained on


def check_feature_columns(trained: dict[str, list[str]] | None, features_dir: Path) -> None:
    """Refuse (InputError) adapters that recorded the feature columns they trained on
    (``FeatureStore.feature_columns``) when the store as it is now has a modality whose columns are not
    among them. Adapters made before session 42 record none (their widths are still checked). Called by
    local and federated loading alike, before any model loads."""
    if not trained:
        return
    now = FeatureStore(features_dir).feature_columns()
    changed = [m for m, hashes in now.items() if set(hashes) - set(trained.get(m, []))]
    if changed:
        raise InputError(f"the site's {' and '.join(changed)} features were extracted again with other columns since "
                         "these adapters were trained (same widths, other names or order): retrain, or extract as "
                         "before", features_dir)


def participant_keys(participants) -> list[str]:
    """The participants adapters were trained on, as kept in their metadata (``trained_on``): a short
    SHA-256 of each id, sorted. What 'was this patient in the training data?' is answered from, rather
    than from the corpus's split as it is today (a split file edited after training: a review, session 42)."""
    return sorted({hashlib.sha256(str(p).encode()).hexdigest()[:16] for p in participants})
PREFIXES = ("lq.", "maa.", "lora.")


# ----------------------------------------------------------------------------- the state
def get_adapter_state(model: MLlmDR) -> dict[str, torch.Tensor]:
    state = {f"lq.{k}": v for k, v in model.lq.state_dict().items()}
    state |= {f"maa.{k}": v for k, v in model.maa.state_dict().items()}
    if model.has_lora:
        state |= {f"lora.{k}": v for k, v in import_peft().get_peft_model_state_dict(model.base).items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def set_adapter_state(model: MLlmDR, state: dict[str, torch.Tensor]) -> None:
    """Load these tensors (all or a subset) into the model; a name or shape it lacks is an error."""
    if any(n.startswith("lora.") for n in state):
        model.enable_lora()
    own = get_adapter_state(model)
    unknown = [n for n in state if n not in own]
    if unknown:
        raise ModelMismatchError(f"adapter state has tensors this model lacks: {unknown[:3]}")
    bad = [n for n in state if state[n].shape != own[n].shape]
    if bad:
        raise ModelMismatchError(f"shape mismatch for {bad[0]}: given {tuple(state[bad[0]].shape)} vs "
                                 f"model {tuple(own[bad[0]].shape)}")
    for prefix, module in (("lq.", model.lq), ("maa.", model.maa)):
        part = {n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)}
        if part:
            module.load_state_dict(part, strict=False)
    lora = {n[5:]: t for n, t in state.items() if n.startswith("lora.")}
    if lora:
        import_peft().set_peft_model_state_dict(model.base, lora)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def state_version(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- a model at a site
@dataclass
class SiteModel:
    """A model ready at a site: the network, its processor (with the site's feature norms),
    the base model's identity and the adapters' metadata (version, run, round...)."""

    model: MLlmDR
    processor: Processor
    info: BaseInfo
    meta: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "untrained"))

    def to(self, device: str) -> "SiteModel":
        self.model.to(device)
        return self


def build_site_model(base, tok, info: BaseInfo, dims: dict[str, int | None], config: ModelConfig,
                     seed: int | None = None) -> SiteModel:
    """A fresh model on ``base``: random LQ-formers and MAA (seeded), no LoRA until stage 2."""
    if seed is not None:
        torch.manual_seed(seed)
    processor = Processor(tok, config, dims)
    return SiteModel(MLlmDR(base, info.hidden_size, processor.dims, config), processor, info)


def save_adapters(sm: SiteModel, out: Path, extra: dict | None = None) -> dict:
    """Write to a temporary folder and rename: a crash never leaves a half adapter."""
    state = get_adapter_state(sm.model)
    meta = {"base_model": sm.info.name, "base_sha256": sm.info.sha256, "hidden_size": sm.info.hidden_size,
            "dims": sm.processor.dims, "config": sm.model.config.to_dict(), "has_lora": sm.model.has_lora,
            "version": state_version(state), **(extra or {})}
    with atomic_folder(Path(out)) as tmp:
        save_file(state, str(tmp / TENSORS))
        if sm.processor.norms:
            save_file(sm.processor.norm_tensors(), str(tmp / NORMS))
        (tmp / META).write_text(json.dumps(meta, indent=1))
    sm.meta = meta
    return meta


def read_meta(path: Path) -> dict:
    p = Path(path) / META
    if not p.is_file():
        raise InputError("not an adapter folder (adapter_meta.json missing)", path)
    return json.loads(p.read_text())


def load_adapters(base, tok, info: BaseInfo, path: Path) -> SiteModel:
    """A SiteModel with the saved adapters on ``base``; refuses a different base model."""
    meta = read_meta(path)
    if meta["base_sha256"] != info.sha256:
        raise ModelMismatchError(
            f"{path}: adapters were trained on base '{meta['base_model']}' (sha256 {meta['base_sha256'][:12]}...), "
            f"not on the loaded '{info.name}' (sha256 {info.sha256[:12]}...); load the matching base model")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"adapter metadata from another version of the kit ({err}); retrain", path) from None
    sm = build_site_model(base, tok, info, meta["dims"], config)
    if meta["has_lora"]:
        sm.model.enable_lora()
    set_adapter_state(sm.model, load_file(str(Path(path) / TENSORS)))
    if (Path(path) / NORMS).is_file():
        sm.processor.load_norm_tensors(load_file(str(Path(path) / NORMS)))
    sm.meta = meta
    return sm
