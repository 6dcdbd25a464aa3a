"""LlamaGen's VQ image tokenizer (VQ-16), re-implemented for inference.

Faithful to `tokenizer/tokenizer_image/vq_model.py` of FoundationVision/LlamaGen: the state-dict keys
and shapes are the official ones (checked in tests/test_llamagen.py against a manifest taken from the
official modules), the numerics follow it op for op (GroupNorm(32, eps 1e-6), swish written as
`x * sigmoid(x)`, attention scale `int(c) ** -0.5` after the bmm, asymmetric-pad stride-2 downsampling,
nearest ×2 upsampling, l2-normalised codebook lookups).

Not re-implemented: the training losses and the `quantize.codebook_used` usage buffer (a training
statistic; the loader ignores it).

    vq = VQModel(VQConfig.preset("VQ-16"))
    idx = vq.encode(images_pm1)            # [B, 3, 256, 256] in [-1, 1] -> [B, 256] int64
    x = vq.decode_code(idx)                # -> [B, 3, 256, 256], not clamped (as official)
    x = vq.decode_embeddings(z)            # z [B, 256, 8] continuous, no quantisation
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    """Hyper-parameters of the VQ tokenizer. Field names are the official `ModelArgs` ones
    (`ch`, `num_res_blocks`, `in_channels`, `out_channels` are the official Encoder/Decoder
    constructor arguments, fixed there by default)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True      # training-only usage buffer; never built here
    commit_loss_beta: float = 0.25        # training-only
    entropy_loss_ratio: float = 0.0       # training-only
    encoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0                # identity at inference
    ch: int = 128
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        # lists from JSON / argparse become tuples so the config stays hashable and frozen
        object.__setattr__(self, "encoder_ch_mult", tuple(self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult))

    @property
    def downsample(self) -> int:
        """Pixels per token side (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_ch_mult"] = list(self.encoder_ch_mult)
        d["decoder_ch_mult"] = list(self.decoder_ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        """Official field names; an optional "preset" key picks the base ("VQ-16")."""
        d = dict(d)
        base = VQ_PRESETS[d.pop("preset")] if "preset" in d else {}
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown VQ config fields {bad}; known: {sorted(known)}")
        return cls(**{**base, **d})

    @classmethod
    def preset(cls, name: str) -> "VQConfig":
        if name not in VQ_PRESETS:
            raise ValueError(f"unknown VQ preset {name!r}; choose from {sorted(VQ_PRESETS)}")
        return cls(**VQ_PRESETS[name])


VQ_PRESETS = {
    "VQ-16": dict(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": dict(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
}


def as_vq_config(config: Union[str, dict, VQConfig, None]) -> VQConfig:
    if config is None:
        return VQConfig.preset("VQ-16")
    if isinstance(config, VQConfig):
        return config
    if isinstance(config, str):
        return VQConfig.preset(config)
    return VQConfig.from_dict(config)


# ---- building blocks ---------------------------------------------------------------------------
def swish(x: torch.Tensor) -> torch.Tensor:
    # written as the official `nonlinearity` (F.silu differs in the last bit on ~25% of elements)
    return x * torch.sigmoid(x)


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, c_in, H, W] -> [B, c_out, H, W]"""
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with separate 1×1 q/k/v/proj_out convs."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> same"""
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        B, C, H, W = q.shape
        q = q.reshape(B, C, H * W).permute(0, 2, 1)          # [B, HW, C]
        k = k.reshape(B, C, H * W)                            # [B, C, HW]
        w = torch.bmm(q, k) * (int(C) ** (-0.5))              # [B, HW(q), HW(k)]
        w = F.softmax(w, dim=2)
        v = v.reshape(B, C, H * W)                            # [B, C, HW]
        h = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `res` blocks, `attn` blocks (lowest resolution only), and a resampler
    (`downsample` in the encoder, `upsample` in the decoder) except at the last level."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, with_attn: bool,
                 resample: Optional[str]):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_blocks):
            self.res.append(ResnetBlock(c_in, c_out))
            c_in = c_out
            if with_attn:
                self.attn.append(AttnBlock(c_out))
        if resample == "down":
            self.downsample = Downsample(c_out)
        elif resample == "up":
            self.upsample = Upsample(c_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.encoder_ch_mult
        n = len(mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(mult)
        self.conv_blocks = nn.ModuleList(
            Level(ch * in_mult[i], ch * mult[i], cfg.num_res_blocks, with_attn=(i == n - 1),
                  resample=None if i == n - 1 else "down")
            for i in range(n))
        c = ch * mult[-1]
        self.mid = _mid(c)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> [B, z_channels, H/ds, W/ds]"""
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.decoder_ch_mult
        n = len(mult)
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        # appended from the lowest resolution up: conv_blocks.0 is the deepest level
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            self.conv_blocks.append(Level(c, ch * mult[i], cfg.num_res_blocks + 1,
                                          with_attn=(i == n - 1), resample=None if i == 0 else "up"))
            c = ch * mult[i]
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, z_channels, h, w] -> [B, 3, h·ds, w·ds]"""
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """The codebook: `embedding` [V, C]; lookups use l2-normalised rows when `l2_norm`."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)

    def codebook(self) -> torch.Tensor:
        """[V, C]: the rows the decoder sees (l2-normalised when `l2_norm`)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: [N, C] -> codebook indices [N] int64, by the official distance
        |z|² + |e|² − 2 z·e (z and e l2-normalised first when `l2_norm`)."""
        e = self.codebook()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        d = (torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", z, e.t()))
        return torch.argmin(d, dim=1)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] in [-1, 1] -> indices [B, h·w] int64, row-major."""
        z = self.quant_conv(self.encoder(x))                       # [B, C, h, w]
        B, C, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(B * h * w, C)            # [B·h·w, C]
        return self.quantize.nearest(z).view(B, h * w)

    def decode_embeddings(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, n, C] continuous token embeddings, n a square (no quantisation, no
        normalisation) -> images [B, 3, H, W], unclamped, nominally in [-1, 1]."""
        B, n, C = z.shape
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"decode: {n} tokens do not form a square grid")
        z = z.reshape(B, g, g, C).permute(0, 3, 1, 2).contiguous()  # [B, C, g, g]
        return self.decoder(self.post_quant_conv(z))

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: [B, n] (or [B, h, w]) int -> images [B, 3, H, W], unclamped (official
        `decode_code` with the l2-normalised codebook rows)."""
        indices = indices.reshape(indices.shape[0], -1).long()
        return self.decode_embeddings(self.quantize.codebook()[indices])
