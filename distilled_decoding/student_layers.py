"""Layers every DD student backbone shares (imported by the backbone files, never the reverse)."""
from __future__ import annotations

import torch
from torch import nn


class FinalLayer(nn.Module):
    """The released embedding head (PixArt's final layer): LayerNorm (no affine, eps 1e-6), then
    x·(1 + scale) + shift with (shift, scale) = scale_shift_table [2, D] + the class embedding, then
    Linear(D, C_out)."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D]; cond: [B, D] or [B, 1, D] class embedding -> [B, L, C_out]"""
        cond = cond.reshape(cond.shape[0], 1, -1)
        shift, scale = (self.scale_shift_table[None] + cond).chunk(2, dim=1)   # [B, 1, D] each
        return self.linear(self.norm_final(x) * (1 + scale) + shift)
