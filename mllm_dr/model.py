"""MLlm-DR: base LLM + LQ-former per modality + MAA regression head. The model only computes;
the processor (processor.py) turns aspect instances into batches.

Each ``<AudioHere>`` / ``<VideoHere>`` marker became ``n_queries`` slots in the batch; their
input embeddings are replaced by the LQ-former outputs (``masked_scatter``, no embedding
resize, so adapters stay small). MAA pools the PROMPT positions only, so at inference it
scores without seeing generated text: it is the fallback when the text breaks format.
Modules are defined and run in data order: features -> LQ-formers -> LLM -> MAA.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm_dr.base_model import add_lora
from mllm_dr.config import ModelConfig
from mllm_dr.lq_former import LQFormer
from mllm_dr.maa import MAA
from mllm_dr.processor import Batch


class MLlmDR(nn.Module):
    def __init__(self, base, hidden_size: int, dims: dict[str, int], config: ModelConfig):
        super().__init__()
        self.config, self.dims = config, dict(dims)
        self.lq = nn.ModuleDict({m: LQFormer(d, hidden_size, config.lq) for m, d in self.dims.items()})
        self.base = base
        self.maa = MAA(hidden_size, config.maa)
        self.has_lora = False
        # Seed of LoRA A when ``enable_lora`` adds it (session 44): set by a local run (local_run.py) so A
        # is the same draw whatever ran before in the process (a resumed run, an earlier stage). None: peft's
        # draw from the global RNG (a federated site receives A with the global state anyway).
        self.lora_seed: int | None = None
        # Run the prompt start a batch's rows share once (``_hidden``)? None = where it pays: on a CPU,
        # which is compute-bound; not on a GPU, where a small batch is bound by kernel launches and
        # the second pass doubles them (measured with bench.train_speed, README "GPU path").
        self.share_prefix: bool | None = None

    @property
    def device(self) -> torch.device:
        return self.maa.fc[0].weight.device

    @property
    def shares_prefix(self) -> bool:
        """Whether ``_hidden`` runs the shared prompt start once: ``share_prefix``, or by default
        on a CPU only."""
        return self.device.type == "cpu" if self.share_prefix is None else self.share_prefix

    # ------------------------------------------------------------------ parameters
    def enable_lora(self) -> None:
        if self.has_lora:
            return
        c = self.config.lora
        self.base = add_lora(self.base, r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                             target_modules=list(c.targets), bias="none", task_type="CAUSAL_LM")
        self.has_lora = True
        seed = c.frozen_a_seed if c.frozen_a else self.lora_seed
        if seed is not None:
            self._draw_a(seed)

    def _draw_a(self, seed: int) -> None:
        """Each layer's LoRA A from (seed, layer name) alone (peft's kaiming-uniform bound 1/sqrt(in)).
        FFA-LoRA's shared A: the center and every site draw the same matrix without it ever travelling.
        A trained A (``lora_seed``, session 44): a local run resumed at stage 2 draws the A the
        uninterrupted run drew, where peft's draw from the global RNG depended on what ran before."""
        import zlib

        with torch.no_grad():
            for name, p in self.base.named_parameters():
                if "lora_A" in name:
                    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                    bound = p.shape[1] ** -0.5
                    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)

    def stage_parameters(self, stage: int, joint: bool = True) -> dict[str, list[nn.Parameter]]:
        """What a stage trains, by optimizer group (the one owner of that rule): stage 1 the
        LQ-formers; stage 2 LoRA (only B when A is frozen, FFA-LoRA) + MAA when trained jointly.
        Everything else is frozen."""
        if stage == 2:
            self.enable_lora()
        lora = "lora_B" if self.config.lora.frozen_a else "lora_"
        groups = {"lq": list(self.lq.parameters())} if stage == 1 else {
            "lora": [p for n, p in self.base.named_parameters() if lora in n],
            **({"maa": list(self.maa.parameters())} if joint else {})}
        for p in self.parameters():
            p.requires_grad_(False)
        for ps in groups.values():
            for p in ps:
                p.requires_grad_(True)
        return groups

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen parts run deterministically: dropout only where parameters train
        for m in self.lq.values():
            m.train(mode and any(p.requires_grad for p in m.parameters()))
        return self

    # ------------------------------------------------------------------ forward
    def _llm(self):
        """The decoder body and the output head of the base LLM (peft's LoRA layers live in the body)."""
        lm = self.base.get_base_model() if self.has_lora else self.base
        return lm.get_decoder(), lm.get_output_embeddings()

    def embed(self, batch: Batch) -> torch.Tensor:
        emb = self.base.get_input_embeddings()(batch.input_ids.to(self.device))
        for m, lq in self.lq.items():
            proj = lq(batch.feats[m].to(self.device), batch.feat_pad[m].to(self.device))        # [B, Q, H]
            mask = batch.slots[m].to(self.device)[..., None].expand_as(emb)
            emb = emb.masked_scatter(mask, proj.to(emb.dtype))
        return emb

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """MAA score per instance; with labels the LM loss, with targets the MSE.

        The output head runs only where a next token is supervised (the answer, ~10% of the
        positions) instead of over every position: the same loss as the model's own, at a
        fraction of the cost of the 49k-word vocabulary projection.
        """
        att = batch.attention_mask.to(self.device)
        h = self._hidden(batch, self.embed(batch), att, batch.position_ids.to(self.device))
        body, head = self._llm()
        result = {"regression": self.maa(h, batch.prompt_mask.to(self.device) & att.bool())}
        if batch.labels is not None:
            nxt = batch.labels.to(self.device)[:, 1:]
            supervised = nxt != -100
            logits = head(h[:, :-1][supervised]).float()
            result["lm_loss"] = nn.functional.cross_entropy(logits, nxt[supervised])
            if batch.score_positions is not None and bool((batch.score_positions > 0).any()):
                rows = (batch.score_positions > 0).nonzero().squeeze(1).to(self.device)
                pos = batch.score_positions.to(self.device)[rows]
                score_logits = head(h[rows, pos - 1]).float()       # the position that predicts the score
                result["score_loss"] = nn.functional.cross_entropy(score_logits, batch.input_ids.to(self.device)[rows, pos])
        if batch.targets is not None:
            result["mse"] = nn.functional.mse_loss(result["regression"], batch.targets.to(self.device))
        return result

    def _hidden(self, batch: Batch, emb: torch.Tensor, att: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Last hidden states. The prompt start every row shares (``batch.prefix_len`` tokens: the system
        prompt, and the instruction when a batch holds one item) runs once and its KV cache is repeated
        for the batch: the same result as running every row in full, with less work."""
        body, _ = self._llm()
        p, b = batch.prefix_len, emb.shape[0]
        if not self.shares_prefix or p < 2 or b < 2:
            return body(inputs_embeds=emb, attention_mask=att, position_ids=pos, use_cache=False).last_hidden_state
        pre = body(inputs_embeds=emb[:1, :p], attention_mask=att[:1, :p], position_ids=pos[:1, :p], use_cache=True)
        pre.cache.batch_repeat_interleave(b)
        rest = body(inputs_embeds=emb[:, p:], attention_mask=att, position_ids=pos[:, p:], cache=pre.cache,
                    use_cache=True)
        return torch.cat([pre.last_hidden_state.expand(b, -1, -1), rest.last_hidden_state], dim=1)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int, eos_token_id: int | list[int], pad_token_id: int,
                 choose=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy answers (reproducible for clinical use) and MAA scores for a left-padded prompt batch.
        ``choose(logits [B, V], done [B]) -> token ids [B]`` replaces the plain argmax (quotes.VerbatimQuotes).
        ``eos_token_id``: the token, or the tokens (``generation.end_token_ids``), that end an answer.

        The prompt runs through the LLM once: its hidden states feed MAA and its KV cache the
        token-by-token decoding. Returns (new token ids [B, <= max_new_tokens], MAA scores [B]).
        """
        body, head = self._llm()
        att = batch.attention_mask.to(self.device)
        pos = batch.position_ids.to(self.device)
        out = body(inputs_embeds=self.embed(batch), attention_mask=att, position_ids=pos, use_cache=True)
        reg = self.maa(out.last_hidden_state, batch.prompt_mask.to(self.device) & att.bool())
        cache, logits, pos = out.cache, head(out.last_hidden_state[:, -1]), pos[:, -1:]
        done = torch.zeros(att.shape[0], dtype=torch.bool, device=self.device)
        ends = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
                            device=self.device)
        new = []
        for _ in range(max_new_tokens):
            best = logits.argmax(-1) if choose is None else choose(logits, done)
            token = torch.where(done, torch.full_like(done, pad_token_id, dtype=torch.long), best)
            new.append(token)
            done |= torch.isin(token, ends)
            if bool(done.all()):
                break
            att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)
            pos = pos + 1
            out = body(input_ids=token[:, None], attention_mask=att, position_ids=pos, cache=cache, use_cache=True)
            cache, logits = out.cache, head(out.last_hidden_state[:, -1])
        return torch.stack(new, dim=1).cpu(), reg.float().cpu()
