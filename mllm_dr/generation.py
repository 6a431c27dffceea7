"""Batched text generation for chat prompts (teachers), and the tokens that end an answer (teachers, scoring)."""

from __future__ import annotations

import torch


def chat_prompt(tok, messages: list[dict[str, str]], answer_prefix: str = "") -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix


def end_token_ids(model, tok) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and those of the model's generation config (a chat
    model's turn can end with a token only the latter lists: Llama-3's <|eot_id|>; session 46: with the
    tokenizer's alone such a model never stopped early, every teacher answer was refused as cut and every
    scored answer ran to its token limit). Used by the teachers and by scoring."""
    out: set[int] = set()
    for eos in (getattr(tok, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        out |= {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
    return sorted(out)


@torch.no_grad()
def generate_texts(model, tok, prompts: list[str], max_new_tokens: int = 48, sample: bool = False,
                   seed: int | None = None, temperature: float = 0.8, top_k: int = 10) -> list[tuple[str, bool]]:
    """Left-padded batch generation: per prompt its new text and whether it ended at an end token
    (``end_token_ids``; False: it stopped at ``max_new_tokens``, the answer is cut)."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k) if sample else dict(do_sample=False)
    ends = end_token_ids(model, tok)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=ends or None, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    return [(t, any(int(x) in ends for x in row)) for t, row in zip(texts, new)]
