"""A two-token AR teacher with explicit tables, and CSD training of a tiny one-step generator against it
(the toy proof of distilled_decoding/csd.py; tests/test_csd.py asserts it, `python tests/csd_toy.py`
measures it over seeds for docs/dd2.md).

Teacher: V codes on the unit circle in C = 2 (l2-normalised, LlamaGen's kind), p(x1) a fixed table and
p(x2 | x1) putting `peak` of its mass on code x1 + V/4 mod V (a quarter turn): a strong dependence that onestep* (each
position drawn from its own marginal, independently) cannot express. The teacher reads the generator's
continuous prefix by snapping it to the nearest code.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from distilled_decoding.csd import (CSDConfig, diffuse, generator_loss, guidance_loss, sample_tau,
                                    score_from_velocity, teacher_score)
from distilled_decoding.flowmap import nearest_code


@dataclass(frozen=True)
class ToyConfig:
    v: int = 8                 # codes
    peak: float = 0.9          # p(x2 = partner(x1) | x1)
    width: int = 64            # hidden width of both MLPs
    batch: int = 128
    warmup: int = 200          # guidance updates on the initial generator before the first generator update
    steps: int = 400           # generator updates
    lr_gen: float = 3e-3
    lr_guide: float = 1e-3
    beta1: float = 0.0
    decay: int = 1             # generator lr decays linearly to 0
    eval_samples: int = 20000
    csd: CSDConfig = CSDConfig()


class ToyTeacher:
    def __init__(self, cfg: ToyConfig):
        v = cfg.v
        ang = 2 * math.pi * torch.arange(v, dtype=torch.float32) / v
        self.codebook = torch.stack([ang.cos(), ang.sin()], 1)                       # [V, 2], unit rows
        self.p1 = torch.softmax(torch.linspace(-1.0, 1.0, v), 0)                      # [V]
        p2 = torch.full((v, v), (1 - cfg.peak) / (v - 1))
        p2[torch.arange(v), (torch.arange(v) + v // 4) % v] = cfg.peak
        self.p2 = p2                                                                  # [V, V] rows x1
        self.joint = self.p1[:, None] * p2                                            # [V, V]

    def logp(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 [B, 2, C] -> next-token log-probabilities [B, 2, V] given the snapped prefix."""
        first = self.p1.log().expand(x0.shape[0], -1)
        second = self.p2[nearest_code(x0[:, 0], self.codebook)].log()
        return torch.stack([first, second], 1)

    def onestep_tv(self) -> float:
        """TV of onestep* (independent per-position marginals) to the joint."""
        return tv(self.p1[:, None] * self.joint.sum(0)[None], self.joint)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def mlp(d_in: int, d_out: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, d_out))


class Generator(nn.Module):
    """noise [B, 2, C] -> token embeddings [B, 2, C] in one forward, causally: position 1 is an MLP of its
    noise, position 2 an MLP of its noise and position 1's embedding (held fixed, as the teacher's
    prefix is: the position-2 loss moves position 2 only)."""

    def __init__(self, c: int, width: int):
        super().__init__()
        self.first, self.second = mlp(c, c, width), mlp(2 * c, c, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x1 = self.first(z[:, 0])
        x2 = self.second(torch.cat([z[:, 1], x1.detach()], -1))
        return torch.stack([x1, x2], 1)


class Guidance(nn.Module):
    """(x_τ [B, 2, C], τ [B, 2], prefix x0 [B, 2, C]) -> velocity [B, 2, C]; position i sees x0_<i."""

    def __init__(self, c: int, width: int):
        super().__init__()
        self.net = mlp(2 * c + 4, c, width)

    def forward(self, x_tau: torch.Tensor, tau: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        b = x_tau.shape[0]
        prefix = torch.cat([torch.zeros_like(x0[:, :1]), x0[:, :1]], 1)            # [B, 2, C]
        pos = torch.eye(2, dtype=x_tau.dtype).expand(b, 2, 2)                        # [B, 2, 2]
        t = tau[..., None]
        return self.net(torch.cat([x_tau, t, torch.log(t / (1 - t)), pos, prefix], -1))


@torch.no_grad()
def joint_of(gen: Generator, teacher: ToyTeacher, n: int, seed: int) -> torch.Tensor:
    """The generator's joint token distribution [V, V] (outputs snapped to the nearest code)."""
    z = torch.randn(n, 2, 2, generator=torch.Generator().manual_seed(seed))
    idx = nearest_code(gen(z).reshape(-1, 2), teacher.codebook).view(n, 2)
    v = teacher.codebook.shape[0]
    return torch.bincount(idx[:, 0] * v + idx[:, 1], minlength=v * v).view(v, v).float() / n


def train(cfg: ToyConfig, seed: int, log=None) -> dict:
    """CSD on the toy teacher; returns TV to the teacher at the start and end and onestep*'s TV."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    teacher = ToyTeacher(cfg)
    gen, guide = Generator(2, cfg.width), Guidance(2, cfg.width)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_gen, betas=(cfg.beta1, 0.99))
    opt_f = torch.optim.Adam(guide.parameters(), lr=cfg.lr_guide, betas=(cfg.beta1, 0.99))
    tv0 = tv(joint_of(gen, teacher, cfg.eval_samples, seed + 2), teacher.joint)

    def noise_draw():
        z = torch.randn(cfg.batch, 2, 2, generator=g)
        tau = sample_tau((cfg.batch, 2), cfg.csd, generator=g)
        eps = torch.randn(cfg.batch, 2, 2, generator=g)
        return z, tau, eps

    def guidance_update():
        z, tau, eps = noise_draw()
        with torch.no_grad():
            x0 = gen(z)
        loss = guidance_loss(guide(diffuse(x0, tau, eps), tau, x0), x0, eps)
        opt_f.zero_grad(set_to_none=True)
        loss.backward()
        opt_f.step()

    for _ in range(cfg.warmup):
        guidance_update()
    for step in range(cfg.steps):
        for group in opt_g.param_groups:                  # linear decay: the last steps average out noise
            group["lr"] = cfg.lr_gen * (1 - step / cfg.steps) if cfg.decay else cfg.lr_gen
        for _ in range(cfg.csd.guidance_steps):
            guidance_update()
        z, tau, eps = noise_draw()
        x0 = gen(z)
        x_tau = diffuse(x0, tau, eps)
        with torch.no_grad():
            s_fake = score_from_velocity(x_tau, guide(x_tau, tau, x0), tau)
        s_real = teacher_score(x0, x_tau, tau, teacher.logp, teacher.codebook)
        loss = generator_loss(x_tau, s_fake, s_real, tau, cfg.csd)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"step {step + 1}: TV {tv(joint_of(gen, teacher, 4000, seed + 3), teacher.joint):.3f}")
    tv1 = tv(joint_of(gen, teacher, cfg.eval_samples, seed + 2), teacher.joint)
    return {"tv_start": tv0, "tv_end": tv1, "tv_onestep": teacher.onestep_tv()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = ToyConfig()
    for a in sys.argv[1:]:
        k, _, val = a.partition("=")
        if k in {f for f in CSDConfig.__dataclass_fields__}:
            cfg = replace(cfg, csd=replace(cfg.csd, **{k: type(getattr(cfg.csd, k))(val)}))
        else:
            cfg = replace(cfg, **{k: type(getattr(cfg, k))(val)})
    for seed in (0, 1, 2):
        t0 = time.time()
        r = train(cfg, seed, log=print)
        print(f"seed {seed}: TV start {r['tv_start']:.3f} end {r['tv_end']:.3f} onestep* {r['tv_onestep']:.3f} "
              f"({time.time() - t0:.1f} s)", flush=True)
