"""Export a site model to ONNX once per adapter state, and keep it in the workspace.

What is exported (torch.onnx's TorchScript exporter; optimum would pull transformers back to 4.x):
- ``decoder.onnx``: the base LLM with LoRA merged (peft ``merge_and_unload`` on a copy), one
  step of the decoder body + output head. Inputs: input embeddings, attention mask, position
  ids and the past KV per layer; outputs: the hidden states (MAA pools them), the logits of the
  last position and the present KV. Run with an empty past it is the prefill; with the past,
  one decoding step: the prefill-once structure of ``MLlmDR.generate``.
- ``decoder.int8.onnx`` (when asked for): the same with weight-only int8 MatMuls (blockwise scales;
  onnxruntime's MatMulNBits, see ``quantize``); its weights in ``decoder.int8.onnx.data``.
- ``lq_<modality>.onnx``, ``maa.onnx``: the LQ-formers and the regression head (fp32).
- ``embed.npy``: what the base's input embedding MODULE gives for each token id (not its raw
  ``.weight``: Gemma-style modules scale by sqrt(hidden)); the LQ-former outputs replace the slot rows.

Before a fresh export is kept it is checked against the torch model (``parity_check``: a 2-row
left-padded prompt, prefill + one decoding step; logits, MAA and the LQ-formers' slots within
``PARITY_TOL``); an export that computes something else is refused (EngineError naming
``--engine torch``) and nothing of it is kept.

One folder per adapter version (``<adapters' content hash>-<key digest>``), keyed by that hash,
the base's SHA-256 and its config.json's, the export format and the torch / transformers / onnx /
onnxruntime versions; ``manifest.json`` records the key and the SHA-256 of every file, and every
load checks both: a folder is never used for other adapters, another base or a changed file (it
is exported again).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
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
from mllm_dr.errors import MllmDrError, operator_os_error
from mllm_dr.progress import Progress

FORMAT = 3            # bump when what is exported changes: older folders are then re-exported (2: weight-only int8;
                      # 3: embed.npy from the embedding module, parity-checked, int8 weights in one .data file)
MANIFEST = "manifest.json"
STAMPS = "verified.json"   # size, mtime and hash of each file when it last matched the manifest
FILES = {"fp32": "decoder.onnx", "int8": "decoder.int8.onnx"}     # the decoder graph per precision
INT8_BLOCK = 32       # weights per int8 scale (weight-only int8, see quantize)
KEEP = 2              # adapter versions kept per workspace (a site may switch local <-> federated)
PARITY_TOL = 1e-3     # parity_check: max |onnx - torch| <= PARITY_TOL * max(1, max |torch|), per output
EMBED_CHUNK = 4096    # token ids per embedding-module call when embed.npy is written
VERSIONED = ("torch", "transformers", "onnx", "onnxruntime")   # library versions in the cache key


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
            warnings.simplefilter("ignore")  # tracer notes on shape arithmetic (parity_check runs the result)
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              opset_version=None if dynamo else 17, dynamo=dynamo, verbose=False)
    except Exception as err:
        if isinstance(err, OSError) and operator_os_error(err) is not None:
            raise                     # a full disk, a permission: the CLI names it in one line
        lines = str(err).strip().splitlines()
        raise EngineError(f"the ONNX export of {path.name} failed ({type(err).__name__}: "
                          f"{lines[0][:300] if lines else ''}); score with --engine torch") from err
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


def save_embeddings(lm, path: Path) -> None:
    """``embed.npy``: the input embedding MODULE's output for every token id, written in chunks of
    ``EMBED_CHUNK`` rows straight into the file. The raw ``.weight`` is what the module computes only
    for plain embeddings: Gemma-style modules multiply by sqrt(hidden) (a Gemma base scored 8x too
    small embeddings through ONNX, silently)."""
    module = lm.get_input_embeddings()
    vocab = module.weight.shape[0]
    out = None
    with torch.no_grad():
        for start in range(0, vocab, EMBED_CHUNK):
            rows = module(torch.arange(start, min(start + EMBED_CHUNK, vocab))).float().numpy()
            if out is None:
                out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(vocab, rows.shape[-1]))
            out[start:start + len(rows)] = rows
    out.flush()
    del out


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
    in an external file. The weights always go to one external ``<dst>.data`` file: the size of the
    fp32 graph said nothing (over 2 GB the exporter writes one file per tensor, named after the
    tensor, which a ``decoder.onnx*`` glob missed, and protobuf then refused the int8 graph), and
    one layout for every base is the layout every test runs."""
    import logging

    onnx = require("onnx")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    side = dst.parent / (dst.name + ".partial")
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir()
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))  # one INFO line per node
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=INT8_BLOCK, is_symmetric=True,
                                     accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(side / dst.name), use_external_data_format=True)
    for p in side.iterdir():
        p.replace(dst.parent / p.name)
    side.rmdir()


# ----------------------------------------------------------------------------- the cache
def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:       # not installed or broken: require() says so where it is needed
        return None


def base_config_sha256(info) -> str | None:
    """The SHA-256 of the base folder's config.json (the weights' hash misses a changed rms_norm_eps,
    rope scaling or attention kind, which change what the graph computes); None without one."""
    folder = getattr(info, "path", None)
    config = Path(folder) / "config.json" if folder else None
    return sha256_file(config) if config is not None and config.is_file() else None


def cache_key(sm: SiteModel) -> dict:
    """What a folder may be used for: these adapters (by content), this base (weights and config.json),
    this export format, these exporting / running library versions."""
    return {"format": FORMAT, "adapters": state_version(get_adapter_state(sm.model)), "base_sha256": sm.info.sha256,
            "base_config_sha256": base_config_sha256(sm.info), "base_model": sm.info.name, "dims": sm.model.dims,
            "config": sm.model.config.to_dict(), "versions": {m: _version(m) for m in VERSIONED}}


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


def _parity_prompt(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded by 3: (ids, attention mask, position ids) as ``collate(left_pad=True)``."""
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    att = torch.ones(2, 7, dtype=torch.long)
    att[1, :3] = 0
    return ids, att, (att.cumsum(1) - 1).clamp_min(0)


def parity_check(sm: SiteModel, folder: Path) -> None:
    """Run a short prompt through the torch model and the fresh export in ``folder``: the prefill's
    last logits and MAA score, one decoding step's logits (same token fed to both) and each LQ-former's
    slots must agree within ``PARITY_TOL`` (relative to max(1, the largest torch value)); else EngineError.
    The tracer's warnings are silenced in ``_export``: this is what catches a graph that computes
    something else (an embedding scaled by its module, a shape baked in, a changed attention kind)."""
    for what, diff, tol in parity_report(sm, folder):
        if not diff <= tol:         # NaN refused too
            raise EngineError(f"the ONNX export does not compute what the torch model does ({what} differ by "
                              f"{diff:.3g}, more than {tol:.3g}); nothing was kept: score with --engine torch")


def parity_report(sm: SiteModel, folder: Path) -> list[tuple[str, float, float]]:
    """(what, max |onnx - torch|, tolerance) per output compared by ``parity_check``."""
    from mllm_dr.onnx_engine import OnnxEngine

    model = sm.model
    was_training = model.training
    model.eval()
    try:
        try:
            engine = OnnxEngine(folder, "fp32", threads=None)
        except EngineError as err:
            raise EngineError(f"{err}; nothing was kept: score with --engine torch") from None
        body, head = model._llm()
        table = model.base.get_input_embeddings()
        vocab = table.weight.shape[0]
        if engine.embed.shape != (vocab, sm.info.hidden_size):
            return [(f"embed.npy's shape {engine.embed.shape}", float("inf"), 0.0)]
        ids, att, pos = _parity_prompt(vocab)
        pairs = []
        with torch.no_grad():
            emb = table(ids).float()
            out = body(inputs_embeds=emb, attention_mask=att, position_ids=pos, use_cache=True)
            logits = head(out.last_hidden_state[:, -1]).float()
            reg = model.maa(out.last_hidden_state, att.bool()).float()
            token = logits.argmax(-1)
            att2, pos2 = torch.cat([att, torch.ones_like(att[:, :1])], 1), pos[:, -1:] + 1
            step = body(input_ids=token[:, None], attention_mask=att2, position_ids=pos2, cache=out.cache,
                        use_cache=True)
            logits2 = head(step.last_hidden_state[:, -1]).float()
            for m, lq in model.lq.items():
                feats, pad = torch.randn(2, 5, lq.in_dim, generator=torch.Generator().manual_seed(1)), \
                    torch.zeros(2, 5, dtype=torch.bool)
                pad[1, 3:] = True
                slots = engine.lq[m].run(None, {"features": feats.numpy(), "padding": pad.numpy()})[0]
                pairs.append((f"the {m} LQ-former's slots", lq(feats, pad).float().numpy(), slots))
        empty = [np.zeros((2, engine.kv_heads, 0, engine.head_dim), np.float32)] * len(engine.past_names)
        hidden, o_logits, past = engine.step(np.array(engine.embed[ids.numpy()], dtype=np.float32), att.numpy(),
                                             pos.numpy(), empty, hidden=True)
        o_reg = engine.maa.run(None, {"hidden": hidden, "mask": att.bool().numpy()})[0]
        _, o_logits2, _ = engine.step(np.array(engine.embed[token.numpy()[:, None]], dtype=np.float32),
                                      att2.numpy(), pos2.numpy(), past)
        pairs[:0] = [("the prefill's logits", logits.numpy(), o_logits), ("the MAA score", reg.numpy(), o_reg),
                     ("a decoding step's logits", logits2.numpy(), o_logits2)]
        del engine
    finally:
        model.train(was_training)
    report = []
    for what, ref, got in pairs:
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        diff = float(np.abs(ref - got).max()) if ref.shape == got.shape else float("inf")
        report.append((what, diff, PARITY_TOL * max(1.0, float(np.abs(ref).max()))))
    return report


def export_site_model(sm: SiteModel, folder: Path) -> None:
    """Write the fp32 graphs for ``sm`` into ``folder`` (atomically) with its manifest, once they pass
    ``parity_check`` (else nothing is kept: the side folder goes, an earlier ``folder`` stays)."""
    with atomic_folder(folder) as tmp:
        lm = merged_llm(sm)
        export_decoder(lm, tmp / FILES["fp32"])
        save_embeddings(lm, tmp / "embed.npy")
        del lm
        export_heads(sm, tmp)
        parity_check(sm, tmp)
        _write_manifest(tmp, cache_key(sm))


def sweep(root: Path) -> None:
    """Folders an export killed mid-way left (each can be GBs); the caller holds the export lock, so no
    writer is using them, and no reader ever opens these names. ``<folder>.partial`` (an export or a
    quantization cut short) goes; ``<folder>.old`` (a swap cut short between its two renames) is put back
    when ``<folder>`` is missing and it has a manifest (verified as any folder before use), else goes."""
    for p in Path(root).iterdir():
        if not p.is_dir():
            continue
        if p.name.endswith(".partial"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(".old"):
            live = p.with_name(p.name[: -len(".old")])
            if not live.exists() and (p / MANIFEST).is_file():
                p.rename(live)
            else:
                shutil.rmtree(p, ignore_errors=True)
        else:
            for inner in p.glob("*.partial"):              # quantize's side folder
                if inner.is_dir():
                    shutil.rmtree(inner, ignore_errors=True)


def ensure_export(sm: SiteModel, root: Path, precision: str, progress: Progress = None, force: bool = False) -> Path:
    """The verified export folder for ``sm`` under ``root``: exported when absent, stale or changed (or
    ``force``: a folder onnxruntime could not load); the int8 decoder is quantized from the fp32 one the
    first time it is asked for. One process at a time (a file lock): two clinicians scoring at once never
    write the same folder. onnxscript (the LQ-formers' exporter) is required only when exporting."""
    if precision not in FILES:
        raise EngineError(f"unknown ONNX precision {precision!r} (one of {', '.join(FILES)})")
    require("onnxruntime")
    require("onnx")
    key = cache_key(sm)
    folder = folder_for(root, key)
    with file_lock(Path(root) / "export"):
        sweep(root)
        files = set() if force else verified_files(folder, key)
        if FILES["fp32"] not in files:
            require("onnxscript")
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
