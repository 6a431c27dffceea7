"""The processor: everything between an aspect instance and the tensors the model computes on.

Prompt choice (stage 1 cue prompt or the paper's Table 1 student prompt), the chat template,
tokens, the ``n_queries`` slots each ``<AudioHere>``/``<VideoHere>`` marker becomes, labels
(-100 on prompt and slots: only the answer is supervised), the prompt mask MAA pools, and the
site-local feature standardisation. Like transformers' Blip2Processor it is separate from the
model, so collation is testable without an LLM and the model only computes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from mllm_dr.aspects import AUDIO_MARKER, SYSTEM_PROMPT, VIDEO_MARKER, AspectInstance
from mllm_dr.config import ModelConfig
from mllm_dr.parsing import ANSWER_TOKEN_BUDGET, format_answer, reorder, score_char
from mllm_dr.rationales import extractive_rationale

MARKERS = {"audio": AUDIO_MARKER, "visual": VIDEO_MARKER}


@dataclass
class Example:
    """One aspect instance ready for the processor: instance, features, optional answer, stage."""

    instance: AspectInstance
    features: dict[str, torch.Tensor | None]
    answer: str | None = None
    stage: int = 2


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
    position_ids: torch.Tensor = field(default=None)   # 0.. over real tokens (left padding aware)
    score_positions: torch.Tensor | None = None        # [B] index of the answer's score token (-1: none)
    prefix_len: int = 0                                # leading prompt tokens identical in every row (no slots)


def stage1_messages(inst: AspectInstance, modalities: tuple[str, ...]) -> list[dict[str, str]]:
    media = "".join(f"{'Audio' if m == 'audio' else 'Video'}: {MARKERS[m]}\n" for m in modalities)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"{media}From these cues alone, rate the participant's {inst.aspect} from 0 to 3."}]


def pool_frames(x: torch.Tensor, max_frames: int) -> torch.Tensor:
    if x.shape[0] <= max_frames:
        return x
    return nn.functional.adaptive_avg_pool1d(x.T[None], max_frames)[0].T


def shared_prefix(enc: list[dict], same_media: bool = False) -> int:
    """Length of the prompt start every row shares: the model computes it once for the whole batch.
    The system prompt, and the instruction when a batch holds one item (instruction-first), or the
    media and dialogue when it holds one participant (dialogue-first). Slots count as shared only
    when every row carries the same features (``same_media``); otherwise it stops before the first."""
    shortest = min(e["n_prompt"] for e in enc) - 1
    n = 0
    while (n < shortest and (same_media or enc[0]["slot_of"][n] is None)
           and all(e["ids"][n] == enc[0]["ids"][n] and e["slot_of"][n] == enc[0]["slot_of"][n] for e in enc)):
        n += 1
    return n


def split_at_markers(text: str, modalities) -> list[tuple[str, str | None]]:
    """``text`` as (piece, None) runs of prompt text and ("", modality) at the first ``<AudioHere>`` /
    ``<VideoHere>`` of each modality in ``modalities``: where the processor puts that modality's slots."""
    pieces: list[tuple[str, str | None]] = [(text, None)]
    for m in modalities:
        nxt = []
        for piece, tag in pieces:
            if tag is None and MARKERS[m] in piece:
                before, after = piece.split(MARKERS[m], 1)
                nxt += [(before, None), ("", m), (after, None)]
            else:
                nxt.append((piece, tag))
        pieces = nxt
    return pieces


Moments = dict[str, tuple[int, torch.Tensor, torch.Tensor]]   # modality -> (frames, sum, sum of squares)


def participant_frames(exs: list[Example], m: str) -> dict[str, torch.Tensor]:
    """participant -> their frames of modality ``m``, each participant once; one without it (a missing
    modality is None, ``dataset.examples``) is not there: the moments of ``m`` are over these alone."""
    out: dict[str, torch.Tensor] = {}
    for ex in exs:
        x = ex.features.get(m)
        if x is not None and x.numel():
            out.setdefault(ex.instance.participant, x)
    return out


def frame_moments(exs: list[Example], modalities: tuple[str, ...]) -> Moments:
    """Frame count, per-dimension sum and sum of squares (float64) over the training frames, each
    participant once: what feature normalisation needs, and all that a site shares of its features
    when the run normalises over every site (``feature-norms = federated``; sums of many frames)."""
    out: Moments = {}
    for m in modalities:
        frames = [x.double() for x in participant_frames(exs, m).values()]
        if frames:
            cat = torch.cat(frames)
            out[m] = (cat.shape[0], cat.sum(0), (cat * cat).sum(0))
    return out


# A column constant over the training frames, to float32 precision (the sums' rounding leaves a std of about
# 1e-8 x |mean|), is scaled by 1, keeping its mean: its training frames normalise to 0 either way, and a scoring
# frame that differs by 1 gives 1, where the 1e-4 floor gave 1e4. Other columns keep that floor, as before.
CONSTANT_STD = 1e-6


def norms_from_moments(parts: list[Moments]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and (unbiased) std per dimension over the union of the parts' frames: one site's own
    (``fit_norms``), or every site's summed by the center (the pooled data's norms, exactly). A constant
    column's std is 1 (``CONSTANT_STD``)."""
    norms = {}
    for m in sorted({m for part in parts for m in part}):
        held = [part[m] for part in parts if m in part and part[m][0] > 0]
        if not held:
            continue
        n = sum(h[0] for h in held)
        total, squares = sum(h[1] for h in held), sum(h[2] for h in held)
        mean = total / n
        var = ((squares - n * mean * mean) / max(n - 1, 1)).clamp_min(0.0)
        std = var.sqrt()
        constant = std <= CONSTANT_STD * mean.abs().clamp_min(1.0)
        norms[m] = (mean.float(), torch.where(constant, torch.ones_like(std), std.clamp_min(1e-4)).float())
    return norms


def norm_tensors(norms: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Feature norms as the flat tensors an adapter folder keeps ('<modality>.mean', '<modality>.std')."""
    return {f"{m}.{k}": t.contiguous() for m, (mean, std) in norms.items() for k, t in (("mean", mean), ("std", std))}


class Processor:
    def __init__(self, tok, config: ModelConfig, dims: dict[str, int | None]):
        self.tok, self.config = tok, config
        self.dims = {m: int(dims[m]) for m in config.modalities() if dims.get(m)}   # modalities with an LQ-former
        self.norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # the site's, or the run's (feature-norms)
        self._encoded: dict[tuple, dict] = {}     # tokenising is deterministic: once per example text
        self._controls: re.Pattern | None | bool = False     # _control_texts, read from the tokenizer once

    # ------------------------------------------------------------------ text
    def messages(self, ex: Example) -> list[dict[str, str]]:
        mods = tuple(self.dims)
        if ex.stage == 1:
            return stage1_messages(ex.instance, mods)
        return ex.instance.student_messages(audio="audio" in mods, visual="visual" in mods,
                                            order=self.config.answer_order, layout=self.config.prompt_layout)

    def _control_texts(self) -> re.Pattern | None:
        """The tokenizer's added tokens (chat control tokens such as ``<|im_end|>``) as one pattern, longest
        first; None when it has none."""
        if self._controls is False:
            added = {getattr(t, "content", str(t)) for t in getattr(self.tok, "added_tokens_decoder", {}).values()}
            added |= set(getattr(self.tok, "all_special_tokens", []) or [])
            added = sorted((t for t in added if t), key=len, reverse=True)
            self._controls = re.compile("|".join(map(re.escape, added))) if added else None
        return self._controls

    def _plain_ids(self, text: str, **kw) -> dict:
        """``text`` (transcript-derived) tokenised as text: a control token's string in it is split into
        ordinary tokens (``split_special_tokens``), never the control token itself."""
        return self.tok(text, add_special_tokens=False, split_special_tokens=True, **kw)

    def answer_over_budget(self, answer: str) -> bool:
        """Whether a stage-2 training answer is longer than the scorer's budget (parsing.ANSWER_TOKEN_BUDGET), so
        that ``_encode`` trains the extractive rationale instead; ``dataset.rationale_sources`` counts these
        with this test (session 46: the replacement was silent)."""
        return self._over_budget(self._answer_ids(reorder(answer, self.config.answer_order))[0])

    @staticmethod
    def _over_budget(answer_ids: list[int]) -> bool:
        """The one budget test of a training answer's ids (``_answer_ids``: EOS included), for ``_encode`` and
        ``answer_over_budget`` alike, so that what is replaced and what is counted replaced cannot drift apart."""
        return len(answer_ids) > ANSWER_TOKEN_BUDGET

    def _answer_ids(self, answer: str) -> tuple[list[int], list[tuple[int, int]]]:
        """A training answer's ids with the EOS, and each id's character span in ``answer``. An answer holding a
        control token's string (a quote of a transcript that wrote one) has it as text; any other answer is
        tokenised as it always was (trained adapters stay valid)."""
        controls = self._control_texts()
        if controls is None or not controls.search(answer):
            enc = self.tok(answer + self.tok.eos_token, add_special_tokens=False, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"]
        enc = self._plain_ids(answer, return_offsets_mapping=True)
        return enc["input_ids"] + [self.tok.eos_token_id], enc["offset_mapping"] + [(len(answer), len(answer))]

    def encode(self, ex: Example) -> dict:
        """Token ids with each marker replaced by ``n_queries`` slots, labels, slot owners, prompt length."""
        key = (ex.instance.participant, ex.instance.item, ex.instance.dialogue, ex.stage, ex.answer)
        if key not in self._encoded:
            self._encoded[key] = self._encode(ex)
        return self._encoded[key]

    def _guarded(self, ex: Example) -> tuple[Example, str | None, list[str]]:
        """The example with every control token's string in its dialogue (the transcript-derived text of the
        prompt) replaced by a sentinel character, the sentinel, and the strings it stands for, in order. A
        transcript that writes ``<|im_end|>`` or ``<|im_start|>assistant`` must not end the user's turn or open
        the model's (session 45): those strings go in as text (``_plain_ids``). A dialogue without one is the
        example itself (its ids are what they always were)."""
        controls = self._control_texts()
        dialogue = ex.instance.dialogue
        if ex.stage == 1 or controls is None or not controls.search(dialogue):
            return ex, None, []
        sentinel = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in dialogue)   # private use
        literal = controls.findall(dialogue)
        return replace(ex, instance=replace(ex.instance, dialogue=controls.sub(sentinel, dialogue))), sentinel, literal

    def _encode(self, ex: Example) -> dict:
        guarded, sentinel, literal = self._guarded(ex)
        text = self.tok.apply_chat_template(self.messages(guarded), add_generation_prompt=True, tokenize=False)
        pieces = split_at_markers(text, self.dims)
        if sentinel is not None:      # and at each control token's string the transcript wrote: text
            if text.count(sentinel) != len(literal):
                raise ValueError("the chat template changed the dialogue's control-token strings")
            written = iter(literal)
            nxt = []
            for piece, tag in pieces:
                if tag is None and sentinel in piece:
                    for k, part in enumerate(piece.split(sentinel)):
                        nxt += ([(next(written), "text")] if k else []) + [(part, None)]
                else:
                    nxt.append((piece, tag))
            pieces = nxt
        ids: list[int] = []
        slot_of: list[str | None] = []
        n_q = self.config.lq.n_queries
        for piece, tag in pieces:
            if tag == "text":
                toks = self._plain_ids(piece)["input_ids"]
                ids += toks
                slot_of += [None] * len(toks)
            elif tag is not None:
                ids += [self.tok.pad_token_id] * n_q
                slot_of += [tag] * n_q
            elif piece:
                toks = self.tok(piece, add_special_tokens=False)["input_ids"]
                ids += toks
                slot_of += [None] * len(toks)
        n_prompt = len(ids)
        labels = [-100] * n_prompt
        score_pos = -1
        if ex.answer is not None:
            order = self.config.answer_order
            answer = reorder(ex.answer, order)
            ans, offsets = self._answer_ids(answer)
            if self._over_budget(ans) and ex.stage == 2 and ex.instance.label is not None:
                # never trained: an answer whose score the scorer's budget never reaches (parsing.ANSWER_TOKEN_BUDGET;
                # a teacher rationale accepted before session 45, or one this tokenizer counts longer than the
                # estimate did): the extractive rationale, cut to fit by this tokenizer, instead (answer_over_budget)
                own = extractive_rationale(ex.instance, lambda a: len(self._answer_ids(reorder(a, order))[0]))
                answer = reorder(format_answer(ex.instance.label, own), order)
                ans, offsets = self._answer_ids(answer)
            digit = score_char(answer)
            if digit is not None:
                score_pos = next((n_prompt + k for k, (a, b) in enumerate(offsets) if a <= digit < b), -1)
            ids += ans
            labels += ans
            slot_of += [None] * len(ans)
        return {"ids": ids, "labels": labels, "slot_of": slot_of, "n_prompt": n_prompt, "score_pos": score_pos}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tok.batch_decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ features
    def fit_norms(self, exs: list[Example]) -> None:
        """Per-dimension mean/std over the site's training frames, each participant once; nothing when
        each participant is scaled by their own frames (``ModelConfig.feature_norm = "participant"``)."""
        per_participant = self.config.feature_norm == "participant"
        self.norms = {} if per_participant else norms_from_moments([frame_moments(exs, tuple(self.dims))])

    def norm_tensors(self) -> dict[str, torch.Tensor]:
        return norm_tensors(self.norms)

    def load_norm_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self.norms = {m: (t[f"{m}.mean"], t[f"{m}.std"]) for m in self.dims if f"{m}.mean" in t}

    def feature(self, ex: Example, m: str) -> torch.Tensor:
        x = ex.features.get(m)
        if x is None or x.numel() == 0:
            return torch.zeros(1, self.dims[m])  # missing modality: one zero frame (paper: zero padding)
        x = x.float()
        if self.config.feature_norm == "participant":      # the participant's own frames: no other patient's
            mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-4)
            return pool_frames((x - mean) / std, self.config.max_frames)
        x = pool_frames(x, self.config.max_frames)
        if m in self.norms:
            mean, std = self.norms[m]
            x = (x - mean) / std
        return x

    # ------------------------------------------------------------------ batches
    def collate(self, examples: list[Example], left_pad: bool = False) -> Batch:
        enc = [self.encode(ex) for ex in examples]
        length = max(len(e["ids"]) for e in enc)
        b = len(enc)
        ids = torch.full((b, length), self.tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((b, length), dtype=torch.bool)
        lab = torch.full((b, length), -100, dtype=torch.long)
        prompt = torch.zeros((b, length), dtype=torch.bool)
        score_pos = torch.full((b,), -1, dtype=torch.long)
        slots = {m: torch.zeros((b, length), dtype=torch.bool) for m in self.dims}
        for i, e in enumerate(enc):
            n = len(e["ids"])
            off = length - n if left_pad else 0
            ids[i, off:off + n] = torch.tensor(e["ids"])
            att[i, off:off + n] = True
            lab[i, off:off + n] = torch.tensor(e["labels"])
            prompt[i, off:off + e["n_prompt"]] = True
            if e["score_pos"] >= 0:
                score_pos[i] = off + e["score_pos"]
            for j, tag in enumerate(e["slot_of"]):
                if tag is not None:
                    slots[tag][i, off + j] = True
        feats, pads = {}, {}
        for m in self.dims:
            seqs = [self.feature(ex, m) for ex in examples]
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
        positions = (att.long().cumsum(1) - 1).clamp_min(0)
        prefix = 0
        if not left_pad and b > 1:
            same_media = all(torch.equal(feats[m][i], feats[m][0]) and torch.equal(pads[m][i], pads[m][0])
                             for m in self.dims for i in range(1, b))
            prefix = shared_prefix(enc, same_media)
        return Batch(ids, att.long(), lab if has_answer else None, prompt, slots, feats, pads, targets, positions,
                     score_pos if has_answer else None, prefix)
