"""DiT (diffusion transformer) teacher, re-implemented from facebookresearch/DiT (`models.py`,
`diffusion/`, `sample.py`, commit ed81ce2), with the Stable Diffusion VAE of `teachers/latent_vae.py`.

A DiT predicts the noise ε (and, with `learn_sigma`, a variance interpolation in 4 more channels) of
a latent x_t [B, 4, H/8, W/8]. Patches of p x p latent pixels are tokens (256 at 256 px, p = 2); every
block is adaLN-Zero modulated by c = t_emb(t) + y_emb(label). Label row `num_classes` is the null
class of classifier-free guidance (present when `class_dropout_prob > 0`, as in every release).

Keys and shapes are the official ones (timm's PatchEmbed / Attention / Mlp names included); the
fixed sin-cos `pos_embed` is stored in the files, so it is a (frozen) parameter here too.

    from teachers import load_teacher
    t = load_teacher("dit", "DiT-XL/2", checkpoint="DiT-XL-2-256x256.pt", vae="sd-vae-ft-ema/")
    latents = t.sample(torch.tensor([207, 360]), steps=25, cfg_scale=1.5)     # [2, 4, 32, 32]
    images = t.decode(latents)                                                # [2, 3, 256, 256] in [0, 1]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_strict, source_id
from .diffusion_base import DiffusionTeacher


# ---- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters with the official names (`DiT.__init__`).

    input_size: latent side (image px / 8: 32 at 256 px, 64 at 512 px). class_dropout_prob > 0 adds
    the null-class row used by CFG; the teacher itself never drops labels.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos positions)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown DiT config keys {bad}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# official `DiT_models`: name -> (depth, hidden_size, patch_size, num_heads); input_size from image_size
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
PRESETS = {f"DiT-{s}/{p}": dict(depth=d, hidden_size=w, patch_size=p, num_heads=h)
           for s, (d, w, h) in _SIZES.items() for p in (2, 4, 8)}
IMAGE_SIZES = (256, 512)
LATENT_DOWNSAMPLE = 8          # the SD VAE: 8x fewer pixels per side


def as_dit_config(config: Union[str, dict, DiTConfig, None], image_size: int = 256) -> DiTConfig:
    """A preset name ("DiT-XL/2", at `image_size` px), a dict of official names, or a DiTConfig."""
    if isinstance(config, DiTConfig):
        return config
    if config is None:
        config = "DiT-XL/2"
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown DiT preset {config!r}; choose from {sorted(PRESETS)}")
        if image_size not in IMAGE_SIZES:
            raise ValueError(f"DiT presets exist at {IMAGE_SIZES} px, not {image_size}")
        return DiTConfig(input_size=image_size // LATENT_DOWNSAMPLE, **PRESETS[config])
    return DiTConfig.from_dict(dict(config))


# ---- layers ------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] with per-sample shift/scale [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t [B] (fractional allowed) -> [B, dim] fp32: cos half then sin half (GLIDE's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim] fp32, MAE's 2-D table (row-major positions): the first half encodes the
    column index, the second the row (MAE's `meshgrid(w, h)`), each as sin then cos over dim/4
    float64 frequencies 10000^(-k/(dim/4))."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float32)
    col, row = np.meshgrid(coords, coords)         # meshgrid(w, h): `col` varies along a row
    emb = np.concatenate([one_axis(dim // 2, col), one_axis(dim // 2, row)], axis=1)
    return torch.from_numpy(emb).float()


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, h*p, w*p] (row-major patches, (p, p, C) inside a token)."""
    B, L, _ = x.shape
    p, C = patch_size, channels
    h = int(round(math.sqrt(L)))
    x = x.reshape(B, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, h * p, h * p)


class PatchEmbed(nn.Module):
    """x [B, C, H, W] -> [B, (H/p)(W/p), D] (timm's layout: `proj` is the strided conv)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + int(cfg.class_dropout_prob > 0), cfg.hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    """timm's Attention (qkv_bias=True, no q/k norm), through SDPA as timm's fused path."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: c [B, D] -> shift/scale/gate for the attention and the MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh_a, sc_a))
        return x + g_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh_m, sc_m))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---- the model -----------------------------------------------------------------------------------
class DiT(nn.Module):
    """forward(x [B, C, H, W], t [B], labels [B]) -> [B, out_channels, H, W] (ε first, then the
    variance interpolation when learn_sigma). Labels equal to `num_classes` select the null row."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg)
        # frozen but stored in the official files, so a parameter (key `pos_embed`)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        if not self.pos_embed.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation: xavier linears, N(0, 0.02) label/time tables, sin-cos
        positions, and zeroed adaLN modulations and output layer (adaLN-Zero: each block starts as
        the identity, the model's output as 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        g = int(round(math.sqrt(self.cfg.num_patches)))
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.hidden_size, g)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for lin in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                    self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def null_label(self) -> Optional[int]:
        return self.cfg.num_classes if self.cfg.class_dropout_prob > 0 else None

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, h*p, w*p] (see `unpatchify`)."""
        return unpatchify(x, self.cfg.patch_size, self.cfg.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(labels)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


# ---- the teacher ---------------------------------------------------------------------------------
class DiTTeacher(DiffusionTeacher):
    """A DiT on the VP schedule of `teachers/vp_diffusion.py`, on the latents of a VAE or, with
    `pixel_space`, on images in [-1, 1] (1 channel = grey, shown as 3)."""

    family = "dit"

    def __init__(self, model: DiT, vae=None, ids: Optional[dict] = None, cfg_channels: Optional[int] = 3,
                 image_size: Optional[int] = None, num_train_timesteps: int = 1000, pixel_space: bool = False):
        super().__init__(num_train_timesteps=num_train_timesteps)
        self.model = model
        self.vae = vae
        self.ids = dict(ids or {})
        c = model.cfg
        self.num_classes = c.num_classes
        self.null_label = model.null_label
        self.latent_shape = (c.in_channels, c.input_size, c.input_size)
        self.cfg_channels = cfg_channels
        self.pixel_space = pixel_space
        if pixel_space and vae is not None:
            raise ValueError("a pixel-space DiT takes no VAE")
        self.image_size = c.input_size if pixel_space else (image_size or c.input_size * LATENT_DOWNSAMPLE)

    def model_output(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = self.model.pos_embed.dtype
        return self.model(x.to(dtype), t, labels).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.pixel_space:
            img = latents.float().add(1).mul(0.5).clamp(0, 1)
            return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img
        if self.vae is None:
            raise RuntimeError("this DiT teacher has no VAE: load it with vae=<directory or file>")
        return self.vae.decode(latents)

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.pixel_space:
            x = images.float().mean(1, keepdim=True) if self.latent_shape[0] == 1 else images.float()
            return x.mul(2).sub(1)
        if self.vae is None:
            raise RuntimeError("this DiT teacher has no VAE: load it with vae=<directory or file>")
        return self.vae.encode(images, generator=generator)

    def describe(self) -> dict:
        d = {"family": self.family, "config": self.model.cfg.to_dict(), "cfg_channels": self.cfg_channels,
             "image_size": self.image_size, "pixel_space": self.pixel_space, **self.ids}
        if self.vae is not None:
            d["vae"] = self.vae.describe()
        return d


def _allow_training_args():
    """DiT's train.py stores its argparse.Namespace under "args": a plain attribute bag, safe to
    allow under weights_only so nested training checkpoints load without an unsafe unpickle."""
    return torch.serialization.safe_globals([argparse.Namespace])


def load(config: Union[str, dict, DiTConfig, None] = "DiT-XL/2", checkpoint=None, *,
         image_size: int = 256, vae=None, vae_config: Union[str, dict, None] = None,
         tokenizer_config=None, tokenizer_checkpoint=None,
         device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
         weights_only: bool = True, ema: bool = True, cfg_channels: Optional[int] = 3,
         pixel_space: bool = False, seed: Optional[int] = None) -> DiTTeacher:
    """Build a DiT teacher; checkpoint is a path or an in-memory state dict (None = random weights,
    the official init).

    config: preset ("DiT-XL/2", ..., "DiT-S/8", at `image_size` 256 or 512 px) or a dict of official names.
    Official release files are bare EMA state dicts; train.py checkpoints nest {model, ema, opt, args}
    and load their "ema" (as the official `find_model`), or "model" with `ema=False`.
    vae: the latent VAE: a diffusers directory or a weights file (see `teachers.latent_vae.load_vae`),
    an already built `LatentVAE`, or None (latents only). tokenizer_checkpoint is accepted as its alias
    (the `load_teacher` signature). cfg_channels: how many latent channels CFG guides (3 = the official
    `forward_with_cfg`; None = all). pixel_space: the DiT works on images in [-1, 1] (no VAE; the zoo's
    digits-dit). dtype: the transformer's precision; outputs are fp32.
    """
    cfg = as_dit_config(config, image_size)
    if vae is None:
        vae = tokenizer_checkpoint
    vae_config = vae_config if vae_config is not None else tokenizer_config
    nesting = ("ema", "model", "module", "state_dict") if ema else ("model", "module", "state_dict")
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[], enabled=seed is not None), _allow_training_args():
        if seed is not None:
            torch.manual_seed(seed)
        model = load_strict(lambda: DiT(cfg), checkpoint, nesting=nesting, device=dev, dtype=dtype,
                            weights_only=weights_only, what=f"DiT {cfg}")
    model.pos_embed.requires_grad_(False)
    latent_vae = None
    if vae is not None:
        from .latent_vae import LatentVAE, load_vae
        latent_vae = vae if isinstance(vae, LatentVAE) else load_vae(vae, config=vae_config, device=dev,
                                                                     weights_only=weights_only)
    ids = {"checkpoint": source_id(checkpoint)}
    teacher = DiTTeacher(model, latent_vae, ids, cfg_channels=cfg_channels,
                         image_size=cfg.input_size * LATENT_DOWNSAMPLE, pixel_space=pixel_space)
    teacher.eval().requires_grad_(False)
    return teacher
