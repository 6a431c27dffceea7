"""The ONNX Runtime scoring engine on tiny-random: same tokens and MAA scores as the torch model,
an export cache that follows the adapters, the CLI end to end, and a clean error without onnxruntime."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_json, run_cli
from test_model import SMALL, _example, _model

from mllm_dr.config import ModelConfig
from mllm_dr.onnx_engine import make_engine
from mllm_dr.onnx_export import FILES, KEEP, EngineError, cache_key, ensure_export, require, verified_files

TEXT_ONLY = ModelConfig(use_audio=False, use_visual=False)     # no LQ-former: a quick export


def _lively(tiny, seed=1, config=None):
    """A tiny model with large random LoRA factors, so greedy decoding says more than one token."""
    sm = _model(tiny, config)
    sm.model.enable_lora()
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in sm.model.base.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    return sm.to("cpu"), sm.model.eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    sm, _ = _lively(tiny)
    root = tmp_path_factory.mktemp("onnx")
    return sm, root, make_engine("onnx", sm, root, threads=2)


def test_onnx_engine_matches_torch_tokens_and_maa(exported):
    sm, root, engine = exported
    tok = sm.processor.tok
    batch = sm.processor.collate([_example(answer=None), _example(answer=None, visual=True),
                                  _example(answer=None, label=0)], left_pad=True)
    ids_t, reg_t = sm.model.generate(batch, 16, tok.eos_token_id, tok.pad_token_id)
    ids_o, reg_o = engine.generate(batch, 16, tok.eos_token_id, tok.pad_token_id)
    assert len(set(ids_t[0].tolist())) > 3                 # the model really decodes (not one repeated token)
    assert torch.equal(ids_t, ids_o)
    assert torch.allclose(reg_t, reg_o, rtol=1e-4, atol=1e-6)
    # a token chooser (quotes.VerbatimQuotes in scoring) sees each engine's logits and decides the token
    def second_best(logits, done):
        return logits.topk(2).indices[:, 1]
    ids_t2, _ = sm.model.generate(batch, 16, tok.eos_token_id, tok.pad_token_id, second_best)
    ids_o2, _ = engine.generate(batch, 16, tok.eos_token_id, tok.pad_token_id, second_best)
    assert torch.equal(ids_t2, ids_o2) and not torch.equal(ids_t2[:, :1], ids_t[:, :1])
    # several end tokens (scoring passes generation.end_token_ids): each row's third token ends it in both engines
    ends = [tok.eos_token_id, *ids_t[:, 2].tolist()]
    ids_t3, _ = sm.model.generate(batch, 16, ends, tok.pad_token_id)
    ids_o3, _ = engine.generate(batch, 16, ends, tok.pad_token_id)
    assert torch.equal(ids_t3, ids_o3) and ids_t3.shape[1] <= 3
    with torch.no_grad():                                  # LQ-former outputs in their slots, as the model puts them
        assert np.allclose(sm.model.embed(batch).numpy(), engine.embeddings(batch), atol=1e-5)
    # the prefill's last-position logits themselves, not only their argmax
    with torch.no_grad():
        body, head = sm.model._llm()
        h = body(inputs_embeds=sm.model.embed(batch), attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids).last_hidden_state
    empty = [np.zeros((3, engine.kv_heads, 0, engine.head_dim), np.float32)] * len(engine.past_names)
    _, logits, _ = engine.step(engine.embeddings(batch), batch.attention_mask.numpy(), batch.position_ids.numpy(), empty)
    assert np.allclose(head(h[:, -1]).numpy(), logits, atol=1e-3)
    # int8: weight-only (blockwise scales; activations stay float), so the logits stay close to fp32's;
    # MAA close (the fallback score rarely moves). Dynamic int8 (per-tensor activation scales) erred
    # 6.1% here and broke SmolLM2's answer format on 15 of 16 items; weight-only: 2.7%, 0 of 16.
    int8 = make_engine("onnx-int8", sm, root, threads=2)
    ids_q, reg_q = int8.generate(batch, 16, tok.eos_token_id, tok.pad_token_id)
    assert ids_q.shape[0] == 3 and torch.allclose(reg_q, reg_t, atol=0.05)
    assert int8.name == "onnx-int8" and (int8.folder / FILES["int8"]).is_file()
    import onnx
    ops = [n.op_type for n in onnx.load(str(int8.folder / FILES["int8"]), load_external_data=False).graph.node]
    assert "MatMulNBits" in ops and "DynamicQuantizeLinear" not in ops
    _, logits_q, _ = int8.step(int8.embeddings(batch), batch.attention_mask.numpy(), batch.position_ids.numpy(), empty)
    rel = np.linalg.norm(logits_q - logits) / np.linalg.norm(logits - logits.mean())
    # On this tiny-random base with large random LoRA factors the error depends on the prompt and the
    # LoRA draw: 2.7-5.5% over both answer orders x LoRA seeds 1-3 (session 12); the bound keeps the
    # int8 logits within 8% of fp32's. The weight-only vs dynamic choice is checked by the ops above.
    assert 0 < rel < 0.08, rel


def test_onnx_engine_matches_torch_on_left_padded_prompts_of_different_lengths(exported):
    """Session 45 (an ONNX review): the parity test above collates three prompts of the same length (an
    all-ones mask, the same positions in every row), so a padding, position or KV regression could not
    show. Here: a short prompt, a long one and another item without any modality, left-padded in one
    batch: the same tokens and MAA as torch, and each row the same as scored alone."""
    from mllm_dr.aspects import AspectInstance
    from mllm_dr.processor import Example

    sm, _, engine = exported
    tok = sm.processor.tok

    def example(dialogue, item="Sleep", audio=True):
        inst = AspectInstance("p1", item, 2, dialogue, 1, 1, evidence="i can't sleep")
        return Example(inst, {"audio": torch.randn(9, 25) if audio else None, "visual": None}, None, 2)

    torch.manual_seed(5)
    rows = [example("Participant: i can't sleep at night"),
            example("Participant: i can't sleep at night. " + "I wake up at four and lie awake for hours. " * 6),
            example("Participant: fine", item="Appetite", audio=False)]
    batch = sm.processor.collate(rows, left_pad=True)
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) == 3                                           # really padded, three ways
    assert batch.feat_pad["audio"][2, 1:].all() and not batch.feat_pad["audio"][:2].any()   # row 3: no audio
    ids_t, reg_t = sm.model.generate(batch, 12, tok.eos_token_id, tok.pad_token_id)
    ids_o, reg_o = engine.generate(batch, 12, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(ids_t, ids_o)
    assert torch.allclose(reg_t, reg_o, rtol=1e-4, atol=1e-6)
    for i, row in enumerate(rows):                                          # padding changes nothing
        alone = sm.processor.collate([row], left_pad=True)
        ids_1, reg_1 = engine.generate(alone, 12, tok.eos_token_id, tok.pad_token_id)
        n = min(ids_1.shape[1], ids_o.shape[1])
        assert torch.equal(ids_1[0, :n], ids_o[i, :n]), i
        assert reg_1[0].item() == pytest.approx(reg_o[i].item(), rel=1e-4, abs=1e-5), i


def test_export_cache_follows_the_adapters(tiny, tmp_path):
    sm, _ = _lively(tiny, config=TEXT_ONLY)
    root = tmp_path / "onnx"
    folder = make_engine("onnx", sm, root, threads=2).folder
    key = cache_key(sm)
    assert FILES["fp32"] in verified_files(folder, key)
    stamp = (folder / FILES["fp32"]).stat().st_mtime_ns
    assert ensure_export(sm, root, "fp32") == folder and (folder / FILES["fp32"]).stat().st_mtime_ns == stamp  # reused
    # never for another base
    assert not verified_files(folder, key | {"base_sha256": "0" * 64})
    # adapters change -> another folder, whose graphs compute the new adapters
    other, _ = _lively(tiny, seed=2, config=TEXT_ONLY)
    assert cache_key(other)["adapters"] != key["adapters"]
    moved = make_engine("onnx", other, root, threads=2)
    assert moved.folder != folder
    tok = sm.processor.tok
    batch = other.processor.collate([_example(answer=None)], left_pad=True)
    assert torch.equal(moved.generate(batch, 6, tok.eos_token_id, tok.pad_token_id)[0],
                       other.model.generate(batch, 6, tok.eos_token_id, tok.pad_token_id)[0])
    # a changed file is caught and the folder exported again
    with open(moved.folder / "maa.onnx", "ab") as fh:
        fh.write(b"\0")
    corrupted = (moved.folder / "maa.onnx").read_bytes()
    assert not verified_files(moved.folder, cache_key(other))
    assert ensure_export(other, root, "fp32") == moved.folder and verified_files(moved.folder, cache_key(other))
    assert (moved.folder / "maa.onnx").read_bytes() != corrupted          # exported again, not re-stamped
    # a third adapter version: the least recently used folder goes (KEEP versions are kept)
    third, _ = _lively(tiny, seed=3, config=TEXT_ONLY)
    newest = ensure_export(third, root, "fp32")
    assert sorted(p for p in root.iterdir() if p.is_dir()) == sorted([moved.folder, newest]) and KEEP == 2


def test_missing_module_is_one_clean_error():
    with pytest.raises(EngineError, match="needs no_such_runtime_xyz .*--engine torch"):
        require("no_such_runtime_xyz")
    with pytest.raises(EngineError, match="unknown engine"):
        make_engine("tensorrt", None, "/nonexistent")


def test_cli_score_and_evaluate_with_onnx(site_ws, tmp_path):
    from mllm_dr.config import TrainConfig
    from mllm_dr.dataset import load_corpus
    from mllm_dr.evaluation import evaluate_split, regression_evaluate, score_participant
    from mllm_dr.metrics import compute
    from mllm_dr.local_run import load_trained, train_local

    config = ModelConfig(use_visual=False, lq=SMALL.lq)                 # one LQ-former: a quicker export
    train_local(site_ws, "tiny-random", config, TrainConfig(stage1_epochs=1, stage2_epochs=1))
    from mllm_dr.adapters import participant_keys, read_meta
    from mllm_dr.dataset import labelled_training_instances

    trained = participant_keys({i.participant for i in labelled_training_instances(site_ws)})   # session 42: kept
    assert trained and read_meta(site_ws.checkpoints_dir / "local" / "latest")["trained_on"] == trained
    env = {"MLLMDR_WORKSPACE": str(site_ws.root)}
    test_id = load_corpus(site_ws).participants[0].id
    sm = load_trained(site_ws)
    torch_out = score_participant(site_ws, sm, test_id, 8)
    # evaluate reports the MAA head alone beside the kit's answer: the same totals as the cheap check
    full, check = evaluate_split(site_ws, sm, "train", 8), regression_evaluate(site_ws, sm, "train")
    assert full.head_stats.n == check.stats.n > 0
    assert compute(full.head_stats) == pytest.approx(compute(check.stats), nan_ok=True)
    assert full.metrics()["maa_mae"] == pytest.approx(compute(check.stats)["mae"])
    # each item's rationale stays in the site's evaluation rows (the repeated/grounded checks can be read back)
    assert all(isinstance(it["rationale"], str) and it["rationale"] for r in full.rows for it in r["items"].values())
    onnx_out = cli_json("mllmdr-site", "score", test_id, "--max-new-tokens", "8", "--engine", "onnx", env=env)
    assert [i["score"] for i in onnx_out["items"]] == [i["score"] for i in torch_out["items"]]
    assert onnx_out["engine"] == "onnx"           # what produced the scores is named where they are read
    assert [i["regression_score"] for i in onnx_out["items"]] == pytest.approx(
        [i["regression_score"] for i in torch_out["items"]], abs=1e-3)
    folders = [p for p in (site_ws.checkpoints_dir / "onnx").iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith(onnx_out["adapters"])
    ev = cli_json("mllmdr-site", "evaluate", "--split", "train", "--max-new-tokens", "8", "--engine", "onnx-int8",
                  env=env)
    assert ev["n"] > 0 and any("not held out" in w for w in ev["warnings"])     # train is training data
    assert ev["engine"] == "onnx-int8" and "engine onnx-int8 (int8 weights)" in Path(ev["report"]).read_text()
    rows = json.loads(Path(ev["rows"]).read_text())["rows"]      # per-participant rows beside the report, on site
    assert len(rows) == ev["n"] and all(it["rationale"] for r in rows for it in r["items"].values())
    events = [json.loads(x) for x in (site_ws.audit_path).read_text().splitlines()]
    assert [e.get("engine") for e in events if e["event"] in ("score", "evaluate")] == ["onnx", "onnx-int8"]
    # a review rates the scores the clinician was shown (the last `score`: onnx), with no engine named: it
    # used to score again with torch unless every option of `score` was repeated
    rv = cli_json("mllmdr-site", "review", test_id, "--ratings", ",".join("3" * len(onnx_out["items"])),
                  "--score", onnx_out["kept_score_sha256"], env=env)
    assert rv["engine"] == "onnx" and rv["model_total"] == onnx_out["total"]
    assert [json.loads(x) for x in site_ws.audit_path.read_text().splitlines()][-1]["engine"] == "onnx"
    other = run_cli("mllmdr-site", "review", test_id, "--ratings", ",".join("3" * len(onnx_out["items"])),
                    "--engine", "torch", check=False, env=env)
    assert other.returncode == 2 and "came from engine onnx, not torch" in other.stderr, other.stderr
    # a broken onnxruntime: one line, exit 2, no traceback
    fake = tmp_path / "fake"
    (fake / "onnxruntime").mkdir(parents=True)
    (fake / "onnxruntime" / "__init__.py").write_text("raise ImportError('libonnxruntime.so: cannot open')\n")
    bad = run_cli("mllmdr-site", "score", test_id, "--engine", "onnx", check=False,
                  env={**env, "PYTHONPATH": str(fake)})
    assert bad.returncode == 2 and "needs onnxruntime" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_an_unchanged_export_is_not_hashed_again_and_a_changed_one_is_caught(tmp_path, monkeypatch):
    """Session 42 (a scoring review): every `score --engine onnx` SHA-256'd every file of the export under
    the lock (~2 GB for SmolLM2-360M). Now a file is hashed again only when its size or mtime changed since
    it last matched; a changed file is still refused."""
    import os

    import mllm_dr.onnx_export as ox

    folder, key = tmp_path / "export", {"format": 1}
    folder.mkdir()
    for name in ("decoder.onnx", "maa.onnx"):
        (folder / name).write_bytes(os.urandom(4096))
    ox._write_manifest(folder, key)
    hashed = []
    real = ox.sha256_file
    monkeypatch.setattr(ox, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert verified_files(folder, key) == {"decoder.onnx", "maa.onnx"} and len(hashed) == 2    # first use
    assert verified_files(folder, key) == {"decoder.onnx", "maa.onnx"} and len(hashed) == 2    # not again
    data = bytearray((folder / "maa.onnx").read_bytes())
    data[0] ^= 1                                              # same size, a new mtime
    before = (folder / "maa.onnx").stat().st_mtime_ns
    (folder / "maa.onnx").write_bytes(bytes(data))
    os.utime(folder / "maa.onnx", ns=(before + 10**9, before + 10**9))     # coarse clocks: a visibly new mtime
    assert verified_files(folder, key) == set() and hashed[-1] == "maa.onnx"


def test_the_onnx_engines_load_on_cpu_and_refuse_cuda_before_the_model_loads(tmp_path, monkeypatch):
    """`score`/`evaluate --engine onnx` on a GPU host (--device auto -> cuda) loaded the model on cuda, then
    failed in make_engine after minutes of loading; --device cuda was refused only then. Now check_engine says
    where to load (cpu for the ONNX engines) and refuses cuda in one line, before anything is loaded."""
    from test_clinician_safety import ModelLoaded, cmdc_ws, refuse_model, score_args

    from cli.site_model import Adapters, Device, Engine, evaluate, score
    from mllm_dr.onnx_engine import check_engine

    assert check_engine("onnx", "auto") == check_engine("onnx-int8", "cpu") == "cpu"
    assert check_engine("torch", "auto") == "auto" and check_engine("torch", "cuda") == "cuda"
    with pytest.raises(EngineError, match="--device cpu"):
        check_engine("onnx-int8", "cuda")
    ws = cmdc_ws(tmp_path)
    devices = refuse_model(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)          # a GPU host
    for engine, device in ((Engine.onnx, Device.cuda), (Engine.onnx_int8, Device.cuda)):
        with pytest.raises(EngineError, match="runs on CPU: use --device cpu"):
            score("HC01", workspace=ws.root, **score_args(engine=engine, device=device))
        with pytest.raises(EngineError, match="runs on CPU: use --device cpu"):
            evaluate(workspace=ws.root, split="test", base_model=None, device=device, max_new_tokens=8,
                     adapters=Adapters.auto, report=None, engine=engine, json_out=True)
    assert devices == []                                                   # refused before any model loaded
    for engine, where in ((Engine.onnx, "cpu"), (Engine.torch, "cuda")):
        with pytest.raises(ModelLoaded):
            score("HC01", workspace=ws.root, **score_args(engine=engine, device=Device.auto))
        with pytest.raises(ModelLoaded):
            evaluate(workspace=ws.root, split="test", base_model=None, device=Device.auto, max_new_tokens=8,
                     adapters=Adapters.auto, report=None, engine=engine, json_out=True)
        assert devices[-2:] == [where, where], engine
    assert not ws.audit_path.exists()
