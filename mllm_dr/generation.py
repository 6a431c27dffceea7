"""Batched text generation for chat prompts (teachers)."""

from __future__ import annotations

import torch


def chat_prompt(tok, messages: list[dict[str, str]], answer_prefix: str = "") -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix


@torch.no_grad()
def generate_texts(model, tok, prompts: list[str], max_new_tokens: int = 48, sample: bool = False,
                   temperature: float = 0.8, top_k: int = 10, seed: int | None = None) -> list[str]:
    """Left-padded batch generation; returns only the new text of each prompt."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k) if sample else dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, **kwargs)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
