"""VAR's multi-scale VQ-VAE (`vae_ch160v4096z32`), re-implemented from FoundationVision/VAR
(`models/vqvae.py`, `models/basic_vae.py`, `models/quant.py`, commit 78b9539).

Module and parameter names are the official ones, so the released `vae_ch160v4096z32.pth` loads
strictly (only the training statistic `quantize.ema_vocab_hit_SV` is ignored; it is not kept here).

Images live in [-1, 1]. The encoder maps [B, 3, 16p, 16p] to f [B, Cvae, p, p] (p = patch_nums[-1]).
Multi-scale residual quantisation, for scale si of S with side pn:

    z   = area(f_rest -> pn)                  (the last scale uses f_rest as is)
    idx = argmin_v |z - e_v|^2                 (raw codebook, no normalisation)
    h   = phi_k(bicubic(e[idx] -> p))          (no up-sampling on the last scale)
    f_hat += h;  f_rest -= h

with phi(h) = (1 - r) h + r conv3x3(h), r = 0.5, and k = PHI_INDEX[si] for the 4 partially shared
convs. f_hat always accumulates in fp32; interpolation is bicubic/area with align_corners=False.
Tokens of one scale are row-major; across scales they are concatenated from small to large.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

# Scale -> phi conv for 4 partially shared convs and 10 scales, as the official float64 numpy
# argmin over linspace(1/12, 11/12, 4) resolves it. Scales 2 and 7 are exact ties in real
# arithmetic that float64 rounding breaks towards 1 and 3 (float32 would give a different table).
PHI_INDEX_4x10 = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


def phi_index_table(num_scales: int, num_phi: int) -> Tuple[int, ...]:
    """Which of `num_phi` phi convs each of `num_scales` scales uses.

    Official rule (`PhiPartiallyShared` / `PhiNonShared.__getitem__`): ticks = linspace(1/3/K,
    1-1/3/K, K) if K == 4 else linspace(1/2/K, 1-1/2/K, K); scale si picks argmin |ticks - si/(S-1)|,
    all in float64 numpy (first index on exact ties). The 4x10 case is hardcoded (PHI_INDEX_4x10).
    """
    K, S = int(num_phi), int(num_scales)
    if K == 1:
        return (0,) * S
    if K == 4 and S == 10:
        return PHI_INDEX_4x10
    if S < 2:
        raise ValueError("the phi table needs at least 2 scales (the official rule divides by S-1)")
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    return tuple(int(np.argmin(np.abs(ticks - si / (S - 1)))) for si in range(S))


@dataclass(frozen=True)
class VQVAEConfig:
    """Hyper-parameters with the official names (`build_vae_var`, `VQVAE.__init__`)."""

    V: int = 4096                       # codebook size (official VQVAE arg: vocab_size)
    Cvae: int = 32                      # latent / codebook dim (official: z_channels)
    ch: int = 160
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4           # 0: one phi per scale, 1: one shared phi, K>1: K partially shared
    default_qresi_counts: int = 0       # only for share_quant_resi == 0 (0 = one per scale)
    patch_nums: Tuple[int, ...] = PATCH_NUMS_256   # official: v_patch_nums

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(c) for c in self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(f"ch * ch_mult must be multiples of 32 (GroupNorm(32)): ch={self.ch}, ch_mult={self.ch_mult}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        """Build from official names; the VQVAE constructor's aliases are accepted too."""
        alias = {"vocab_size": "V", "z_channels": "Cvae", "v_patch_nums": "patch_nums"}
        d = {alias.get(k, k): v for k, v in d.items()}
        names = {f.name for f in fields(cls)}
        extra = sorted(set(d) - names - {"test_mode", "dropout", "beta"})   # training-only knobs
        if extra:
            raise ValueError(f"unknown VQ-VAE config keys {extra}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


VAE_PRESETS = {
    "vae_ch160v4096z32": VQVAEConfig(),
    "vae_ch160v4096z32-512": VQVAEConfig(patch_nums=PATCH_NUMS_512),
}


# ---- encoder / decoder (LDM vq-f16 layout, `basic_vae.py`) ---------------------------------------
def Normalize(in_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused qkv 1x1 conv (q, k, v order)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.C = in_channels
        self.norm = Normalize(in_channels)
        self.qkv = nn.Conv2d(in_channels, 3 * in_channels, kernel_size=1)
        self.w_ratio = int(in_channels) ** (-0.5)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        qkv = self.qkv(self.norm(x))
        B, _, H, W = qkv.shape
        C = self.C
        q, k, v = qkv.reshape(B, 3, C, H, W).unbind(1)
        q = q.reshape(B, C, H * W).permute(0, 2, 1).contiguous()      # (B, HW, C)
        k = k.reshape(B, C, H * W).contiguous()                        # (B, C, HW)
        w = torch.bmm(q, k).mul_(self.w_ratio)                         # (B, HW_q, HW_k); scale after the bmm
        w = F.softmax(w, dim=2)
        v = v.reshape(B, C, H * W).contiguous()                        # (B, C, HW_k)
        w = w.permute(0, 2, 1).contiguous()                            # (B, HW_k, HW_q)
        h = torch.bmm(v, w).view(B, C, H, W)                           # (B, C, HW_q)
        return x + self.proj_out(h)


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig, in_channels: int = 3):
        super().__init__()
        ch, ch_mult, nrb = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.num_resolutions, self.num_res_blocks = len(ch_mult), nrb
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(nrb):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and cfg.using_sa:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in) if cfg.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.Cvae, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        """x: [B, 3, H, W] in [-1, 1] -> [B, Cvae, H/16, W/16]."""
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            lvl = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = lvl.block[i_block](h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig, out_channels: int = 3):
        super().__init__()
        ch, ch_mult, nrb = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.num_resolutions, self.num_res_blocks = len(ch_mult), nrb
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.Cvae, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in) if cfg.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        ups = []
        for i_level in reversed(range(self.num_resolutions)):       # built deepest first
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(nrb + 1):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and cfg.using_sa:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)                                 # up[0] = full resolution
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        """z: [B, Cvae, h, w] -> [B, 3, 16h, 16w] (unclamped)."""
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            lvl = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = lvl.block[i_block](h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[i_block](h)
            if i_level != 0:
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- multi-scale residual quantiser (`quant.py`) -------------------------------------------------
class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h)."""

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h):
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def _make_phi(cfg: VQVAEConfig) -> nn.Module:
    return Phi(cfg.Cvae, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):             # share_quant_resi == 1: key `quant_resi.qresi.*`
    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __len__(self):
        return 1

    def __getitem__(self, k: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):    # share_quant_resi == K > 1: keys `quant_resi.qresi_ls.{k}.*`
    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls

    def __len__(self):
        return len(self.qresi_ls)

    def __getitem__(self, k: int) -> nn.Module:
        return self.qresi_ls[k]


class PhiNonShared(nn.ModuleList):      # share_quant_resi == 0: keys `quant_resi.{k}.*`
    pass


class MultiScaleQuantizer(nn.Module):
    """`VectorQuantizer2` at inference: codebook `embedding` [V, Cvae] and the phi convs `quant_resi`.

    Phi convs are indexed by integer through `self.phi_idx` (official: by the float si/(S-1)).
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.V, self.Cvae, self.using_znorm = cfg.V, cfg.Cvae, cfg.using_znorm
        self.patch_nums = cfg.patch_nums
        S = len(cfg.patch_nums)
        if cfg.share_quant_resi == 0:
            self.quant_resi = PhiNonShared([_make_phi(cfg) for _ in range(cfg.default_qresi_counts or S)])
        elif cfg.share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(cfg))
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([_make_phi(cfg) for _ in range(cfg.share_quant_resi)]))
        self.phi_idx = phi_index_table(S, len(self.quant_resi))
        self.embedding = nn.Embedding(cfg.V, cfg.Cvae)

    def phi(self, si: int) -> nn.Module:
        return self.quant_resi[self.phi_idx[si]]

    # -- encoding --
    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """z_NC: [N, Cvae] -> nearest codebook index [N] (squared L2, official addmm_ form)."""
        w = self.embedding.weight.data
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(w.T, dim=0), dim=1)
        d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(w.square(), dim=1, keepdim=False)
        d.addmm_(z_NC, w.T, alpha=-2, beta=1)                          # (N, V)
        return torch.argmin(d, dim=1)

    def f_to_idx_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool) -> List[torch.Tensor]:
        """f: [B, Cvae, p, p] -> per scale idx [B, pn*pn] (or the running f_hat [B, Cvae, p, p])."""
        B, C, H, W = f_BChw.shape
        assert self.patch_nums[-1] == H == W, f"patch_nums[-1]={self.patch_nums[-1]} != {(H, W)}"
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        S = len(self.patch_nums)
        for si, pn in enumerate(self.patch_nums):
            last = si == S - 1
            z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx_N = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C))  # row-major inside the scale
            h = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
            h = h.contiguous() if last else F.interpolate(h, size=(H, W), mode="bicubic", align_corners=False).contiguous()
            h = self.phi(si)(h)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, pn * pn))
        return out

    # -- decoding --
    def embed_to_fhat(self, ms_h_BChw: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale embeddings [B, Cvae, pn, pn] (the first len(...) scales) -> f_hat [B, Cvae, p, p] fp32."""
        B = ms_h_BChw[0].shape[0]
        p = self.patch_nums[-1]
        S = len(self.patch_nums)
        f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, p, p, dtype=torch.float32)
        for si, h in enumerate(ms_h_BChw):
            if si < S - 1:
                h = F.interpolate(h, size=(p, p), mode="bicubic", align_corners=False)
            f_hat.add_(self.phi(si)(h))
        return f_hat

    def get_next_autoregressive_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's embeddings h [B, Cvae, pn, pn] into f_hat (in place, fp32) and return
        (f_hat, the next scale's input area(f_hat -> pn[si+1]) [B, Cvae, pn', pn'] or f_hat if last)."""
        S, p = len(self.patch_nums), self.patch_nums[-1]
        if si != S - 1:
            h = self.phi(si)(F.interpolate(h_BChw, size=(p, p), mode="bicubic", align_corners=False))
            f_hat.add_(h)
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat.add_(self.phi(si)(h_BChw))
        return f_hat, f_hat

    def idx_to_var_input(self, ms_idx_Bl: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """Teacher-forcing input (`idxBl_to_var_input`): scales 0..n-1 of indices ->
        [B, sum(pn[1:n]^2), Cvae] fp32, the area-downsampled f_hat that feeds scales 1..n-1."""
        B, C, p = ms_idx_Bl[0].shape[0], self.Cvae, self.patch_nums[-1]
        f_hat = ms_idx_Bl[0].new_zeros(B, C, p, p, dtype=torch.float32)
        nxt = []
        for si in range(len(ms_idx_Bl) - 1):
            pn = self.patch_nums[si]
            h = self.embedding(ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat, x = self.get_next_autoregressive_input(si, f_hat, h)
            nxt.append(x.view(B, C, -1).transpose(1, 2))
        return torch.cat(nxt, dim=1) if nxt else None


class VQVAE(nn.Module):
    """Encoder + decoder + multi-scale quantiser. Keys as the official `VQVAE` minus
    `quantize.ema_vocab_hit_SV`."""

    def __init__(self, cfg: VQVAEConfig = VQVAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.V, self.Cvae, self.patch_nums = cfg.V, cfg.Cvae, cfg.patch_nums
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, stride=1, padding=ks // 2)

    @property
    def scale_offsets(self) -> Tuple[int, ...]:
        offs = [0]
        for pn in self.patch_nums:
            offs.append(offs[-1] + pn * pn)
        return tuple(offs)

    def split_scales(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """[B, n, ...] flat tokens (n a scale boundary) -> per-scale [B, pn*pn, ...] views."""
        offs = self.scale_offsets
        n = flat.shape[1]
        if n not in offs or n == 0:
            raise ValueError(f"{n} tokens is not a whole number of scales (boundaries {offs})")
        return [flat[:, offs[s]:offs[s + 1]] for s in range(offs.index(n))]

    # -- image <-> latent --
    def img_to_f(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, 3, H, W] in [-1, 1] -> f [B, Cvae, p, p] (before quantisation)."""
        return self.quant_conv(self.encoder(img))

    def img_to_idx(self, img: torch.Tensor) -> List[torch.Tensor]:
        """img [B, 3, H, W] in [-1, 1] -> per-scale indices [B, pn*pn] (official `img_to_idxBl`)."""
        return self.quantize.f_to_idx_or_fhat(self.img_to_f(img), to_fhat=False)

    def img_to_fhat(self, img: torch.Tensor) -> torch.Tensor:
        """img in [-1, 1] -> the encoder's quantised f_hat [B, Cvae, p, p] fp32 (all scales)."""
        return self.quantize.f_to_idx_or_fhat(self.img_to_f(img), to_fhat=True)[-1]

    def idx_to_fhat(self, idx: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """Flat [B, n] or per-scale [B, pn*pn] indices -> f_hat [B, Cvae, p, p] fp32."""
        ms = self.split_scales(idx) if isinstance(idx, torch.Tensor) else list(idx)
        return self.embed_to_fhat([self.quantize.embedding(i) for i in ms])

    def embed_to_fhat(self, emb: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """Per-token continuous embeddings, flat [B, n, Cvae] (n a scale boundary, e.g. 680) or
        per scale [B, pn*pn, Cvae] -> f_hat [B, Cvae, p, p] fp32."""
        ms = self.split_scales(emb) if isinstance(emb, torch.Tensor) else list(emb)
        B, C = ms[0].shape[0], self.Cvae
        ms_h = []
        for e in ms:
            pn = round(e.shape[1] ** 0.5)
            ms_h.append(e.float().transpose(1, 2).reshape(B, C, pn, pn))   # row-major tokens -> grid
        return self.quantize.embed_to_fhat(ms_h)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat [B, Cvae, p, p] -> image [B, 3, 16p, 16p] clamped to [-1, 1]."""
        dt = self.post_quant_conv.weight.dtype
        return self.decoder(self.post_quant_conv(f_hat.to(dt))).clamp_(-1, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the full multi-scale quantiser: [-1, 1] -> [-1, 1]."""
        return self.fhat_to_img(self.img_to_fhat(img))
