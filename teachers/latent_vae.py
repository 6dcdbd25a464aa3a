"""The latent VAE of DiT-style teachers: diffusers' `AutoencoderKL` (Stable Diffusion's
`sd-vae-ft-ema` / `-mse`), loaded from a local directory or a weights file.

Latents are the VAE's posterior scaled by `scaling_factor` (0.18215 for the SD VAE): DiT samples
z and decodes `vae.decode(z / 0.18215)`; training encodes `vae.encode(x).latent_dist.sample() * 0.18215`.

diffusers is an optional dependency (`pip install "distilled-decoding[dit]"`), imported only here.

    vae = load_vae("sd-vae-ft-ema/")                       # a diffusers directory (config.json + weights)
    vae = load_vae("vae.safetensors", config="sd-vae")     # a diffusers-layout weights file + a config
    images = vae.decode(latents)                           # [B, 4, h, w] -> [B, 3, 8h, 8w] in [0, 1]
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from .checkpoint import load_strict, read_state_dict, source_id

# diffusers' AutoencoderKL arguments of stabilityai/sd-vae-ft-ema and -mse (their config.json)
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                     block_out_channels=[128, 256, 512, 512], act_fn="silu", sample_size=256,
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                     scaling_factor=0.18215)
VAE_PRESETS = {"sd-vae": SD_VAE_CONFIG}

# the pre-0.14 diffusers attention names some released .bin files still carry (renamed on load)
_OLD_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def autoencoder_kl_class():
    """diffusers.AutoencoderKL, or a one-line ImportError naming the extra to install."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError('the DiT latent VAE needs diffusers: pip install "distilled-decoding[dit]"') from e
    return AutoencoderKL


class LatentVAE(nn.Module):
    """An AutoencoderKL and its latent scale. Images are [B, 3, H, W] in [0, 1]; latents
    [B, latent_channels, H/f, W/f] already multiplied by `scaling_factor`."""

    def __init__(self, vae: nn.Module, scaling_factor: Optional[float] = None, source: Optional[str] = None):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)
        self.source = source

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode((latents / self.scaling_factor).to(dtype)).sample
        return x.float().add(1).mul(0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The posterior mean, or a draw from it with `generator` (DiT's training draws)."""
        dtype = next(self.vae.parameters()).dtype
        post = self.vae.encode(images.mul(2).sub(1).to(dtype)).latent_dist
        z = post.mean if generator is None else post.sample(generator=generator)
        return z.float() * self.scaling_factor

    def describe(self) -> dict:
        return {"source": self.source, "scaling_factor": self.scaling_factor,
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(self.vae.config).items()
                           if not k.startswith("_")}}


def load_vae(source: Union[str, os.PathLike, dict], config: Union[str, dict, None] = None,
             device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
             weights_only: bool = True) -> LatentVAE:
    """Load an AutoencoderKL.

    source: a local diffusers directory (config.json + weights; never downloads), or a weights file
    (.safetensors / .bin / .pt) or in-memory state dict in the diffusers layout, with `config` (a
    preset name from VAE_PRESETS, default "sd-vae", or a dict of AutoencoderKL arguments). Files load
    strictly (keys named on mismatch); old attention names (query/key/value/proj_attn) are renamed.
    """
    AutoencoderKL = autoencoder_kl_class()
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        if config is not None:
            raise ValueError("a diffusers directory carries its own config.json: pass config=None")
        vae = AutoencoderKL.from_pretrained(os.fspath(source), local_files_only=True, torch_dtype=dtype)
        return LatentVAE(vae.to(device).eval().requires_grad_(False), source=os.fspath(source))
    if isinstance(config, str) or config is None:
        name = config or "sd-vae"
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; choose from {sorted(VAE_PRESETS)}")
        config = VAE_PRESETS[name]
    state = read_state_dict(source, weights_only=weights_only)
    for old, new in _OLD_ATTENTION_NAMES.items():
        state = {k.replace(old, new): v for k, v in state.items()}
    cfg = dict(config)
    vae = load_strict(lambda: AutoencoderKL(**cfg), state, device=device, dtype=dtype, what=f"AutoencoderKL {cfg}")
    return LatentVAE(vae.eval().requires_grad_(False), source=source_id(source))
