"""VAR (next-scale prediction) teacher, re-implemented from FoundationVision/VAR (`models/var.py`,
`models/basic_var.py`, `models/helpers.py`, commit 78b9539), with the multi-scale VQ-VAE of
`teachers/var_vqvae.py`.

Sequence: S scales of pn x pn tokens (pn in `patch_nums`), L = sum pn^2 (680 at 256 px). Position 0
is the start token (class embedding + `pos_start`); the input of scale s > 0 is `word_embed` of the
area-downsampled running f_hat after scales < s. Attention is block-causal: level(q) >= level(k).
Every block is AdaLN-modulated by the class embedding (`cond_BD`).

Keys and shapes are the official ones; the derived buffers `lvl_1L`, `attn_bias_for_masking` and
`blocks.*.attn.zero_k_bias` are rebuilt by `reset_buffers` and ignored in official files.

    from teachers.var import load
    t = load("d16", "var_d16.pth", tokenizer_checkpoint="vae_ch160v4096z32.pth", device="cuda")
    tokens = t.sample(labels, t.default_sampling)          # [B, 680] int64
    images = t.decode(tokens)                              # [B, 3, 256, 256] in [0, 1]
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import DecodeState, SamplingConfig, Teacher
from .checkpoint import load_strict, source_id
from .var_vqvae import PATCH_NUMS_256, PATCH_NUMS_512, VAE_PRESETS, VQVAE, VQVAEConfig

# float32 ln(100) as the official `torch.log(torch.tensor(100)).item()`
MAX_SCALE_MUL = 4.605170249938965


# ---- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VARConfig:
    """Hyper-parameters with the official names (`VAR.__init__`, `build_vae_var`).

    embed_dim / num_heads of 0 mean the official depth rule: width 64·depth, depth heads.
    V / Cvae come from the VQ-VAE (official: `vae_local.vocab_size`, `vae_local.Cvae`).
    cond_drop_rate is a training setting: the teacher never drops labels.
    """

    depth: int = 16
    embed_dim: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    num_classes: int = 1000
    patch_nums: Tuple[int, ...] = PATCH_NUMS_256
    V: int = 4096
    Cvae: int = 32

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if not self.embed_dim:
            object.__setattr__(self, "embed_dim", 64 * self.depth)
        if not self.num_heads:
            object.__setattr__(self, "num_heads", self.depth)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if len(self.patch_nums) < 2:
            raise ValueError("VAR needs at least 2 scales")

    @property
    def C(self) -> int:
        return self.embed_dim

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VARConfig":
        """Official names; also the CLI aliases `saln` and `pn` ("256", "512" or "1_2_3_...") and an
        optional "preset" to start from. Training-only knobs (drop rates, fused kernels) are accepted
        and dropped."""
        d = dict(d)
        base = PRESETS[d.pop("preset")].to_dict() if "preset" in d else {}
        if "saln" in d:
            d["shared_aln"] = bool(d.pop("saln"))
        if "pn" in d:
            pn = str(d.pop("pn"))
            pn = {"256": PATCH_NUMS_256, "512": PATCH_NUMS_512}.get(pn) or tuple(
                int(x) for x in pn.replace("-", "_").split("_"))
            d["patch_nums"] = pn
        if "vocab_size" in d:
            d["V"] = d.pop("vocab_size")
        names = {f.name for f in fields(cls)}
        training_only = {"drop_rate", "attn_drop_rate", "drop_path_rate", "flash_if_available", "fused_if_available"}
        extra = sorted(set(d) - names - training_only)
        if extra:
            raise ValueError(f"unknown VAR config keys {extra}; known: {sorted(names)}")
        base.update({k: v for k, v in d.items() if k in names})
        return cls(**base)


PRESETS = {
    "d16": VARConfig(depth=16),
    "d20": VARConfig(depth=20),
    "d24": VARConfig(depth=24),
    "d30": VARConfig(depth=30),
    # d36 is the 512-px model trained with shared AdaLN (`--saln=1 --pn=512`).
    "d36": VARConfig(depth=36, shared_aln=True, patch_nums=PATCH_NUMS_512),
}


def as_var_config(config: Union[str, dict, VARConfig, None]) -> VARConfig:
    if config is None:
        return PRESETS["d16"]
    if isinstance(config, VARConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown VAR preset {config!r}; choose from {sorted(PRESETS)}")
        return PRESETS[config]
    if isinstance(config, dict):
        return VARConfig.from_dict(config)
    raise TypeError(f"VAR config must be a preset name, dict or VARConfig, not {type(config).__name__}")


as_config = as_var_config   # the family interface name (teachers/families.py)


def as_vae_config(config: Union[str, dict, VQVAEConfig, None], var_cfg: VARConfig) -> VQVAEConfig:
    """The VQ-VAE config; None = `vae_ch160v4096z32` with the VAR's V, Cvae and patch_nums."""
    if config is None:
        cfg = dataclasses.replace(VAE_PRESETS["vae_ch160v4096z32"], V=var_cfg.V, Cvae=var_cfg.Cvae,
                                  patch_nums=var_cfg.patch_nums)
    elif isinstance(config, VQVAEConfig):
        cfg = config
    elif isinstance(config, str):
        if config not in VAE_PRESETS:
            raise ValueError(f"unknown VQ-VAE preset {config!r}; choose from {sorted(VAE_PRESETS)}")
        cfg = VAE_PRESETS[config]
    elif isinstance(config, dict):
        cfg = VQVAEConfig.from_dict(config)
    else:
        raise TypeError(f"VQ-VAE config must be a preset name, dict or VQVAEConfig, not {type(config).__name__}")
    bad = [(n, getattr(cfg, n), getattr(var_cfg, n)) for n in ("V", "Cvae", "patch_nums")
           if getattr(cfg, n) != getattr(var_cfg, n)]
    if bad:
        raise ValueError("VQ-VAE and VAR configs disagree: " + "; ".join(f"{n}: vae {a} vs var {b}" for n, a, b in bad))
    return cfg


# ---- blocks (`basic_var.py`) -------------------------------------------------------------------
class KVCache:
    """Keys/values of one attention layer, [B, H, n, hd] each, grown by concatenation per scale."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        return k, v


class FFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head attention; with `attn_l2_norm` q and k are L2-normalised, q is scaled per head by
    exp(min(scale_mul, ln 100)) and SDPA runs with scale 1. The k bias is a fixed zero."""

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = MAX_SCALE_MUL
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim), persistent=False)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def reset_buffers(self, device=None):
        self.zero_k_bias = torch.zeros_like(self.q_bias, device=device or self.q_bias.device)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """x: [B, l, C]; attn_bias: additive [1 or B, 1, l, n] over the n = cache + l keys (None = all
        visible); cache: this layer's KV cache, extended in place. Returns [B, l, C]."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)            # each [B, H, l, hd]
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.update(k, v)                                  # [B, H, n, hd]
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class AdaLNSelfAttn(nn.Module):
    """x += attn(LN(x)(1+scale1)+shift1)·gamma1; x += ffn(LN(x)(1+scale2)+shift2)·gamma2, with
    (gamma1, gamma2, scale1, scale2, shift1, shift2) from `ada_lin(cond)` (or `ada_gss + cond` with
    shared AdaLN, where cond is already [B, 1, 6, C])."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = self.C = cfg.embed_dim
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, 6 * C))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, add_after_attn: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, l, C]; cond_BD: [B, C] ([B, 1, 6, C] with shared AdaLN); add_after_attn: optional
        tensor added to the residual stream between attention and FFN (the DD student's layerwise
        noise/data embedding). Returns [B, l, C]."""
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)   # 6 x [B, 1, C]
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias=attn_bias,
                          cache=cache).mul_(gamma1)
        if add_after_attn is not None:
            x = x + add_after_attn
        x = x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    def forward(self, cond_BD):
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)              # [B, 1, 6, C]


# ---- the transformer (`var.py`) ----------------------------------------------------------------
def level_ids(patch_nums: Sequence[int]) -> torch.Tensor:
    """[L] int64: the scale index of every token position."""
    return torch.cat([torch.full((pn * pn,), i, dtype=torch.long) for i, pn in enumerate(patch_nums)])


def block_causal_bias(levels: torch.Tensor) -> torch.Tensor:
    """levels [L] -> additive mask [1, 1, L, L]: 0 where level(q) >= level(k), -inf elsewhere."""
    d = levels.view(1, -1, 1)
    return torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, len(levels), len(levels))


def init_linear_embedding_(module: nn.Module, std: float) -> None:
    """VAR's base init: trunc_normal(std) for every Linear/Embedding weight, zero Linear biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)


class VAR(nn.Module):
    """The VAR transformer. Hidden-state path, for reuse by the DD student:

        cond = class_emb(labels)                         # [B, C]
        x = input_embed(cond, x_BLCv_wo_first_l)         # [B, n, C]
        h = hidden(x, cond, attn_bias, caches)           # [B, n, C]
        logits = get_logits(h, cond)                     # [B, n, V] fp32
    """

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.embed_dim, cfg.L
        self.C = self.D = C
        self.patch_nums, self.L, self.first_l = cfg.patch_nums, L, cfg.first_l
        self.num_classes, self.V, self.Cvae = cfg.num_classes, cfg.V, cfg.Cvae
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)          # row num_classes = null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.V)
        self.register_buffer("lvl_1L", torch.empty(1, L, dtype=torch.long), persistent=False)
        self.register_buffer("attn_bias_for_masking", torch.empty(1, 1, L, L), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device=None):
        """Rebuild the derived buffers (level ids, block-causal mask) on `device`."""
        device = device or self.pos_1LC.device
        lv = level_ids(self.patch_nums).to(device)
        self.lvl_1L = lv.view(1, -1)
        self.attn_bias_for_masking = block_causal_bias(lv)               # fp32; cast where used

    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1.0):
        """The official initialisation (`VAR.init_weights`); init_std < 0 = sqrt(1 / (3C))."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        init_linear_embedding_(self, init_std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, mean=0, std=(1 / self.C / 3) ** 0.5)
        if init_head >= 0:
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        depth = len(self.blocks)
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if b.attn.attn_l2_norm:
                b.attn.scale_mul_1H11.fill_(math.log(4.0))
            b.attn.q_bias.zero_()
            b.attn.v_bias.zero_()
            if hasattr(b, "ada_lin"):
                b.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)
                b.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)
                b.ada_lin[-1].bias.zero_()
            else:
                nn.init.normal_(b.ada_gss, std=1 / self.C ** 0.5)
                b.ada_gss[:, :, 2:].mul_(init_adaln)
                b.ada_gss[:, :, :2].mul_(init_adaln_gamma)

    # -- pieces --
    @property
    def dtype(self) -> torch.dtype:
        return self.pos_1LC.dtype

    def lvl_pos(self) -> torch.Tensor:
        """[1, L, C]: level + absolute position embedding of every token position."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def sos(self, cond_BD: torch.Tensor, lvl_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The start token(s) [B, first_l, C] = class embedding + pos_start + lvl_pos[:first_l]."""
        lvl_pos = self.lvl_pos() if lvl_pos is None else lvl_pos
        B = cond_BD.shape[0]
        return (cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
                + lvl_pos[:, :self.first_l])

    def input_embed(self, cond_BD: torch.Tensor, x_BLCv_wo_first_l: Optional[torch.Tensor],
                    lvl_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forcing input: [B, n, C] for the start token and the given next-scale inputs
        x [B, n - first_l, Cvae] (None = the start token only)."""
        lvl_pos = self.lvl_pos() if lvl_pos is None else lvl_pos
        x = self.sos(cond_BD, lvl_pos)
        if x_BLCv_wo_first_l is not None and x_BLCv_wo_first_l.shape[1]:
            n = self.first_l + x_BLCv_wo_first_l.shape[1]
            rest = self.word_embed(x_BLCv_wo_first_l.to(self.dtype)) + lvl_pos[:, self.first_l:n]
            x = torch.cat((x, rest), dim=1)
        return x

    def block_cond(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """What the blocks are modulated by: cond_BD [B, C], or [B, 1, 6, C] with shared AdaLN."""
        return self.shared_ada_lin(cond_BD)

    def hidden(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
               caches: Optional[List[KVCache]] = None, block_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the blocks: x [B, l, C] -> [B, l, C]. attn_bias: additive mask [1, 1, l, n]
        (None = every cached and current key visible, i.e. one whole next scale)."""
        bc = self.block_cond(cond_BD) if block_cond is None else block_cond
        for i, b in enumerate(self.blocks):
            x = b(x, bc, attn_bias=attn_bias, cache=None if caches is None else caches[i])
        return x

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """h [B, l, C] -> logits [B, l, V] fp32."""
        return self.head(self.head_nm(h, cond_BD)).float()

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: Optional[torch.Tensor],
                attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced logits [B, n, V] fp32 (no label dropout). x: [B, n - 1, Cvae] next-scale
        inputs (`MultiScaleQuantizer.idx_to_var_input`); attn_bias default: block-causal [:n, :n]."""
        cond_BD = self.class_emb(label_B)
        x = self.input_embed(cond_BD, x_BLCv_wo_first_l)
        n = x.shape[1]
        if attn_bias is None:
            attn_bias = self.attn_bias_for_masking[:, :, :n, :n]
        return self.get_logits(self.hidden(x, cond_BD, attn_bias=attn_bias), cond_BD)


# ---- sampling helpers (`helpers.py`) -----------------------------------------------------------
def top_k_top_p_filter_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """VAR's `sample_with_top_k_top_p_` filter, in place on logits [..., V]:
    top-k: mask values below the k-th largest (ties kept); top-p: sort ascending and mask where
    cumsum(softmax) <= 1 - top_p, always keeping the maximum. top_k <= 0 and top_p outside (0, 1)
    are off. (top_k > V is clamped to V.)"""
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(int(top_k), V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if 0 < top_p < 1:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False
        logits.masked_fill_(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    return logits


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Soft Gumbel-softmax (`gumbel_softmax_with_rng`, hard=False) along the last dim."""
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(
        generator=generator).log()
    return ((logits + gumbels) / tau).softmax(-1)


# ---- the teacher -------------------------------------------------------------------------------
@dataclass
class VARState(DecodeState):
    """KV-cached VAR generation.

    guided: batch doubled as [cond; null] for CFG (cfg_scale != 0); cond_BD: [B', C] class
    embeddings (B' = 2B if guided); block_cond: what the blocks see; lvl_pos: [1, L, C];
    caches: one KVCache per block; f_hat: [B, Cvae, p, p] fp32 running sum of finished scales;
    next_in: [B', pn^2, C] transformer input of step `step`; hidden: its block output once computed
    (the caches then already hold this scale); logits: [B, pn^2, V] filtered logits of step `step`.
    """

    guided: bool = False
    cond_BD: Optional[torch.Tensor] = None
    block_cond: Optional[torch.Tensor] = None
    lvl_pos: Optional[torch.Tensor] = None
    caches: Optional[list] = None
    f_hat: Optional[torch.Tensor] = None
    next_in: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    probs: Optional[torch.Tensor] = None


class VARTeacher(Teacher):
    family = "var"
    # DD's teacher sampling for VAR (sample.py / combine_sample.py): cfg 2.0 on the ramp,
    # top-k 900, top-p 0.95, no temperature, no gumbel smoothing.
    default_sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=900, top_p=0.95)
    decodes_prefix = True                  # fewer whole scales decode the coarser partial f_hat

    def __init__(self, var: VAR, vae: VQVAE, ids: Optional[dict] = None, more_smooth: bool = False):
        super().__init__()
        as_vae_config(vae.cfg, var.cfg)                                  # consistency check
        self.var = var
        self.vae = vae
        self.ids = dict(ids or {})
        self.more_smooth = bool(more_smooth)
        self.patch_nums = var.cfg.patch_nums
        self.step_sizes = tuple(pn * pn for pn in self.patch_nums)
        self.num_classes = var.cfg.num_classes
        self.image_size = vae.cfg.image_size

    @property
    def codebook(self) -> torch.Tensor:
        return self.vae.quantize.embedding.weight.detach().float()

    def describe(self) -> dict:
        return {"family": self.family, "config": self.var.cfg.to_dict(),
                "tokenizer_config": self.vae.cfg.to_dict(),
                "dtype": str(self.var.dtype).replace("torch.", ""),
                "more_smooth": self.more_smooth, **self.ids}

    # -- stepping ----------------------------------------------------------------------------
    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(self.device).long().reshape(-1)
        return torch.where(labels < 0, self.num_classes, labels)        # < 0 = null class, as official

    def _next_input(self, state: VARState, si: int, h_BlC: torch.Tensor) -> Optional[torch.Tensor]:
        """Add scale si's embeddings h [B, pn^2, Cvae] into state.f_hat; return the transformer
        input of scale si+1, [B', pn'^2, C] (None after the last scale)."""
        B, pn, Cv = h_BlC.shape[0], self.patch_nums[si], self.var.Cvae
        h = h_BlC.float().transpose(1, 2).reshape(B, Cv, pn, pn)      # row-major tokens -> grid
        state.f_hat, nxt = self.vae.quantize.get_next_autoregressive_input(si, state.f_hat, h)
        if si == self.num_steps - 1:
            return None
        a, b = self.step_offsets[si + 1], self.step_offsets[si + 2]
        nxt = nxt.view(B, Cv, -1).transpose(1, 2)                       # [B, pn'^2, Cvae]
        x = self.var.word_embed(nxt.to(self.var.dtype)) + state.lvl_pos[:, a:b]
        return x.repeat(2, 1, 1) if state.guided else x

    @torch.no_grad()
    def start(self, labels: torch.Tensor, sampling: SamplingConfig,
              prefix: Optional[torch.Tensor] = None) -> VARState:
        labels = self._labels(labels)
        B = labels.shape[0]
        guided = sampling.cfg_scale != 0
        lab = torch.cat((labels, torch.full_like(labels, self.num_classes))) if guided else labels
        var = self.var
        cond_BD = var.class_emb(lab)                                     # [B', C]; also the sos
        lvl_pos = var.lvl_pos()
        p = self.patch_nums[-1]
        state = VARState(labels=labels, sampling=sampling, guided=guided, cond_BD=cond_BD,
                         block_cond=var.block_cond(cond_BD), lvl_pos=lvl_pos,
                         caches=[KVCache() for _ in var.blocks],
                         f_hat=torch.zeros(B, var.Cvae, p, p, device=labels.device, dtype=torch.float32),
                         next_in=var.sos(cond_BD, lvl_pos))
        if prefix is None or prefix.shape[1] == 0:
            return state
        m = prefix.shape[1]
        offs = self.step_offsets
        if m not in offs:
            raise ValueError(f"prefix of {m} tokens is not a whole number of scales (boundaries {offs})")
        ns = offs.index(m)
        prefix = prefix.to(labels.device).long()
        emb = self.vae.quantize.embedding
        inputs = [state.next_in]
        for s in range(ns):
            tok = prefix[:, offs[s]:offs[s + 1]]
            state.tokens.append(tok)
            nxt = self._next_input(state, s, emb(tok))
            if nxt is not None:
                inputs.append(nxt)
        state.step = ns
        if ns < self.num_steps:
            # One forward over all prefix scales with the block-causal mask fills the caches.
            x = torch.cat(inputs[:ns], dim=1)                            # [B', m, C]
            var.hidden(x, cond_BD, attn_bias=var.attn_bias_for_masking[:, :, :m, :m], caches=state.caches,
                       block_cond=state.block_cond)
            state.next_in = inputs[ns]
        else:
            state.next_in = None
        return state

    def _run_blocks(self, state: VARState) -> torch.Tensor:
        """Block output for the current scale's input (computed once: it extends the caches)."""
        if state.hidden is None:
            state.hidden = self.var.hidden(state.next_in, state.cond_BD, caches=state.caches,
                                           block_cond=state.block_cond)
        return state.hidden

    @torch.no_grad()
    def step_logits(self, state: VARState) -> torch.Tensor:
        """Guided logits [B, pn^2, V] fp32 of step `state.step`, before temperature and filtering:
        (1+t)·c − t·u with t = cfg·si/(S−1) (plain c when cfg_scale == 0)."""
        if state.step >= self.num_steps:
            raise ValueError("generation is finished")
        si, B = state.step, state.batch_size
        logits = self.var.get_logits(self._run_blocks(state), state.cond_BD)   # [B', l, V]
        if state.guided:
            t = state.sampling.cfg_scale * (si / (self.num_steps - 1))
            logits = (1 + t) * logits[:B] - t * logits[B:]
        return logits

    @torch.no_grad()
    def step_probs(self, state: VARState) -> torch.Tensor:
        """[B, pn^2, V] fp32: guided logits / temperature, VAR's top-k then top-p, softmax.
        Computed once per step (the forward extends the KV caches); later calls return the same tensor."""
        if state.probs is None:
            sp = state.sampling
            logits = self.step_logits(state)
            if sp.temperature != 1.0:
                logits = logits / max(sp.temperature, 1e-5)
            state.logits = top_k_top_p_filter_(logits, sp.top_k, sp.top_p)
            state.probs = state.logits.softmax(dim=-1)
        return state.probs

    @torch.no_grad()
    def feed(self, state: VARState, tokens: torch.Tensor, embeddings: Optional[torch.Tensor] = None) -> None:
        """Feed tokens [B, pn^2] of step `state.step`. embeddings: optional [B, pn^2, Cvae] to
        accumulate into f_hat instead of the tokens' codebook rows (the `more_smooth` path)."""
        si = state.step
        if si >= self.num_steps:
            raise ValueError("generation is finished")
        tokens = tokens.to(state.labels.device).long().reshape(state.batch_size, self.step_sizes[si])
        if si < self.num_steps - 1:
            self._run_blocks(state)                  # the next scale attends to this one's keys
        h = self.vae.quantize.embedding(tokens) if embeddings is None else embeddings
        state.next_in = self._next_input(state, si, h)
        state.tokens.append(tokens)
        state.step += 1
        state.hidden = state.logits = state.probs = None

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, labels, sampling, generator, more_smooth, prefix=None, stop_step=None, progress=None):
        more_smooth = self.more_smooth if more_smooth is None else more_smooth
        stop = self.num_steps if stop_step is None else stop_step
        state = self.start(labels, sampling, prefix=prefix)
        out = [] if prefix is None else [prefix.to(state.labels.device).long()]
        emb_w = self.vae.quantize.embedding.weight
        S = self.num_steps
        while state.step < stop:
            si = state.step
            probs = self.step_probs(state)                               # [B, l, V]
            B, l, V = probs.shape
            idx = torch.multinomial(probs.reshape(B * l, V), 1, replacement=True, generator=generator).view(B, l)
            h = None
            if more_smooth:      # official visualisation trick: soft gumbel mix of codebook rows
                ratio = si / (S - 1)
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                h = gumbel_softmax(state.logits.mul(1 + ratio), tau, generator) @ emb_w.unsqueeze(0)
            self.feed(state, idx, embeddings=h)
            out.append(idx)
            if progress is not None:
                progress(si)
        tokens = torch.cat(out, dim=1) if out else torch.zeros(state.batch_size, 0, dtype=torch.long,
                                                               device=state.labels.device)
        return tokens, state

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, sampling: Optional[SamplingConfig] = None,
               generator: Optional[torch.Generator] = None, more_smooth: Optional[bool] = None,
               **kw) -> torch.Tensor:
        """AR sampling as `autoregressive_infer_cfg`: labels [B] -> tokens [B, n] int64.
        more_smooth (None = the teacher's option): feed gumbel-softmax mixtures of codebook rows
        instead of the drawn tokens' rows (visualisation only; the tokens then no longer decode to
        the same image, use `sample_images`). kw: prefix, stop_step, progress as `generate`."""
        return self._sample(labels, sampling or SamplingConfig(), generator, more_smooth, **kw)[0]

    @torch.no_grad()
    def sample_images(self, labels: torch.Tensor, sampling: Optional[SamplingConfig] = None,
                      generator: Optional[torch.Generator] = None, more_smooth: Optional[bool] = None
                      ) -> torch.Tensor:
        """The official `autoregressive_infer_cfg` end to end: labels [B] -> images [B, 3, H, W] in [0, 1]."""
        _, state = self._sample(labels, sampling or SamplingConfig(), generator, more_smooth)
        return self.vae.fhat_to_img(state.f_hat).add_(1).mul_(0.5)

    # -- full-sequence views -----------------------------------------------------------------
    @torch.no_grad()
    def logits(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced, block-causal: labels [B], tokens [B, n] (n a scale boundary) -> [B, n, V] fp32."""
        tokens = tokens.to(self.device).long()
        x = self.vae.quantize.idx_to_var_input(self.vae.split_scales(tokens))   # [B, n - 1, Cvae] or None
        return self.var(self._labels(labels), x)

    @torch.no_grad()
    def fhat(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, n] int64 or embeddings [B, n, Cvae] (n a scale boundary) -> f_hat [B, Cvae, p, p] fp32."""
        tokens = tokens.to(self.device)
        if tokens.is_floating_point():
            return self.vae.embed_to_fhat(tokens)
        return self.vae.idx_to_fhat(tokens.long())

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, n] int64 or embeddings [B, n, Cvae] -> images [B, 3, H, W] in [0, 1].
        n = num_tokens normally; fewer whole scales decode the coarser partial f_hat."""
        return self.vae.fhat_to_img(self.fhat(tokens)).add_(1).mul_(0.5).float()

    def decode_differentiable(self, emb: torch.Tensor) -> torch.Tensor:
        return self.vae.fhat_to_img(self.vae.embed_to_fhat(emb.to(self.device))).float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> tokens [B, num_tokens] int64 (multi-scale quantisation)."""
        x = images.to(self.device, torch.float32)
        x = x.add(x).add_(-1)                                            # [0, 1] -> [-1, 1]
        return torch.cat(self.vae.img_to_idx(x), dim=1)


# ---- loading -----------------------------------------------------------------------------------
VAR_IGNORE = ("lvl_1L", "attn_bias_for_masking", "*.zero_k_bias")
VAE_IGNORE = ("quantize.ema_vocab_hit_SV",)


def load(config: Union[str, dict, VARConfig, None] = "d16", checkpoint=None,
         tokenizer_config: Union[str, dict, VQVAEConfig, None] = None, tokenizer_checkpoint=None,
         device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
         weights_only: bool = True, more_smooth: bool = False, ema: bool = False, init: Optional[dict] = None,
         seed: Optional[int] = None) -> VARTeacher:
    """Build a VAR teacher; checkpoints are paths or in-memory state dicts (None = random weights).

    config: preset ("d16", ..., "d36") or dict of official names (see `VARConfig.from_dict`).
    tokenizer_config: None = `vae_ch160v4096z32` matching the VAR's patch_nums, a preset, or a dict.
    Official files are bare state dicts (training checkpoints: trainer.var_wo_ddp / trainer.vae_local);
    they load strictly, ignoring only the regenerated buffers (`lvl_1L`, `attn_bias_for_masking`,
    `*.zero_k_bias`) and the VQ-VAE's `quantize.ema_vocab_hit_SV`.
    dtype: the transformer's precision; the VQ-VAE always stays fp32 (f_hat and the codebook are fp32). init: `VAR.init_weights` arguments for random weights; seed: seeds the random init.
    ema: read "trainer.ema_parameters" / "ema" (fine-tuned forks; official VAR files have no EMA).
    """
    vcfg = as_var_config(config)
    acfg = as_vae_config(tokenizer_config, vcfg)
    var_nesting = ("trainer.ema_parameters", "ema") if ema else ("trainer.var_wo_ddp", "model", "module", "state_dict")
    vae_nesting = ("trainer.vae_local", "model", "module", "state_dict")
    dev = torch.device(device)
    cuda_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        var = load_strict(lambda: VAR(vcfg), checkpoint, ignore=VAR_IGNORE, nesting=var_nesting,
                          device=dev, dtype=dtype, weights_only=weights_only, what=f"VAR {vcfg}")
        if checkpoint is None:
            var.init_weights(**(init or {}))
        vae = load_strict(lambda: VQVAE(acfg), tokenizer_checkpoint, ignore=VAE_IGNORE, nesting=vae_nesting,
                          device=dev, dtype=torch.float32, weights_only=weights_only, what=f"VQ-VAE {acfg}")
    ids = {"checkpoint": source_id(checkpoint), "tokenizer_checkpoint": source_id(tokenizer_checkpoint)}
    if ema:
        ids["ema"] = True
    teacher = VARTeacher(var, vae, ids, more_smooth=more_smooth)
    teacher.eval().requires_grad_(False)
    return teacher
