"""The contract of a diffusion teacher (DiT and its kin), beside the AR `teachers.base.Teacher`.

A diffusion teacher maps a noisy state x_t [B, C, H, W] (latent or pixel), the *original* timestep
t [B] and labels [B] to the noise prediction ε, on the discrete VP schedule of
`teachers/vp_diffusion.py`. Everything downstream (ARD's trajectory builder, samplers, benchmarks)
uses only:

    eps = teacher.denoise(x, t, labels, cfg_scale=1.5)         # [B, C, H, W] fp32, CFG applied
    x0 = teacher.sample(labels, steps=25, cfg_scale=1.5, callback=record)   # DDIM (η = 0)
    images = teacher.decode(x0)                                 # [B, 3, H', W'] in [0, 1]

Subclasses set `family`, `num_classes`, `null_label`, `latent_shape`, `image_size`, `cfg_channels`
and implement `model_output`, `decode`, `encode`, `describe`.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from . import vp_diffusion as vp


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: Optional[int]) -> torch.Tensor:
    """Classifier-free guidance u + s·(c − u) on the first `channels` channels of [B, C, ...] (None =
    all); the other channels keep the conditional prediction (DiT's `forward_with_cfg` guides 3 of 4)."""
    guided = uncond + scale * (cond - uncond)
    if channels is None or channels >= cond.shape[1]:
        return guided
    return torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)


class DiffusionTeacher(nn.Module):
    """Abstract base of a pre-trained class-conditional ε-prediction diffusion teacher."""

    family: str = ""
    num_classes: int = 0
    null_label: Optional[int] = None          # the label row of the unconditional model (CFG)
    latent_shape: tuple = ()                  # (C, H, W) of x_t
    image_size: int = 0
    cfg_channels: Optional[int] = None        # how many channels CFG guides (None = all)
    default_steps: int = 25
    default_cfg_scale: float = 1.5            # ARD's teacher trajectories: DDIM-25 at CFG 1.5

    def __init__(self, num_train_timesteps: int = 1000):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod: np.ndarray = vp.linear_alphas_cumprod(num_train_timesteps)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def model_output(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The network's raw output [B, C or 2C, H, W] fp32 (ε first; learned-σ channels after)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x_0 [B, C, H, W] -> images [B, 3, H', W'] in [0, 1]."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images [B, 3, H', W'] in [0, 1] -> x_0 [B, C, H, W]."""
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able identity (family, config, checkpoint hashes), for manifests."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cfg_scale: float = 1.0,
                cfg_channels: Union[Optional[int], str] = "default") -> torch.Tensor:
        """ε prediction [B, C, H, W] fp32 at x_t [B, C, H, W], timesteps t [B] (or a scalar), labels [B].

        cfg_scale != 1 runs the conditional and null-label halves in one batch and guides
        `cfg_channels` channels ("default" = the teacher's own setting, None = all).
        """
        C = x.shape[1]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if cfg_scale == 1.0:
            return self.model_output(x, t, labels)[:, :C]
        if self.null_label is None:
            raise ValueError(f"{self.family} teacher has no null class (class_dropout_prob = 0): cfg_scale must be 1")
        channels = self.cfg_channels if cfg_channels == "default" else cfg_channels
        null = torch.full_like(labels, self.null_label)
        out = self.model_output(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))[:, :C]
        cond, uncond = out.chunk(2)
        return guide(cond, uncond, cfg_scale, channels)

    def predict_x0(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return vp.predict_x0(x, t, eps, self.alphas_cumprod)

    def timesteps(self, steps: Union[int, str]) -> list:
        """The original timesteps a `steps`-step sampler visits, descending (25 -> 999, 957, ..., 42, 0)."""
        return vp.spaced_timesteps(self.num_train_timesteps, steps)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, steps: Union[int, str, None] = None, cfg_scale: Optional[float] = None,
               noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
               callback: Optional[Callable] = None, cfg_channels: Union[Optional[int], str] = "default",
               clip_x0: Optional[float] = None) -> torch.Tensor:
        """DDIM (η = 0) from noise [B, *latent_shape] (drawn with `generator` when None) -> x_0.

        callback(i, t, x_t, x̂_0) sees every intermediate state and clean prediction (see
        `vp_diffusion.ddim_sample`).
        """
        steps = self.default_steps if steps is None else steps
        cfg_scale = self.default_cfg_scale if cfg_scale is None else cfg_scale
        if noise is None:
            noise = torch.randn((labels.shape[0], *self.latent_shape), generator=generator,
                                device=generator.device if generator is not None else "cpu")
        noise = noise.to(self.device, torch.float32)
        labels = labels.to(self.device)

        def eps_fn(x, t):
            return self.denoise(x, t, labels, cfg_scale, cfg_channels)

        return vp.ddim_sample(eps_fn, noise, self.timesteps(steps), self.alphas_cumprod, callback, clip_x0)
