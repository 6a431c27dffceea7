"""Multi-Head Attention Aggregation (paper Eq. 3): the regression head.

The final hidden states are split into h heads; one scorer shared by all heads gives
token weights per head (softmax over the tokens the mask allows), each head pools its
subspace, the pooled heads are concatenated back to the hidden width and a two-layer
FC network outputs the item score. Width comes from the base config, never hard-coded.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm_dr.config import MAAConfig


class MAA(nn.Module):
    def __init__(self, hidden_size: int, cfg: MAAConfig = MAAConfig()):
        super().__init__()
        if hidden_size % cfg.n_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {cfg.n_heads} heads")
        self.n_heads, self.head_dim = cfg.n_heads, hidden_size // cfg.n_heads
        self.scorer = nn.Linear(self.head_dim, 1)
        self.fc = nn.Sequential(nn.Linear(hidden_size, cfg.fc_hidden), nn.ReLU(), nn.Linear(cfg.fc_hidden, 1))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, D], mask [B, L] bool (True = token to pool) -> scores [B]."""
        b, length, _ = hidden.shape
        x = hidden.float().view(b, length, self.n_heads, self.head_dim)
        logits = self.scorer(x).squeeze(-1)                                   # [B, L, h]
        logits = logits.masked_fill(~mask[:, :, None], torch.finfo(logits.dtype).min)
        alpha = torch.softmax(logits, dim=1)                                  # over tokens
        pooled = torch.einsum("blh,blhd->bhd", alpha, x).reshape(b, -1)       # [B, D]
        return self.fc(pooled).squeeze(-1)
