"""A LLaMA-architecture base with random weights, for speed and memory measurements only.

No 8B weights can be had offline here, so the GPU path (issue 14.5) is timed on a model with
LLaMA-3-8B's shapes and random weights, written as an ordinary local Hugging Face folder (bf16
safetensors + SmolLM2's tokenizer) that every kit command accepts as ``--base-model DIR``. Its
answers are noise: never score or evaluate with it.

    .venv/bin/python -m bench.random_base --shape llama3-8b --out /tmp/llama3-8b-random --device cuda
    .venv/bin/python -m bench.random_base --shape tiny --out /tmp/tiny-llama-bf16      # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

SHAPES = {  # LlamaConfig fields; llama3-8b as published (GQA 32 query / 8 kv heads, 128k vocabulary)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False),
}
BENCH = "bench.random_base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def make_random_base(shape: str, out: Path, tokenizer_dir: Path, device: str = "cpu", seed: int = 0) -> dict:
    """Write ``out`` (config.json, bf16 safetensors, the tokenizer); returns sizes and timings. An existing
    ``out`` is replaced only when this benchmark wrote it (its marker file) or it is empty; anything else
    is refused (exit 2), never deleted (a review, session 45)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bench.common import check_fresh_output, mark

    check_fresh_output(out, BENCH)

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fields = SHAPES[shape]
    if len(tok) > fields["vocab_size"]:
        raise SystemExit(f"{tokenizer_dir}: tokenizer has {len(tok)} tokens, more than the {shape} vocabulary")
    cfg = LlamaConfig(**fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, dtype="bfloat16")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    t_init = time.perf_counter() - t0
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="4GB")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, tmp / name)
    mark(tmp, BENCH)
    check_fresh_output(out, BENCH)           # still ours (or gone) after the minutes of writing
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"shape": shape, "parameters": params, "folder": str(out), "init_s": round(t_init, 1),
            "write_s": round(time.perf_counter() - t0 - t_init, 1),
            "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a folder with tokenizer.json (default: the embedded SmolLM2's)")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: seconds for 8B)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.tokenizer is None:
        from mllm_dr.base_model import ensure_smollm2

        args.tokenizer = ensure_smollm2()
    print(json.dumps(make_random_base(args.shape, args.out, args.tokenizer, args.device, args.seed), indent=1))


if __name__ == "__main__":
    main()
