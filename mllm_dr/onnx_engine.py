"""Scoring engines: the torch model itself, or the same model exported to ONNX Runtime (CPU sites).

An engine is anything with ``generate(batch, max_new_tokens, eos_token_id, pad_token_id, choose=None)
-> (new token ids [B, <= max_new_tokens], MAA scores [B])`` (``choose``: the greedy step's token
choice, see quotes.py); ``scoring.score_examples`` parses
its answers and falls back to MAA, whichever engine produced them. The ONNX engine follows
``MLlmDR.generate`` step for step: LQ-formers -> slot embeddings, one prefill through the
decoder graph (its hidden states feed MAA, its KV the decoding), then greedy steps that feed
back the KV, all rows until every row has produced EOS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mllm_dr.adapters import SiteModel
from mllm_dr.onnx_export import FILES, EngineError, ensure_export, require
from mllm_dr.processor import Batch
from mllm_dr.progress import Progress

ENGINES = ("torch", "onnx", "onnx-int8")
WEIGHTS = {"torch": "fp32", "onnx": "fp32", "onnx-int8": "int8"}     # what each engine scores with


def engine_label(kind: str) -> str:
    """The engine as a reader of scores sees it named: int8 weights change about 1 item score in 16 (README)."""
    return f"{kind} ({WEIGHTS[kind]} weights)"


class OnnxEngine:
    """ONNX Runtime sessions over one verified export folder (see onnx_export.py)."""

    def __init__(self, folder: Path, precision: str = "fp32", threads: int | None = None):
        ort = require("onnxruntime")
        self.folder, self.precision = Path(folder), precision
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        def session(name: str):
            try:
                return ort.InferenceSession(str(self.folder / name), opts, providers=["CPUExecutionProvider"])
            except Exception as err:     # onnxruntime raises its own exception types
                raise EngineError(f"{self.folder / name}: onnxruntime cannot load it ({err})") from None

        self.decoder = session(FILES[precision])
        self.maa = session("maa.onnx")
        self.lq = {p.stem[3:]: session(p.name) for p in sorted(self.folder.glob("lq_*.onnx"))}
        try:
            self.embed = np.load(self.folder / "embed.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise EngineError(f"{self.folder / 'embed.npy'}: cannot be read ({err})") from None
        self.past_names = [i.name for i in self.decoder.get_inputs()][3:]
        self.present_names = [o.name for o in self.decoder.get_outputs()][2:]
        _, heads, _, head_dim = self.decoder.get_inputs()[3].shape
        self.kv_heads, self.head_dim = int(heads), int(head_dim)

    @property
    def name(self) -> str:
        return "onnx-int8" if self.precision == "int8" else "onnx"

    def embeddings(self, batch: Batch) -> np.ndarray:
        """Token embeddings with each modality's slots replaced by its LQ-former output (as ``MLlmDR.embed``)."""
        emb = np.array(self.embed[batch.input_ids.numpy()], dtype=np.float32)
        for m, sess in self.lq.items():
            slots = batch.slots[m].numpy()
            proj = sess.run(None, {"features": batch.feats[m].numpy().astype(np.float32),
                                   "padding": batch.feat_pad[m].numpy()})[0]
            emb[slots] = proj.reshape(-1, emb.shape[-1])[: int(slots.sum())]
        return emb

    def step(self, embeds: np.ndarray, att: np.ndarray, pos: np.ndarray, past: list, hidden: bool = False):
        """One decoder run -> (hidden states or None, last-position logits, present KV). The KV stays
        in onnxruntime's own buffers (IO binding) from one step to the next: no copy through numpy."""
        io = self.decoder.io_binding()
        for name, value in (("embeds", embeds), ("attention_mask", att), ("position_ids", pos)):
            io.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self.past_names, past):
            io.bind_ortvalue_input(name, value) if hasattr(value, "data_ptr") else io.bind_cpu_input(name, value)
        for name in ("hidden", "logits", *self.present_names):
            io.bind_output(name, "cpu")
        self.decoder.run_with_iobinding(io)
        out = io.get_outputs()
        return (out[0].numpy() if hidden else None), out[1].numpy(), out[2:]

    def generate(self, batch: Batch, max_new_tokens: int, eos_token_id: int | list[int], pad_token_id: int,
                 choose=None) -> tuple[torch.Tensor, torch.Tensor]:
        att = batch.attention_mask.numpy().astype(np.int64)
        pos = batch.position_ids.numpy().astype(np.int64)
        b = att.shape[0]
        empty = [np.zeros((b, self.kv_heads, 0, self.head_dim), np.float32)] * len(self.past_names)
        hidden, logits, past = self.step(self.embeddings(batch), att, pos, empty, hidden=True)
        mask = batch.prompt_mask.numpy() & att.astype(bool)
        reg = self.maa.run(None, {"hidden": hidden, "mask": mask})[0]
        pos = pos[:, -1:]
        done = np.zeros(b, dtype=bool)
        ends = np.array(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], dtype=np.int64)
        new = []
        for _ in range(max_new_tokens):
            best = logits.argmax(-1) if choose is None else choose(torch.from_numpy(logits), torch.from_numpy(done)).numpy()
            token = np.where(done, pad_token_id, best).astype(np.int64)
            new.append(token)
            done |= np.isin(token, ends)
            if done.all():
                break
            att = np.concatenate([att, np.ones((b, 1), np.int64)], axis=1)
            pos = pos + 1
            _, logits, past = self.step(np.array(self.embed[token[:, None]], dtype=np.float32), att, pos, past)
        return torch.from_numpy(np.stack(new, axis=1)), torch.from_numpy(reg.astype(np.float32))


def check_engine(kind: str, device: str = "auto") -> str:
    """Fail early, in one line, when the engine cannot run here (before any model is loaded); returns
    the device to load the model on. The ONNX engines export the fp32 base on CPU: 'auto' means cpu for
    them and 'cuda' is refused now, not after minutes of loading (a scoring review, session 42);
    onnxruntime and onnx are checked here, onnxscript (the LQ-formers' exporter) only when an export is
    needed (``ensure_export``): a cached export scores without it."""
    if kind == "torch":
        return device
    if kind not in ENGINES:
        raise EngineError(f"unknown engine {kind!r} (one of {', '.join(ENGINES)})")
    if device == "cuda":
        raise EngineError(f"the {kind} engine runs on CPU: use --device cpu (or auto), or --engine torch on the GPU")
    for module in ("onnxruntime", "onnx"):
        require(module)
    return "cpu"


def make_engine(kind: str, sm: SiteModel, cache_root: Path, threads: int | None = None,
                progress: Progress = None):
    """``torch``: the model itself; ``onnx`` / ``onnx-int8``: its export under ``cache_root`` (made once).
    A cached folder that onnxruntime cannot load (its manifest matched, yet the graph is refused) is
    exported again, once; if that fails too, the error names the folder to delete and ``--engine torch``."""
    check_engine(kind)
    if kind == "torch":
        return sm.model
    if sm.model.device.type != "cpu" or getattr(sm.model.base, "is_loaded_in_4bit", False):
        raise EngineError("the ONNX engine exports the fp32 base on CPU: load it with --device cpu, without 4-bit")
    precision = WEIGHTS[kind]
    folder = ensure_export(sm, cache_root, precision, progress)
    try:
        return OnnxEngine(folder, precision, threads)
    except EngineError:
        pass                                  # exported again below, once
    try:
        return OnnxEngine(ensure_export(sm, cache_root, precision, progress, force=True), precision, threads)
    except EngineError as err:
        raise EngineError(f"{err}; the ONNX export in {folder} cannot be used even exported again: "
                          f"delete that folder, or score with --engine torch") from None
