"""LQ-former (paper section 3.2): learnable queries that read a feature sequence.

32 queries self-attend and cross-attend to the (positionally encoded) feature sequence
through a 4-layer transformer decoder, then a two-layer MLP projects them to the LLM's
embedding width. Padding is a BOOLEAN key mask (True = padded frame): the authors'
float mask was added to the scores and masked nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mllm_dr.config import LQFormerConfig


def derive_d_model(in_dim: int, n_heads: int) -> int:
    """Feature width rounded up to a multiple of the heads (709 -> 712), kept within 128..1024.

    Narrow acoustic LLDs get a 128-wide model; wide CNN features (2048) are projected to
    1024 as the authors did on E-DAIC.
    """
    width = math.ceil(in_dim / n_heads) * n_heads
    return int(min(max(width, 128), 1024))


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


class LQFormer(nn.Module):
    """``in_dim`` is the feature width (from the data), ``out_dim`` the LLM's hidden size (from the base)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: LQFormerConfig = LQFormerConfig()):
        super().__init__()
        self.cfg, self.in_dim = cfg, in_dim
        self.d_model = derive_d_model(in_dim, cfg.n_heads)
        self.input_proj = nn.Linear(in_dim, self.d_model) if in_dim != self.d_model else nn.Identity()
        self.queries = nn.Parameter(torch.randn(cfg.n_queries, self.d_model) * 0.02)
        layer = nn.TransformerDecoderLayer(self.d_model, cfg.n_heads, cfg.ff_dim, cfg.dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.n_layers)
        self.projection = nn.Sequential(nn.Linear(self.d_model, cfg.proj_hidden), nn.ReLU(),
                                        nn.Linear(cfg.proj_hidden, out_dim))

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """features [B, T, in_dim], padding_mask [B, T] bool (True = pad) -> [B, n_queries, out_dim]."""
        if padding_mask.dtype != torch.bool:
            raise TypeError("padding_mask must be boolean (True = padded frame); a float mask masks nothing")
        x = self.input_proj(features)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        h = self.decoder(q, x, memory_key_padding_mask=padding_mask)
        return self.projection(h)
