"""MLlm-DR: base LLM + LQ-former per modality + MAA regression head.

Prompts carry ``<AudioHere>`` / ``<VideoHere>``; each marker is replaced by ``n_queries``
slots whose input embeddings are overwritten with the LQ-former outputs (no embedding
resize, so adapters stay small). Labels are -100 on the prompt and the slots: only the
answer is supervised. MAA pools the PROMPT positions only, so at inference it scores
without seeing generated text (it is the fallback when the text breaks format).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mllm_dr.aspects import AUDIO_MARKER, SYSTEM_PROMPT, VIDEO_MARKER, AspectInstance
from mllm_dr.lq_former import LQFormer, LQFormerConfig
from mllm_dr.maa import MAA

MODALITIES = ("audio", "visual")
MARKERS = {"audio": AUDIO_MARKER, "visual": VIDEO_MARKER}


@dataclass
class ModelOptions:
    use_audio: bool = True
    use_visual: bool = True
    max_frames: int = 256          # longer feature sequences are average-pooled to this
    n_queries: int = 32
    lq_layers: int = 4
    lq_dropout: float = 0.3
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    maa_heads: int = 8

    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, f"use_{m}"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


@dataclass
class Example:
    """One aspect instance ready for the model: prompt, optional answer, features, target."""

    instance: AspectInstance
    features: dict[str, torch.Tensor | None]
    answer: str | None = None
    stage: int = 2
    meta: dict = field(default_factory=dict)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    prompt_mask: torch.Tensor                  # tokens MAA may pool (prompt incl. slots)
    slots: dict[str, torch.Tensor]             # modality -> bool [B, L]
    feats: dict[str, torch.Tensor]             # modality -> [B, T, D]
    feat_pad: dict[str, torch.Tensor]          # modality -> bool [B, T] (True = pad)
    targets: torch.Tensor | None


def stage1_messages(inst: AspectInstance, modalities: tuple[str, ...]) -> list[dict[str, str]]:
    media = "".join(f"{'Audio' if m == 'audio' else 'Video'}: {MARKERS[m]}\n" for m in modalities)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{media}From these cues alone, rate the participant's {inst.aspect} from 0 to 3."}]


def pool_frames(x: torch.Tensor, max_frames: int) -> torch.Tensor:
    if x.shape[0] <= max_frames:
        return x
    return nn.functional.adaptive_avg_pool1d(x.T[None], max_frames)[0].T


class MLlmDR(nn.Module):
    def __init__(self, base, tok, hidden_size: int, dims: dict[str, int | None], opts: ModelOptions):
        super().__init__()
        self.base, self.tok, self.opts = base, tok, opts
        self.dims = {m: dims.get(m) for m in opts.modalities() if dims.get(m)}
        self.lq = nn.ModuleDict({m: LQFormer(LQFormerConfig(in_dim=d, out_dim=hidden_size, n_queries=opts.n_queries,
                                                            n_layers=opts.lq_layers, dropout=opts.lq_dropout))
                                 for m, d in self.dims.items()})
        self.maa = MAA(hidden_size, opts.maa_heads)
        self.has_lora = False
        self.norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ parameters
    def enable_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            return
        cfg = LoraConfig(r=self.opts.lora_r, lora_alpha=self.opts.lora_alpha, lora_dropout=self.opts.lora_dropout,
                         target_modules=list(self.opts.lora_targets), bias="none", task_type="CAUSAL_LM")
        self.base = get_peft_model(self.base, cfg)
        self.has_lora = True

    def set_stage(self, stage: int, joint: bool = True) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze what this stage trains; returns those parameters."""
        for p in self.parameters():
            p.requires_grad_(False)
        if stage == 1:
            train = list(self.lq.parameters())
        else:
            self.enable_lora()
            train = [p for n, p in self.base.named_parameters() if "lora_" in n]
            if joint:
                train += list(self.maa.parameters())
        for p in train:
            p.requires_grad_(True)
        return train

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen parts run deterministically: dropout only where parameters train
        for m in self.lq.values():
            m.train(mode and any(p.requires_grad for p in m.parameters()))
        return self

    # ------------------------------------------------------------------ encoding
    def _encode(self, ex: Example) -> dict:
        mods = tuple(self.dims)
        if ex.stage == 1:
            messages = stage1_messages(ex.instance, mods)
        else:
            messages = ex.instance.student_messages(audio="audio" in mods, visual="visual" in mods)
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids: list[int] = []
        slot_of: list[str | None] = []
        pieces = [(text, None)]
        for m in mods:  # split the prompt at each marker
            nxt = []
            for piece, tag in pieces:
                if tag is None and MARKERS[m] in piece:
                    before, after = piece.split(MARKERS[m], 1)
                    nxt += [(before, None), ("", m), (after, None)]
                else:
                    nxt.append((piece, tag))
            pieces = nxt
        for piece, tag in pieces:
            if tag is not None:
                ids += [self.tok.pad_token_id] * self.opts.n_queries
                slot_of += [tag] * self.opts.n_queries
            elif piece:
                toks = self.tok(piece, add_special_tokens=False)["input_ids"]
                ids += toks
                slot_of += [None] * len(toks)
        n_prompt = len(ids)
        labels = [-100] * n_prompt
        if ex.answer is not None:
            ans = self.tok(ex.answer + self.tok.eos_token, add_special_tokens=False)["input_ids"]
            ids += ans
            labels += ans
            slot_of += [None] * len(ans)
        return {"ids": ids, "labels": labels, "slot_of": slot_of, "n_prompt": n_prompt}

    def _feature(self, ex: Example, m: str) -> torch.Tensor:
        x = ex.features.get(m)
        if x is None or x.numel() == 0:
            return torch.zeros(1, self.dims[m])  # missing modality: one zero frame (paper: zero padding)
        x = pool_frames(x.float(), self.opts.max_frames)
        if m in self.norms:
            mean, std = self.norms[m]
            x = (x - mean) / std
        return x

    def collate(self, examples: list[Example], left_pad: bool = False) -> Batch:
        enc = [self._encode(ex) for ex in examples]
        length = max(len(e["ids"]) for e in enc)
        b = len(enc)
        ids = torch.full((b, length), self.tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((b, length), dtype=torch.bool)
        lab = torch.full((b, length), -100, dtype=torch.long)
        prompt = torch.zeros((b, length), dtype=torch.bool)
        slots = {m: torch.zeros((b, length), dtype=torch.bool) for m in self.dims}
        for i, e in enumerate(enc):
            n = len(e["ids"])
            off = length - n if left_pad else 0
            ids[i, off:off + n] = torch.tensor(e["ids"])
            att[i, off:off + n] = True
            lab[i, off:off + n] = torch.tensor(e["labels"])
            prompt[i, off:off + e["n_prompt"]] = True
            for j, tag in enumerate(e["slot_of"]):
                if tag is not None:
                    slots[tag][i, off + j] = True
        feats, pads = {}, {}
        for m in self.dims:
            seqs = [self._feature(ex, m) for ex in examples]
            t = max(s.shape[0] for s in seqs)
            feats[m] = torch.zeros((b, t, self.dims[m]))
            pads[m] = torch.ones((b, t), dtype=torch.bool)
            for i, s in enumerate(seqs):
                feats[m][i, : s.shape[0]] = s
                pads[m][i, : s.shape[0]] = False
        has_answer = any(ex.answer is not None for ex in examples)
        targets = None
        if all(ex.instance.label is not None for ex in examples):
            targets = torch.tensor([float(ex.instance.label) for ex in examples])
        return Batch(ids, att.long(), lab if has_answer else None, prompt, slots, feats, pads, targets)

    # ------------------------------------------------------------------ forward
    def embed(self, batch: Batch) -> torch.Tensor:
        device = self.maa.fc[0].weight.device
        emb = self.base.get_input_embeddings()(batch.input_ids.to(device))
        for m, lq in self.lq.items():
            proj = lq(batch.feats[m].to(device), batch.feat_pad[m].to(device))        # [B, Q, H]
            emb = emb.clone()
            emb[batch.slots[m].to(device)] = proj.reshape(-1, proj.shape[-1]).to(emb.dtype)
        return emb

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        device = self.maa.fc[0].weight.device
        emb = self.embed(batch)
        att = batch.attention_mask.to(device)
        out = self.base(inputs_embeds=emb, attention_mask=att,
                        labels=batch.labels.to(device) if batch.labels is not None else None,
                        output_hidden_states=True)
        reg = self.maa(out.hidden_states[-1], (batch.prompt_mask.to(device) & att.bool()))
        result = {"regression": reg}
        if batch.labels is not None:
            result["lm_loss"] = out.loss
        if batch.targets is not None:
            result["mse"] = nn.functional.mse_loss(reg, batch.targets.to(device))
        return result

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 80) -> tuple[list[str], torch.Tensor]:
        """Greedy answers (reproducible for clinical use) and MAA scores, for a left-padded prompt batch."""
        device = self.maa.fc[0].weight.device
        emb = self.embed(batch)
        att = batch.attention_mask.to(device)
        out = self.base(inputs_embeds=emb, attention_mask=att, output_hidden_states=True)
        reg = self.maa(out.hidden_states[-1], batch.prompt_mask.to(device) & att.bool())
        gen = self.base.generate(inputs_embeds=emb, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        return self.tok.batch_decode(gen, skip_special_tokens=True), reg.float().cpu()
