"""The Distilled Decoding training loss: cross-entropy on the logits head plus an embedding loss on
the embedding head, over the noise positions of X_t (the loss function `dd train` hands the loop)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .perceptual import DigitsPerceptualLoss, LPIPSEmbLoss
from .schedule import make_xt, prefix_mask


def masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """v, mask: [B, n] -> [B] mean of v over each row's True positions (0 for an empty row)."""
    m = mask.to(v.dtype)
    return (v * m).sum(1) / m.sum(1).clamp_min(1)


def mse_emb_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target: [B, n, C]; mask: [B, n] -> [B] mean over masked positions of the per-token
    mean squared error (mean over C)."""
    return masked_mean((pred.float() - target.float()).pow(2).mean(-1), mask)


def dd_loss(student: nn.Module, noise: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
            t: torch.Tensor, *, codebook: torch.Tensor, step_offsets: Sequence[int],
            lambda_ce: float = 0.1, lambda_emb: float = 1.0, emb_loss=None) -> Tuple[torch.Tensor, dict]:
    """The training loss of one batch (per-sample means, then the batch mean).

    noise: [B, n, C]; tokens: [B, n] int64 (the teacher's flow-map tokens); labels, t: [B].
    X_t = make_xt(codebook[tokens], noise, t); on the noise positions (i >= step_offsets[t − 1]):
    λ_ce·CE(logits, tokens) + λ_emb·d(emb, codebook[tokens]). d = `emb_loss(pred_emb, target_emb,
    noise_mask) -> [B]` (default `mse_emb_loss`; perceptual.py's losses compose the full
    sequence and compare decoded images). `student` may be DDP-wrapped (it is only called).
    Returns (loss scalar, {"ce": [B], "emb": [B]} detached per-sample parts).
    """
    emb_loss = mse_emb_loss if emb_loss is None else emb_loss
    data = codebook[tokens]                                                   # [B, n, C]
    x = make_xt(data, noise, t, step_offsets)
    n = tokens.shape[1]
    mask = ~prefix_mask(step_offsets, t.to(noise.device).long() - 1, n)        # [B, n] noise positions
    logits, emb = student(x, labels, t)
    B, _, V = logits.shape
    ce_tok = F.cross_entropy(logits.float().reshape(B * n, V), tokens.reshape(B * n),
                             reduction="none").view(B, n)
    ce = masked_mean(ce_tok, mask)                                            # [B]
    d = emb_loss(emb.float(), data, mask)                                     # [B]
    loss = (lambda_ce * ce + lambda_emb * d).mean()
    return loss, {"ce": ce.detach(), "emb": d.detach()}


def dd_h_loss(student: nn.Module, noise: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
              timesteps: Sequence[int], *, codebook: torch.Tensor, step_offsets: Sequence[int],
              lambda_ce: float = 0.1, lambda_emb: float = 1.0, emb_loss=None) -> Tuple[torch.Tensor, dict]:
    """DD-H's teacher-forced loss: `dd_loss`'s terms on every block X_{t_k} = make_xt(codebook[tokens],
    noise, t_k) of the trajectory, summed over the K blocks, all in one forward
    (`DDStudent.forward_blocks`, called as student(xs [B, K, n, C], labels, timesteps); `student` may be
    DDP-wrapped).
    Returns (loss scalar, {"ce": [B], "emb": [B]} detached, summed over blocks)."""
    emb_loss = mse_emb_loss if emb_loss is None else emb_loss
    data = codebook[tokens]                                                   # [B, n, C]
    B, n = tokens.shape
    ts = [int(v) for v in timesteps]
    xs = torch.stack([make_xt(data, noise, torch.full((B,), t, device=noise.device), step_offsets) for t in ts], 1)
    logits, emb = student(xs, labels, ts)                          # [B, K, n, V], [B, K, n, C]
    ce = torch.zeros(B, device=noise.device)
    d = torch.zeros(B, device=noise.device)
    for k, t in enumerate(ts):
        mask = ~prefix_mask(step_offsets, torch.full((B,), t - 1, device=noise.device), n)
        V = logits.shape[-1]
        ce_tok = F.cross_entropy(logits[:, k].float().reshape(B * n, V), tokens.reshape(B * n),
                                 reduction="none").view(B, n)
        ce = ce + masked_mean(ce_tok, mask)
        d = d + emb_loss(emb[:, k].float(), data, mask)
    loss = (lambda_ce * ce + lambda_emb * d).mean()
    return loss, {"ce": ce.detach(), "emb": d.detach()}


EMB_LOSSES = ("mse", "perceptual", "lpips")


def make_emb_loss(kind: str, teacher, net: str = "vgg"):
    """-> (callable(pred, target, mask) -> [B], description). perceptual / lpips: perceptual.py."""
    if kind == "mse":
        return mse_emb_loss, "mse in embedding space"
    if kind == "perceptual":
        f = DigitsPerceptualLoss(teacher)
        return f, f.name
    if kind == "lpips":
        f = LPIPSEmbLoss(teacher, net)
        return f, f.name
    raise ValueError(f"unknown --emb-loss {kind!r} ({' | '.join(EMB_LOSSES)})")
