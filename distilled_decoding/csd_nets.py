"""DD2's networks on the DD student backbones: the one-step generator, the guidance ("fake score")
network, and the teacher's next-token log-probabilities on a generated sequence.

Generator. A DD student (`student.DDStudent`) sampled at t = 1 is already a one-step map from noise
ε [B, n, C] to token embeddings [B, n, C]; DD2's generator is that network with the velocity
parameterisation x = ε − v (App. E.1; `StudentConfig.output = "velocity"`), or a trained DD-1 student
as it is (`output = "embedding"`: x is its embedding head). `generate` runs it.

Guidance network (`GuidanceNet`, DD2 §3.2.3). A DD student backbone of the teacher reads the generated
sequence x0 shifted by one AR step (`shift_steps`: the slots of step s hold step s − 1's tokens,
nearest-upsampled to step s's grid; step 0's hold zeros) under the teacher's block-causal mask, so the
feature f_i of token i depends on the class and on x0 of strictly earlier AR steps only (LlamaGen:
tokens < i; VAR: the scales before i's). A small MLP over (x_τ,i, τ_i, logit τ_i, f_i) predicts the
velocity E[ε − x0 | x_τ] of token i; `csd.score_from_velocity` turns it into the score of the
generator's conditional at position i. The backbone starts from the teacher's weights
(`student.build_student`); the head's last layer starts at zero (v = 0), or the whole network is DD2's
AR-diffusion model fitted to the teacher's score by `dd csd init` (gts_train.py).

The same network is DD2's AR-diffusion generator (§3.3): `generator_velocity` feeds the noise ε to the
head at τ = 1 and the one-step-shifted ε to the backbone, x = ε − v (a `student.DDStudent` with output
"ar_diffusion" wraps it, so its run directory samples with `dd sample`).

Teacher log-probabilities (`teacher_logp`): the teacher's next-token distribution at every position
given the generated prefix, with the teacher's sampling (CFG, temperature, top-k/p) exactly as its
sampler applies it (`Teacher.sequence_probs`: the KV-cached stepping loop fed with the given tokens, or one
teacher-forced forward where the family has it). The
teacher reads tokens, so a continuous x0 is snapped to its nearest codes first (`nearest_code`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teachers.base import SamplingConfig, Teacher

from .flowmap import nearest_code


def shift_steps(x0: torch.Tensor, step_sizes: Sequence[int]) -> torch.Tensor:
    """x0 [B, n, C] in AR order -> [B, n, C] where the tokens of step s hold step s − 1's tokens on
    step s's grid (square grids, nearest upsampling; equal sizes: copied) and step 0's zeros."""
    B, n, C = x0.shape
    out = [x0.new_zeros(B, step_sizes[0], C)]
    off = 0
    for prev, size in zip(step_sizes[:-1], step_sizes[1:]):
        block = x0[:, off:off + prev]
        off += prev
        if prev != size:
            a, b = math.isqrt(prev), math.isqrt(size)
            if a * a != prev or b * b != size:
                raise ValueError(f"steps of {prev} and {size} tokens are not square grids")
            grid = block.transpose(1, 2).reshape(B, C, a, a)
            block = F.interpolate(grid, size=(b, b), mode="nearest").reshape(B, C, size).transpose(1, 2)
        out.append(block)
    return torch.cat(out, 1)


LOGIT_EPS = 1e-4     # the head's logit-τ input is clamped to [logit(ε), logit(1 − ε)] (finite at τ = 1)


class GuidanceNet(nn.Module):
    """(x_τ [B, n, C], τ [B, n], x0 [B, n, C], labels [B]) -> velocity [B, n, C]; token i reads
    x0 of earlier AR steps only (see the module docstring). backbone: a DD student backbone;
    step_sizes: the teacher's; width: the head's hidden width."""

    def __init__(self, backbone: nn.Module, step_sizes: Sequence[int], codebook_dim: int, width: int = 256):
        super().__init__()
        self.backbone = backbone
        self.step_sizes = tuple(step_sizes)
        dim = backbone.final_layer_conti.linear.in_features
        self.feature_norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(codebook_dim + 2 + dim, width), nn.SiLU(), nn.Linear(width, width),
                                  nn.SiLU(), nn.Linear(width, codebook_dim))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def features(self, x0: torch.Tensor, labels: torch.Tensor, backbone_grad: bool = True) -> torch.Tensor:
        """x0 [B, n, C] -> f [B, n, D]: f_i a function of the class and of x0 of AR steps before i's.
        backbone_grad False: the backbone runs without autograd (the GTS init's head-only phase)."""
        x = shift_steps(x0.float(), self.step_sizes)
        is_data = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            h, _ = self.backbone.hidden(x, labels.long(), is_data, block_causal=True)
        return self.feature_norm(h[:, 1:].float())

    def head_velocity(self, x_tau: torch.Tensor, tau: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The MLP head alone (features computed once, several (x_τ, τ) draws). τ = 1 (the generator's
        time) is allowed: the logit feature is clamped to logit(1 − 1e-4), untouched on [1e-4, 1 − 1e-4]."""
        t = tau.to(x_tau.dtype)[..., None]
        tc = t.clamp(LOGIT_EPS, 1.0 - LOGIT_EPS)
        return self.head(torch.cat([x_tau, t, torch.log(tc / (1 - tc)), feats.to(x_tau.dtype)], -1))

    def forward(self, x_tau: torch.Tensor, tau: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head_velocity(x_tau, tau, self.features(x0, labels))

    def generator_velocity(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """DD2's generator read off this AR-diffusion network (§3.3): the head at τ = 1 on the noise ε
        [B, n, C], the backbone on the one-step-shifted ε -> v [B, n, C]; the sample is x = ε − v
        (`student.DDStudent` with output "ar_diffusion")."""
        tau = noise.new_ones(noise.shape[:2])
        return self.head_velocity(noise, tau, self.features(noise, labels))


def generate(generator: nn.Module, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One forward of a DD student at t = 1: noise [B, n, C], labels [B] -> x0 [B, n, C] (its embedding
    output; with `output = "velocity"` that is noise − v)."""
    t = torch.ones(noise.shape[0], dtype=torch.long, device=noise.device)
    return generator(noise, labels, t)[1]


@torch.no_grad()
def teacher_logp(teacher: Teacher, labels: torch.Tensor, x0: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The teacher's next-token log-probabilities [B, n, V] fp32 at every position given x0's earlier AR
    steps (x0 [B, n, C] snapped to the nearest codes; or tokens [B, n] int64), with `sampling` applied
    as the teacher's sampler does; −inf where the sampling gives probability 0."""
    if x0.dim() == 3:
        B, n, C = x0.shape
        cb = teacher.codebook.to(x0.device)
        tokens = nearest_code(x0.reshape(-1, C).float(), cb).view(B, n)
    else:
        tokens = x0.long()
    return teacher.sequence_probs(labels, tokens, sampling).log()
