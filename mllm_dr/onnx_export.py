"""Export a site model to ONNX once per adapter state, and keep it in the workspace.

What is exported (torch.onnx's TorchScript exporter; optimum would pull transformers back to 4.x):
- ``decoder.onnx``: the base LLM with LoRA merged (peft ``merge_and_unload`` on a copy), one
  step of the decoder body + output head. Inputs: input embeddings, attention mask, position
  ids and the past KV per layer; outputs: the hidden states (MAA pools them), the logits of the
  last position and the present KV. Run with an empty past it is the prefill; with the past,
  one decoding step: the prefill-once structure of ``MLlmDR.generate``.
- ``decoder.int8.onnx`` (when asked for): the same with weight-only int8 MatMuls (blockwise scales;
  onnxruntime's MatMulNBits, see ``quantize``).
- ``lq_<modality>.onnx``, ``maa.onnx``: the LQ-formers and the regression head (fp32).
- ``embed.npy``: the input embedding matrix (the LQ-former outputs replace the slot rows).

One folder per adapter version (``<adapters' content hash>-<key digest>``), keyed by that hash,
the base's SHA-256 and the export format; ``manifest.json`` records the key and the SHA-256 of
every file, and every load checks both: a folder is never used for other adapters, another base
or a changed file (it is exported again).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mllm_dr import progress as prog
from mllm_dr.adapters import SiteModel, get_adapter_state, state_version
from mllm_dr.atomic import atomic_folder, atomic_write_text, file_lock, sha256_file
from mllm_dr.errors import MllmDrError
from mllm_dr.progress import Progress

FORMAT = 2            # bump when what is exported changes: older folders are then re-exported (2: weight-only int8)
MANIFEST = "manifest.json"
STAMPS = "verified.json"   # size, mtime and hash of each file when it last matched the manifest
FILES = {"fp32": "decoder.onnx", "int8": "decoder.int8.onnx"}     # the decoder graph per precision
INT8_BLOCK = 32       # weights per int8 scale (weight-only int8, see quantize)
KEEP = 2              # adapter versions kept per workspace (a site may switch local <-> federated)


class EngineError(MllmDrError):
    """The ONNX engine cannot run: a missing or broken onnxruntime/onnx, or a bad export folder."""


def require(module: str):
    """Import onnxruntime / onnx or say in one line what to install (a broken install included)."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as err:    # ImportError, or OSError from a missing shared library
        raise EngineError(f"the ONNX engine needs {module} ({type(err).__name__}: {err}); "
                          f"reinstall it with 'bash scripts/setup.sh' or use --engine torch") from None


# ----------------------------------------------------------------------------- the graphs
class DecoderStep(nn.Module):
    """The merged LLM as one graph: (embeddings, mask, positions, past KV...) -> (hidden, last logits, present KV...)."""

    def __init__(self, lm):
        super().__init__()
        self.body, self.head, self.config = lm.get_decoder(), lm.get_output_embeddings(), lm.config

    def forward(self, embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        layers = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=layers, config=self.config)
        out = self.body(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, use_cache=True)
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.last_hidden_state, self.head(out.last_hidden_state[:, -1]), *present)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head width) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def kv_names(layers: int, kind: str) -> list[str]:
    return [f"{kind}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict,
            dynamo: bool = False) -> None:
    """torch.onnx.export with every named axis dynamic. The TorchScript tracer exports the decoder in
    about a second and keeps the KV cache plain tensors; the LQ-formers need the dynamo exporter
    (traced, nn.MultiheadAttention bakes the batch and frame counts into its reshapes)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # the fused attention kernel has no ONNX form
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes on shape arithmetic (the tests check other shapes)
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              opset_version=None if dynamo else 17, dynamo=dynamo, verbose=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_decoder(lm, path: Path) -> None:
    layers, kv_heads, head_dim = kv_shape(lm.config)
    b, s, p = 2, 5, 3                           # example sizes only: every axis below is dynamic
    past = [torch.zeros(b, kv_heads, p, head_dim) for _ in range(2 * layers)]
    args = (torch.randn(b, s, lm.config.hidden_size), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).repeat(b, 1), *past)
    axes = {"embeds": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "new"}, "hidden": {0: "batch", 1: "new"}, "logits": {0: "batch"}}
    axes |= {n: {0: "batch", 2: "past"} for n in kv_names(layers, "past")}
    axes |= {n: {0: "batch", 2: "total"} for n in kv_names(layers, "present")}
    _export(DecoderStep(lm).eval(), args, path, ["embeds", "attention_mask", "position_ids", *kv_names(layers, "past")],
            ["hidden", "logits", *kv_names(layers, "present")], axes)


def export_heads(sm: SiteModel, folder: Path) -> None:
    """The LQ-formers (features, padding -> slot embeddings) and MAA (hidden, mask -> score)."""
    for m, lq in sm.model.lq.items():
        feats, pad = torch.randn(2, 7, lq.in_dim), torch.zeros(2, 7, dtype=torch.bool)
        _export(lq.eval(), (feats, pad), folder / f"lq_{m}.onnx", ["features", "padding"], ["slots"],
                {"features": {0: "batch", 1: "frames"}, "padding": {0: "batch", 1: "frames"}, "slots": {0: "batch"}},
                dynamo=True)
    hidden, mask = torch.randn(2, 6, sm.info.hidden_size), torch.ones(2, 6, dtype=torch.bool)
    _export(sm.model.maa.eval(), (hidden, mask), folder / "maa.onnx", ["hidden", "mask"], ["score"],
            {"hidden": {0: "batch", 1: "length"}, "mask": {0: "batch", 1: "length"}, "score": {0: "batch"}})


def merged_llm(sm: SiteModel):
    """A copy of the base LLM with the LoRA deltas folded into its weights (the site model is untouched)."""
    base = copy.deepcopy(sm.model.base)
    return (base.merge_and_unload() if sm.model.has_lora else base).eval()


def quantize(src: Path, dst: Path) -> None:
    """Weight-only int8: every MatMul's constant weight stored as 8-bit codes in blocks of
    ``INT8_BLOCK`` values along the input dimension, each block with its own scale (onnxruntime's
    MatMulNBits); activations stay float and are quantized per block inside the kernel at run
    time (accuracy level 4: int8 dot products). Dynamic int8 (``quantize_dynamic``: one scale per
    activation tensor) broke SmolLM2's answer format on every item: a decoder's activations have
    outlier channels that a per-tensor scale cannot hold. Written in a side folder and moved in (a
    crash never leaves half a graph); a graph over protobuf's 2 GB (an 8B base) keeps its weights
    in an external ``.data`` file."""
    import logging

    onnx = require("onnx")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    side = dst.parent / (dst.name + ".partial")
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir()
    big = sum(p.stat().st_size for p in src.parent.glob(src.name + "*")) > 1_800_000_000
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))  # one INFO line per node
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=INT8_BLOCK, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(side / dst.name), big)
    for p in side.iterdir():
        p.replace(dst.parent / p.name)
    side.rmdir()


# ----------------------------------------------------------------------------- the cache
def cache_key(sm: SiteModel) -> dict:
    """What a folder may be used for: these adapters (by content), this base, this export format."""
    return {"format": FORMAT, "adapters": state_version(get_adapter_state(sm.model)), "base_sha256": sm.info.sha256,
            "base_model": sm.info.name, "dims": sm.model.dims, "config": sm.model.config.to_dict()}


def folder_for(root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return Path(root) / f"{key['adapters']}-{digest}"


def verified_files(folder: Path, key: dict) -> set[str]:
    """The files of a folder exported for exactly ``key`` whose bytes still match the manifest;
    empty when the key differs, a listed file changed or the manifest is unreadable. A file is
    hashed again only when its size or mtime differs from when it last matched (``STAMPS``, as the
    base model's hash is cached): every `score` hashed the whole export, ~2 GB for SmolLM2-360M,
    under the lock (a scoring review, session 42)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        stamps = json.loads((folder / STAMPS).read_text()) if (folder / STAMPS).is_file() else {}
    except (OSError, ValueError):
        return set()
    files = manifest.get("files", {})
    if manifest.get("key") != key or not isinstance(stamps, dict):
        return set()
    seen = {}
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return set()
        seen[name] = [path.stat().st_size, path.stat().st_mtime_ns, digest]
        if stamps.get(name) != seen[name] and sha256_file(path) != digest:
            return set()
    if seen != stamps:
        atomic_write_text(folder / STAMPS, json.dumps(seen))
    return set(files)


def _write_manifest(folder: Path, key: dict) -> None:
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.name not in (MANIFEST, STAMPS)}
    atomic_write_text(folder / MANIFEST, json.dumps({"key": key, "files": files}, indent=1))


def export_site_model(sm: SiteModel, folder: Path) -> None:
    """Write the fp32 graphs for ``sm`` into ``folder`` (atomically) with its manifest."""
    with atomic_folder(folder) as tmp:
        lm = merged_llm(sm)
        export_decoder(lm, tmp / FILES["fp32"])
        np.save(tmp / "embed.npy", lm.get_input_embeddings().weight.detach().float().numpy())
        del lm
        export_heads(sm, tmp)
        _write_manifest(tmp, cache_key(sm))


def ensure_export(sm: SiteModel, root: Path, precision: str, progress: Progress = None) -> Path:
    """The verified export folder for ``sm`` under ``root``: exported when absent, stale or changed;
    the int8 decoder is quantized from the fp32 one the first time it is asked for. One process
    at a time (a file lock): two clinicians scoring at once never write the same folder."""
    if precision not in FILES:
        raise EngineError(f"unknown ONNX precision {precision!r} (one of {', '.join(FILES)})")
    require("onnxruntime")
    require("onnx")
    key = cache_key(sm)
    folder = folder_for(root, key)
    with file_lock(Path(root) / "export"):
        files = verified_files(folder, key)
        if FILES["fp32"] not in files:
            prog.start(progress, f"ONNX export of adapters {key['adapters']} (once)", 1)
            export_site_model(sm, folder)
            prog.advance(progress)
        if precision == "int8" and FILES["int8"] not in files:
            prog.start(progress, "int8 quantization (once)", 1)
            quantize(folder / FILES["fp32"], folder / FILES["int8"])
            _write_manifest(folder, key)
            prog.advance(progress)
        (folder / MANIFEST).touch()                              # most recently used
        others = sorted((p for p in Path(root).iterdir() if p.is_dir() and p != folder and (p / MANIFEST).is_file()),
                        key=lambda p: (p / MANIFEST).stat().st_mtime, reverse=True)
        for old in others[KEEP - 1:]:
            shutil.rmtree(old, ignore_errors=True)
    return folder
