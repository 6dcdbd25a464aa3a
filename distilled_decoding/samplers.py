"""Samplers"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch

from .flowmap import nearest_code
from .schedule import prefix_mask

if TYPE_CHECKING:
    from .student import DDStudent


@torch.no_grad()
def dd_step(student: DDStudent, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
            split: Optional[int] = None, snap: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One sampler step F_theta(X_t, t) (Algorithm 3).

    x: [B, n, C]; labels: [B]; t: [B] (or int) paper timestep; split: AR steps < split take
    codebook[argmax logits], the rest the embedding head (default: the student's split); snap: also
    snap the embedding-head outputs to their nearest codebook rows. Tokens before step_offsets[t − 1]
    are kept from x (they are data). Returns (x_next [B, n, C] fp32, idx [B, n] int64 = nearest
    codebook index of every position of x_next).
    """
    B, n, C = x.shape
    if not torch.is_tensor(t):
        t = torch.full((B,), int(t), dtype=torch.long)
    t = t.to(x.device).long().reshape(B)
    split = student.config.split if split is None else int(split)
    split = min(max(split, 0), student.num_steps)
    logits, emb = student(x, labels, t)
    cb = student.codebook.to(x.device)
    below = prefix_mask(student.step_offsets, torch.tensor([split], device=x.device), n)[..., None]   # [1, n, 1]
    pred = torch.where(below, cb[logits.argmax(-1)], emb.float())            # [B, n, C]
    if snap:
        pred = torch.where(below, pred, cb[nearest_code(emb.reshape(-1, C).float(), cb).view(B, n)])
    keep = student.data_mask(t, n)[..., None]                                # [B, n, 1]
    x_next = torch.where(keep, x.float(), pred)
    idx = nearest_code(x_next.reshape(-1, C), cb).view(B, n)
    return x_next, idx
