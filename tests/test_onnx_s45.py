"""Session 45 (a review of the ONNX engine): a Gemma base's embeddings, the parity check that refuses an export
computing something else, a cache key that follows the base's config.json and the library versions, a cached
folder onnxruntime cannot load, the folders an export killed mid-way leaves, int8 weights of a base over 2 GB,
and onnxscript asked for only when an export is needed. Tiny bases only (text-only: no LQ-former to export)."""

import dataclasses
import errno
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from test_model import _example
from test_onnx_engine import TEXT_ONLY, _lively

import mllm_dr.onnx_engine as oe
import mllm_dr.onnx_export as ox
from mllm_dr.onnx_engine import OnnxEngine, check_engine, make_engine
from mllm_dr.onnx_export import FILES, EngineError, cache_key, ensure_export, folder_for, verified_files


def _dirs(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _same_answers(sm, engine, batch, steps=6):
    tok = sm.processor.tok
    ids_t, reg_t = sm.model.generate(batch, steps, tok.eos_token_id, tok.pad_token_id)
    ids_o, reg_o = engine.generate(batch, steps, tok.eos_token_id, tok.pad_token_id)
    return torch.equal(ids_t, ids_o) and torch.allclose(reg_t, reg_o, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- 1: embeddings, parity, export errors
def test_a_gemma_base_gets_the_embeddings_its_module_computes(tiny, tmp_path):
    """embed.npy held the raw embedding weight; Gemma's module multiplies it by sqrt(hidden) (8 here), so
    every ONNX score of a Gemma base came from 8x too small embeddings, silently."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from mllm_dr.adapters import build_site_model
    from mllm_dr.base_model import load_base

    _, tok, _ = tiny
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                       sliding_window=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Gemma2ForCausalLM(cfg).save_pretrained(str(tmp_path / "gemma"))
    tok.save_pretrained(str(tmp_path / "gemma"))
    base, gtok, info = load_base(str(tmp_path / "gemma"))
    assert "Scaled" in type(base.get_input_embeddings()).__name__           # really a scaling embedding module
    sm = build_site_model(base, gtok, info, {"audio": 25}, TEXT_ONLY, seed=0)
    sm.model.eval()
    engine = make_engine("onnx", sm, tmp_path / "onnx", threads=1)
    batch = sm.processor.collate([_example(answer=None)], left_pad=True)
    with torch.no_grad():
        assert np.allclose(sm.model.embed(batch).numpy(), engine.embeddings(batch), atol=1e-5)
    assert _same_answers(sm, engine, batch)


def test_an_export_that_computes_something_else_is_refused_and_nothing_is_kept(tiny, tmp_path, monkeypatch):
    """The export was never run against torch (the tracer's warnings are silenced): now a 2-row left-padded
    prompt (prefill + one decoding step) must give the same logits and MAA, else the export is refused."""
    sm, _ = _lively(tiny, config=TEXT_ONLY)
    real = ox.export_heads

    def scaled_embeddings(sm_, folder):         # embed.npy as the Gemma bug wrote it: off by a factor
        real(sm_, folder)
        np.save(folder / "embed.npy", np.load(folder / "embed.npy") * 8)

    monkeypatch.setattr(ox, "export_heads", scaled_embeddings)
    root = tmp_path / "onnx"
    with pytest.raises(EngineError, match="does not compute what the torch model does .*--engine torch"):
        make_engine("onnx", sm, root, threads=1)
    assert _dirs(root) == []                                                # no folder, no .partial
    monkeypatch.setattr(ox, "export_heads", real)
    report = ox.parity_report(sm, make_engine("onnx", sm, root, threads=1).folder)
    assert {w for w, _, _ in report} >= {"the prefill's logits", "the MAA score", "a decoding step's logits"}
    assert all(diff <= tol / 100 for _, diff, tol in report), report       # the tolerance is far from the noise


def test_a_failing_torch_onnx_export_is_one_engine_error(tiny, tmp_path, monkeypatch):
    """An exporter failure (an op it cannot write) surfaced as exit 3 "internal error"; now one EngineError
    naming --engine torch. A full disk stays an OSError: the CLI already names it in one line."""
    sm, _ = _lively(tiny, config=TEXT_ONLY)
    root = tmp_path / "onnx"

    def unsupported(*a, **k):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX opset version 17 is not supported.\n"
                           "Please feel free to request support")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(EngineError, match=r"export of decoder\.onnx failed \(RuntimeError: .*frobnicate.*"
                                          r"--engine torch") as err:
        ensure_export(sm, root, "fp32")
    assert "\n" not in str(err.value) and _dirs(root) == []

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    with pytest.raises(OSError) as err:
        ensure_export(sm, root, "fp32")
    assert not isinstance(err.value, EngineError) and _dirs(root) == []


# ------------------------------------------------------------------------ 2: the cache key, a folder that won't load
def test_the_cache_key_follows_the_base_config_and_the_library_versions(tiny, tmp_path, monkeypatch):
    """The key held the base's weights hash but not its config.json: a changed rms_norm_eps (or rope scaling,
    attention kind) kept using graphs exported for the old config; nor did it hold the library versions."""
    import onnxruntime

    sm, _ = _lively(tiny, config=TEXT_ONLY)
    shutil.copy(sm.info.path / "config.json", tmp_path / "config.json")
    sm.info = dataclasses.replace(sm.info, path=tmp_path)
    before = cache_key(sm)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    edited = cache_key(sm)
    assert edited != before and folder_for(tmp_path, edited) != folder_for(tmp_path, before)
    assert edited["adapters"] == before["adapters"]            # same adapters, yet another folder
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    assert cache_key(sm) != edited
    assert set(edited["versions"]) == {"torch", "transformers", "onnx", "onnxruntime"}


def test_a_cached_folder_onnxruntime_cannot_load_is_exported_again_once(tiny, tmp_path, monkeypatch):
    sm, _ = _lively(tiny, config=TEXT_ONLY)
    root = tmp_path / "onnx"
    folder = ensure_export(sm, root, "fp32")
    (folder / FILES["fp32"]).write_bytes(b"not a graph")
    ox._write_manifest(folder, cache_key(sm))                  # its manifest matches: only onnxruntime can tell
    assert FILES["fp32"] in verified_files(folder, cache_key(sm))
    engine = make_engine("onnx", sm, root, threads=1)          # was: EngineError "onnxruntime cannot load it"
    assert engine.folder == folder and (folder / FILES["fp32"]).stat().st_size > 1000
    assert _same_answers(sm, engine, sm.processor.collate([_example(answer=None)], left_pad=True))

    class Unloadable(OnnxEngine):
        def __init__(self, folder, *a, **k):
            raise EngineError(f"{folder}: onnxruntime cannot load it (a test)")

    monkeypatch.setattr(oe, "OnnxEngine", Unloadable)
    with pytest.raises(EngineError, match=f"{folder}.*delete that folder, or score with --engine torch"):
        make_engine("onnx", sm, root, threads=1)


# ----------------------------------------------------------------------------- 4: what an export killed mid-way leaves
def test_folders_an_export_killed_midway_left_are_cleaned_under_the_lock(tiny, tmp_path):
    sm, _ = _lively(tiny, config=TEXT_ONLY)
    root = tmp_path / "onnx"
    folder = ensure_export(sm, root, "fp32")
    for name in ("x.partial", "y.old"):                        # a killed export; a swap's leftover (no manifest)
        (root / name).mkdir()
        (root / name / "decoder.onnx").write_bytes(b"\0" * 1000)
    (folder / "decoder.int8.onnx.partial").mkdir()             # a killed quantization
    assert ensure_export(sm, root, "fp32") == folder
    assert _dirs(root) == [folder.name] and not (folder / "decoder.int8.onnx.partial").exists()
    # a swap cut short between its two renames: the folder set aside is put back, not exported again
    stamp = (folder / FILES["fp32"]).stat().st_mtime_ns
    folder.rename(folder.with_name(folder.name + ".old"))
    assert ensure_export(sm, root, "fp32") == folder and _dirs(root) == [folder.name]
    assert (folder / FILES["fp32"]).stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- 5: int8 of a base over 2 GB
def test_int8_weights_go_to_one_external_data_file_whatever_the_fp32_layout(tiny, tmp_path):
    """Over 2 GB the exporter writes each weight to its own file named after the tensor; the int8 step looked
    for decoder.onnx* to decide on external data, found ~nothing, and protobuf refused the int8 graph. Here a
    tiny export re-saved that way (one file per tensor) is quantized: its weights go to one .data file."""
    import onnx

    sm, _ = _lively(tiny, config=TEXT_ONLY)
    folder = ensure_export(sm, tmp_path / "onnx", "fp32")
    big = tmp_path / "big"
    big.mkdir()
    onnx.save_model(onnx.load(str(folder / FILES["fp32"])), str(big / FILES["fp32"]), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(big.iterdir())) > 3 and not list(big.glob(FILES["fp32"] + ".*"))   # per-tensor files
    for name in ("maa.onnx", "embed.npy"):
        shutil.copy(folder / name, big / name)
    ox.quantize(big / FILES["fp32"], big / FILES["int8"])
    assert (big / (FILES["int8"] + ".data")).is_file() and not list(big.glob("*.partial"))
    graph = onnx.load(str(big / FILES["int8"]), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    fp32, int8 = OnnxEngine(folder, "fp32", threads=1), OnnxEngine(big, "int8", threads=1)
    batch = sm.processor.collate([_example(answer=None)], left_pad=True)
    empty = [np.zeros((1, fp32.kv_heads, 0, fp32.head_dim), np.float32)] * len(fp32.past_names)
    args = (fp32.embeddings(batch), batch.attention_mask.numpy(), batch.position_ids.numpy(), empty)
    (_, ref, _), (_, got, _) = fp32.step(*args), int8.step(*args)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean()) < 0.08


# ----------------------------------------------------------------------------- 6: onnxscript only to export
def test_a_cached_export_scores_without_onnxscript(tiny, tmp_path, monkeypatch):
    sm, _ = _lively(tiny, config=TEXT_ONLY)
    root = tmp_path / "onnx"
    folder = ensure_export(sm, root, "fp32")
    monkeypatch.setitem(sys.modules, "onnxscript", None)        # `import onnxscript` fails
    assert check_engine("onnx", "auto") == "cpu"               # was: "the ONNX engine needs onnxscript"
    assert make_engine("onnx", sm, root, threads=1).folder == folder
    other, _ = _lively(tiny, seed=2, config=TEXT_ONLY)          # new adapters: an export is needed
    with pytest.raises(EngineError, match="needs onnxscript"):
        make_engine("onnx", other, root, threads=1)
    assert _dirs(root) == [folder.name]
