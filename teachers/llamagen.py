"""LlamaGen teacher: the GPT of `autoregressive/models/gpt.py` (class- or text-conditional) + the VQ-16
tokenizer.

Faithful to FoundationVision/LlamaGen: state-dict keys and shapes are the official ones (the released
`c2i_*.pt` files load strictly), and the numerics follow it op for op: RMSNorm computed in fp32 then
`type_as(x) * weight`; interleaved 2-D RoPE tables computed in float32 with all-zero rows for the class
token; SwiGLU with hidden size `find_multiple(int(2·4·dim/3), multiple_of)`; SDPA attention with the
default 1/√head_dim scale; `output` cast to float. Sampling follows `autoregressive/models/generate.py`:
CFG `u + (c − u)·s` at every token when s > 1 (the batch is doubled with the null class
`num_classes`), `logits / max(T, 1e-5)`, Hugging-Face top-k then top-p, softmax.

Text-to-image (`model_type="t2i"`, the released `t2i_XL_stage1_256.pt`): the condition is a
`teachers.base.Caption` of FLAN-T5-XL features [B, 120, 2048] and a mask. `cls_embedding` is then the
official CaptionEmbedder: `cap_proj` (fc1 caption_dim -> dim, tanh-GELU, fc2 dim -> dim, no biases) and
the learned null caption `uncond_embedding` [120, caption_dim] (a persistent buffer), so the 120 caption
positions come first and their RoPE rows are zero, like the class token's. Sampling follows
`generate.py` + `sample_t2i.py`: features multiplied by the mask; with CFG the batch is doubled with the
null caption under the SAME mask; attention is causal, with the padded caption positions blocked as keys
and the diagonal always open (`condition_attention_mask`). See docs/teachers.md for the line references.

The transformer pieces (`GPT.layers`, `norm`, `output`, `cls_embedding`, `freqs_cis`) are reusable by the
DD student: `GPT.forward_hidden(h, rope=..., mask=None)` runs the blocks on already-embedded inputs
[B, S, dim] with a causal mask, and `GPT.head(h)` is `output(norm(h)).float()`.

Not re-implemented: dropout / drop-path / caption dropout (identity at inference), `cfg_interval`, the
official padded KV-cache layout (ours is an equivalent one; logits agree to fp32 round-off).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import Caption, DecodeState, SamplingConfig, Teacher
from .checkpoint import CheckpointMismatchError, load_strict, read_state_dict, source_id
from .llamagen_vq import VQConfig, VQModel, as_vq_config


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class GPTConfig:
    """GPT hyper-parameters under the official `ModelArgs` names (defaults: GPT-B at 256 px).

    The dropout / drop-path / initializer fields are accepted so official argument dicts load; they
    do nothing here (inference re-implementation); `max_batch_size` and `max_seq_len` are likewise
    unused. `caption_dim` matters only for `model_type="t2i"`, `num_classes` only for "c2i".
    `cls_token_num` is 1 for c2i; for t2i it is the number of caption positions (the official scripts
    pass 120, and `from_dict` / `preset` default it to 120 for t2i), and our null caption has that many
    rows (the official CaptionEmbedder hard-codes 120, the only value its sampler runs with).
    """

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"LlamaGen model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            # the c2i label embedder yields one vector; more class slots would shift every position
            raise ValueError(f"c2i LlamaGen uses cls_token_num=1, got {self.cls_token_num}")
        if self.cls_token_num < 1:
            raise ValueError(f"cls_token_num must be >= 1, got {self.cls_token_num}")
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} not divisible by n_kv_head {self.n_kv_head}")
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Official field names; an optional "preset" key ("GPT-L") gives the base, and an optional
        "image_size" (with "downsample_size", default 16) sets block_size. model_type "t2i" without
        cls_token_num gets 120 (what every official t2i script passes)."""
        d = dict(d)
        if d.get("model_type") == "t2i" and "cls_token_num" not in d:
            d["cls_token_num"] = T2I_TOKENS
        base = dict(PRESETS[d.pop("preset")]) if "preset" in d else {}
        image_size = d.pop("image_size", None)
        ds = d.pop("downsample_size", 16)
        if image_size is not None:
            d["block_size"] = (int(image_size) // int(ds)) ** 2
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown GPT config fields {bad}; known: {sorted(known)}")
        return cls(**{**base, **d})

    @classmethod
    def preset(cls, name: str, image_size: int = 256, downsample_size: int = 16,
               model_type: str = "c2i") -> "GPTConfig":
        """A named size; model_type "t2i" gives the text-conditional layout with 120 caption tokens
        (the released t2i model is GPT-XL: `preset("GPT-XL", model_type="t2i")`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown LlamaGen preset {name!r}; choose from {list(PRESETS)}")
        extra = dict(model_type="t2i", cls_token_num=T2I_TOKENS) if model_type == "t2i" else \
            dict(model_type=model_type)
        return cls(**PRESETS[name], **extra, block_size=(image_size // downsample_size) ** 2)


# Caption positions of the official text-conditional models (FLAN-T5 max length, cls_token_num).
T2I_TOKENS = 120

# Class-conditional presets of the official GPT_models (256 px = block_size 256; 384 px = 576).
PRESETS = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),      # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),     # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),    # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),   # 1.4B
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),    # 3.1B
}


def as_gpt_config(config: Union[str, dict, GPTConfig, None], image_size: Optional[int] = None,
                  downsample_size: int = 16) -> GPTConfig:
    """A preset name, dict or GPTConfig (None = GPT-B); image_size, if given, sets block_size."""
    if config is None:
        config = "GPT-B"
    if isinstance(config, str):
        return GPTConfig.preset(config, image_size=image_size or 256, downsample_size=downsample_size)
    cfg = config if isinstance(config, GPTConfig) else GPTConfig.from_dict(config)
    if image_size is not None:
        cfg = replace(cfg, block_size=(image_size // downsample_size) ** 2)
    return cfg


as_config = as_gpt_config   # the family interface name (teachers/families.py)


# ---- 2-D rotary embedding ----------------------------------------------------------------------
def rope_table_2d(grid_size: int, head_dim: int, base: float = 10000, cls_token_num: int = 1,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """RoPE table [cls_token_num + g², head_dim/2, 2] fp32 of (cos, sin) pairs.

    Grid cell n (row n // g, col n % g) rotates its first head_dim/4 pairs by row·freq and the last
    head_dim/4 by col·freq, freq_j = 1 / base^(2j / (head_dim/2)). The class-token rows are ZERO (not
    the identity), so the class token's q and k vanish, as in the official table. Computed in float32
    in the official op order (float64 differs in the last bit on ~30% of entries).
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device=device)[: half // 2].float() / half))
    t = torch.arange(grid_size, device=device)
    angles = torch.outer(t, freqs)                                    # [g, hd/4]
    grid = torch.cat([angles[:, None, :].expand(-1, grid_size, -1),   # row angle
                      angles[None, :, :].expand(grid_size, -1, -1)],  # col angle
                     dim=-1)                                          # [g, g, hd/2]
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # [g², hd/2, 2]
    zeros = torch.zeros(cls_token_num, half, 2, device=device)
    return torch.cat([zeros, table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, hd]; rope: [S, hd/2, 2] or [B, S, hd/2, 2] fp32 -> [B, S, H, hd] in x.dtype.
    Rotates interleaved pairs (2i, 2i+1) in fp32."""
    B, S, H, hd = x.shape
    xs = x.float().reshape(B, S, H, hd // 2, 2)
    r = rope.reshape(-1, S, 1, hd // 2, 2)                          # [1 or B, S, 1, hd/2, 2]
    cos, sin = r[..., 0], r[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin,
                       xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


# ---- transformer -------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache:
    """Keys and values of every layer for a batch: k, v [n_layer, B, H_kv, max_len, hd].

    `length` positions are filled. `GPT.forward_hidden(..., cache=c)` writes the new positions
    [length, length + S) of each layer and advances `length` by S once all layers ran.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor] = None,
                kv: Optional[tuple] = None) -> torch.Tensor:
        """x: [B, S, dim]; rope: [(B,) S, hd/2, 2]; mask: bool, broadcastable to [B, H, S, S_k]
        (True = attend), None = causal; kv: (k_buf, v_buf, pos) with bufs [B, H_kv, max_len, hd]:
        the new keys/values go to [pos, pos+S) and attention runs over [0, pos+S)."""
        B, S, D = x.shape
        hd, H, Hkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.wqkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = apply_rope(q.view(B, S, H, hd), rope).transpose(1, 2)    # [B, H, S, hd]
        k = apply_rope(k.view(B, S, Hkv, hd), rope).transpose(1, 2)  # [B, Hkv, S, hd]
        v = v.view(B, S, Hkv, hd).transpose(1, 2)
        pos = 0
        if kv is not None:
            k_buf, v_buf, pos = kv
            k_buf[:, :, pos:pos + S] = k
            v_buf[:, :, pos:pos + S] = v
            k, v = k_buf[:, :, :pos + S], v_buf[:, :, :pos + S]      # [B, Hkv, pos+S, hd]
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        is_causal = False
        if mask is None and S > 1:
            if pos == 0:
                is_causal = True
            else:  # chunk appended after cached positions: query pos+i sees keys <= pos+i
                qi = torch.arange(pos, pos + S, device=x.device)[:, None]
                mask = torch.arange(pos + S, device=x.device)[None, :] <= qi
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.wo(out.transpose(1, 2).reshape(B, S, D))         # [B, S, dim]


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, rope, mask=None, kv=None):
        """x: [B, S, dim] -> [B, S, dim]"""
        h = x + self.attention(self.attention_norm(x), rope, mask, kv)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """`embedding_table` [num_classes (+1 null row when class_dropout_prob > 0), dim]."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: [B] int (num_classes = null class) -> [B, 1, dim]"""
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    """fc1 [hidden, in] -> tanh-GELU -> fc2 [out, hidden], no biases (the official `MLP`)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Text condition: `cap_proj` (CaptionMLP caption_dim -> dim -> dim) and the learned null caption
    `uncond_embedding` [token_num, caption_dim], a persistent buffer as in the official module (so it
    is cast with the model, and sits before `cap_proj` in the state dict)."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.empty(token_num, caption_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, L, caption_dim] (already masked / null-substituted) -> [B, L, dim]"""
        return self.cap_proj(features)


def condition_attention_mask(key_ok: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """The official t2i attention mask (generate.py `setup_caches` + emb_masks), rows for the query
    positions [start, start + length) over the keys [0, start + length).

    key_ok: [B, L] bool, False at padded caption positions (sequence positions 0..L-1; image tokens
    follow). Causal; a padded caption position is never attended to as a key, except by itself (the
    diagonal is always open, so no row is empty). Returns [B, 1, length, start + length] bool.
    """
    B, L = key_ok.shape
    n = start + length
    q = torch.arange(start, n, device=key_ok.device)[:, None]
    k = torch.arange(n, device=key_ok.device)[None, :]
    keys = torch.ones(B, n, dtype=torch.bool, device=key_ok.device)
    m = min(L, n)
    keys[:, :m] = key_ok[:, :m]
    mask = ((k <= q)[None] & keys[:, None, :]) | (k == q)[None]
    return mask[:, None]


def left_pad(features: torch.Tensor, mask: torch.Tensor) -> Caption:
    """Move each caption's valid tokens to the end, as sample_t2i.py does before sampling (its default;
    the official training data is left-padded the same way).

    features [B, L, D] and a T5 mask [B, L] with the valid tokens first -> Caption whose row b is
    features[b] rolled left by its valid count, and the mask flipped (exactly the official steps).
    """
    rows = [torch.roll(f, -int(m.sum()), dims=0) for f, m in zip(features, mask)]
    return Caption(torch.stack(rows), torch.flip(mask, dims=[-1]))


class RopeTable:
    """Mixin for modules with a `config` (GPTConfig) and a derived `freqs_cis` buffer
    [cls_token_num + block_size, hd/2, 2] fp32: rebuilt after a meta-device load, never cast."""

    def _rope(self, device) -> torch.Tensor:
        c = self.config
        return rope_table_2d(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num, device=device)

    def reset_buffers(self, device=None) -> None:
        """Rebuild the RoPE table (after a meta-device load, or a dtype cast)."""
        device = self.freqs_cis.device if device is None else torch.device(device)
        self.freqs_cis = self._rope(device)

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` would cast the RoPE table; it stays float32 like the official attribute
        super()._apply(fn, recurse)
        if self.freqs_cis.dtype != torch.float32:
            self.reset_buffers(self.freqs_cis.device)
        return self


class GPT(RopeTable, nn.Module):
    """The LlamaGen transformer (official key names): class-conditional (`cls_embedding` a
    LabelEmbedder) or text-conditional (`model_type="t2i"`: a CaptionEmbedder)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        if cfg.model_type == "t2i":
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        else:
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # [cls_token_num + block_size, hd/2, 2] fp32, derived (not in official state dicts)
        self.register_buffer("freqs_cis", self._rope(None), persistent=False)
        if not self.freqs_cis.is_meta:
            self.initialize_weights()

    def initialize_weights(self, std: Optional[float] = None) -> None:
        """Random init for weight-less use (tests, benchmarks): N(0, initializer_range) for Linear
        and Embedding as the official init, but the output head is NOT zeroed (the official zero
        init would make a random teacher's distribution uniform). The null caption is N(0, 1/caption_dim)
        as the official `randn / sqrt(in_channels)`."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, CaptionEmbedder):
                nn.init.normal_(m.uncond_embedding, std=m.uncond_embedding.shape[1] ** -0.5)

    # -- pieces the student reuses --------------------------------------------------------------
    def class_embed(self, labels: torch.Tensor) -> torch.Tensor:
        """Condition slot inputs [B, cls_token_num, dim] from labels [B] (num_classes = null) or, for
        t2i, caption features [B, cls_token_num, caption_dim] (already masked / null-substituted)."""
        if self.config.model_type == "t2i":
            labels = labels.to(self.cls_embedding.uncond_embedding.dtype)
        return self.cls_embedding(labels)[:, : self.config.cls_token_num]

    def null_condition(self, batch_size: int) -> torch.Tensor:
        """The CFG null condition for a batch: class ids [B] = num_classes, or (t2i) the null caption
        [B, cls_token_num, caption_dim]."""
        if self.config.model_type == "t2i":
            u = self.cls_embedding.uncond_embedding
            return u[None].expand(batch_size, -1, -1)
        return torch.full((batch_size,), self.config.num_classes, dtype=torch.long,
                          device=self.tok_embeddings.weight.device)

    def embed(self, labels: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """labels [B] (or t2i caption features [B, L, caption_dim]), tokens [B, n] -> inputs
        [B, cls_token_num + n, dim]"""
        h = self.class_embed(labels)
        if tokens is not None and tokens.shape[1] > 0:
            h = torch.cat([h, self.tok_embeddings(tokens)], dim=1)
        return h

    def forward_hidden(self, h: torch.Tensor, rope: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None,
                       cache: Optional[KVCache] = None) -> torch.Tensor:
        """Run the blocks on embedded inputs h [B, S, dim] -> hidden [B, S, dim] (before `norm`).

        rope: [(B,) S, hd/2, 2] fp32; default: table rows [start, start + S) with start =
        `cache.length` (0 without cache), i.e. slot 0 = class token, slot 1 + i = grid cell i.
        mask: bool [S, S_k] (or broadcastable to [B, H, S, S_k]), True = attend; None = causal.
        cache: KV cache to append to (advanced by S).
        """
        S = h.shape[1]
        start = 0 if cache is None else cache.length
        if rope is None:
            if start + S > self.freqs_cis.shape[0]:
                raise ValueError(f"positions up to {start + S} exceed the RoPE table "
                                 f"({self.freqs_cis.shape[0]} = cls + block_size)")
            rope = self.freqs_cis[start:start + S]
        if cache is not None and start + S > cache.max_len:
            raise ValueError(f"KV cache of length {cache.max_len} cannot take {start + S} positions")
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], start)
            h = layer(h, rope, mask, kv)
        if cache is not None:
            cache.length = start + S
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [..., dim] -> logits [..., vocab_size] fp32"""
        return self.output(self.norm(h)).float()

    def forward(self, labels: torch.Tensor, tokens: torch.Tensor,
                key_ok: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher forcing: labels [B] (t2i: caption features [B, L, caption_dim]), tokens [B, n]
        (n <= block_size) -> logits [B, n, V] fp32, row i predicting token i (the last condition slot
        predicts token 0). key_ok: t2i caption mask [B, L] bool (None = no padding)."""
        c = self.config.cls_token_num
        h = self.embed(labels, tokens[:, :-1])                         # [B, c + n - 1, dim]
        mask = None if key_ok is None else condition_attention_mask(key_ok, 0, h.shape[1])
        return self.head(self.forward_hidden(h, mask=mask)[:, c - 1:])

    def new_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        max_len = self.freqs_cis.shape[0] if max_len is None else max_len
        w = self.tok_embeddings.weight
        return KVCache(self.config, batch_size, max_len, w.dtype, w.device)


# ---- sampling arithmetic (generate.py) --------------------------------------------------------
def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF-style filtering of logits [N, V] (a filtered copy; -inf outside the kept set).

    top_k > 0: clamp to [1, V]; drop logits below the k-th largest (ties kept).
    0 < top_p < 1: sort descending, drop where the cumulative softmax > top_p, shifted right by one
    so the first token above the threshold stays, and the top token always stays.
    """
    logits = logits.clone()
    if top_k > 0:
        k = min(max(top_k, 1), logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits[logits < kth] = -float("inf")
    if 0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(-1, sorted_idx, remove)] = -float("inf")
    return logits


def probs_from_logits(cond: torch.Tensor, uncond: Optional[torch.Tensor],
                      sampling: SamplingConfig) -> torch.Tensor:
    """cond/uncond logits [N, V] fp32 -> probabilities [N, V] fp32, as generate.py:
    CFG (when uncond is given) -> / max(T, 1e-5) -> top-k/top-p -> softmax."""
    logits = cond if uncond is None else uncond + (cond - uncond) * sampling.cfg_scale
    logits = logits / max(sampling.temperature, 1e-5)
    if sampling.top_k > 0 or 0 < sampling.top_p < 1.0:
        logits = top_k_top_p_filter(logits, sampling.top_k, sampling.top_p)
    return F.softmax(logits, dim=-1)


# ---- the teacher ---------------------------------------------------------------------------
@dataclass
class LlamaGenState(DecodeState):
    """cache: KV cache of the (CFG-doubled: [cond; null]) batch; last_logits: [B or 2B, V] fp32
    raw logits for the next token; key_ok: t2i caption mask of that batch [B or 2B, L] bool."""

    cache: Optional[KVCache] = None
    last_logits: Optional[torch.Tensor] = None
    cfg: bool = False
    key_ok: Optional[torch.Tensor] = None


class LlamaGenTeacher(Teacher):
    family = "llamagen"
    # DD's teacher sampling for LlamaGen (eval_combine_sample.py): cfg 2.0 at every token,
    # temperature 1, top-k 8000, top-p 1.
    default_sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=8000, top_p=1.0)
    # A t2i teacher's default: sample_t2i.py's (cfg 7.5, top-k 1000, T 1, top-p 1). The DD paper's t2i
    # sampling settings are not in this project's sources.
    t2i_sampling = SamplingConfig(cfg_scale=7.5, temperature=1.0, top_k=1000, top_p=1.0)

    def __init__(self, gpt: GPT, vq: VQModel, ids: Optional[dict] = None):
        super().__init__()
        if gpt.config.vocab_size != vq.config.codebook_size:
            raise ValueError(f"GPT vocab_size {gpt.config.vocab_size} != VQ codebook_size "
                             f"{vq.config.codebook_size}")
        self.gpt = gpt
        self.vq = vq
        self.ids = dict(ids or {})
        cfg = gpt.config
        self.step_sizes = (1,) * cfg.block_size
        self.text_conditional = cfg.model_type == "t2i"
        self.num_classes = 0 if self.text_conditional else cfg.num_classes
        self.image_size = cfg.grid_size * vq.config.downsample
        if self.text_conditional:
            self.default_sampling = self.t2i_sampling

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.quantize.codebook().detach().float()

    def describe(self) -> dict:
        return {"family": self.family, "config": self.gpt.config.to_dict(),
                "tokenizer_config": self.vq.config.to_dict(),
                "dtype": str(self.gpt.tok_embeddings.weight.dtype).replace("torch.", ""),
                **self.ids}

    # -- stepping ----------------------------------------------------------------------------
    def condition(self, labels, cfg: bool = False):
        """Check a condition and put it in the model's input form.

        c2i: labels [B] -> (ids [B'], None), B' = 2B with the null class appended when cfg.
        t2i: Caption [B, L, D] -> (features [B', L, D] in the model dtype, key_ok [B', L] bool): the
        features times the mask (sample_t2i.py), and with cfg the null caption appended under the same
        mask (generate.py). ValueError (one line) on a wrong kind, dimension or length.
        """
        cfg_ = self.gpt.config
        if not self.text_conditional:
            if isinstance(labels, Caption):
                raise ValueError("this LlamaGen teacher is class-conditional (model_type='c2i'): pass "
                                 "class labels [B], not a Caption")
            if cfg and self.gpt.cls_embedding.embedding_table.num_embeddings <= self.num_classes:
                raise ValueError("CFG needs the null-class row (a model built with class_dropout_prob > 0)")
            ids = labels.to(self.device).long()
            return (torch.cat([ids, self.gpt.null_condition(ids.shape[0])]) if cfg else ids), None
        if not isinstance(labels, Caption):
            raise ValueError("this LlamaGen teacher is text-conditional (model_type='t2i'): pass a "
                             "teachers.base.Caption(features [B, L, D], mask [B, L]), not class labels")
        B, L, D = labels.features.shape
        if D != cfg_.caption_dim:
            raise ValueError(f"caption features have dimension {D}, the model expects "
                             f"caption_dim={cfg_.caption_dim}")
        if L != cfg_.cls_token_num:
            raise ValueError(f"captions have {L} token positions, the model expects "
                             f"cls_token_num={cfg_.cls_token_num} (pad or truncate the features first)")
        dtype = self.gpt.cls_embedding.uncond_embedding.dtype
        key_ok = labels.mask.to(self.device)
        feats = labels.features.to(self.device, dtype) * key_ok[..., None].to(dtype)
        if cfg:
            feats = torch.cat([feats, self.gpt.null_condition(B)])
            key_ok = torch.cat([key_ok, key_ok])
        return feats, key_ok

    @torch.no_grad()
    def start(self, labels, sampling: SamplingConfig,
              prefix: Optional[torch.Tensor] = None) -> LlamaGenState:
        cfg = sampling.cfg_scale > 1.0
        cond, key_ok = self.condition(labels, cfg)                      # [B', ...] (B' = 2B with CFG)
        m = 0 if prefix is None else prefix.shape[1]
        if m > self.num_tokens:
            raise ValueError(f"prefix of {m} tokens is longer than {self.num_tokens}")
        labels = labels.to(self.device) if isinstance(labels, Caption) else labels.to(self.device).long()
        state = LlamaGenState(labels=labels, sampling=sampling, cfg=cfg, key_ok=key_ok)
        state.cache = self.gpt.new_cache(cond.shape[0])
        toks = None
        if m:
            prefix = prefix.to(self.device).long()
            state.tokens = list(prefix.split(1, dim=1))
            toks = torch.cat([prefix, prefix]) if cfg else prefix
        h = self.gpt.embed(cond, toks)
        mask = None if key_ok is None else condition_attention_mask(key_ok, 0, h.shape[1])
        h = self.gpt.forward_hidden(h, mask=mask, cache=state.cache)
        state.last_logits = self.gpt.head(h[:, -1])                      # [B', V]
        state.step = m
        return state

    @torch.no_grad()
    def step_probs(self, state: LlamaGenState) -> torch.Tensor:
        if state.step >= self.num_steps:
            raise ValueError("generation is finished")
        logits = state.last_logits
        B = state.batch_size
        cond, uncond = (logits[:B], logits[B:]) if state.cfg else (logits, None)
        return probs_from_logits(cond, uncond, state.sampling)[:, None]  # [B, 1, V]

    @torch.no_grad()
    def feed(self, state: LlamaGenState, tokens: torch.Tensor) -> None:
        tokens = tokens.to(self.device).long().reshape(state.batch_size, 1)   # [B, 1]
        state.tokens.append(tokens)
        state.step += 1
        if state.step >= self.num_steps:      # the last token is never fed to the model
            state.last_logits = None
            return
        toks = torch.cat([tokens, tokens]) if state.cfg else tokens
        mask = None if state.key_ok is None else \
            condition_attention_mask(state.key_ok, state.cache.length, 1)
        h = self.gpt.forward_hidden(self.gpt.tok_embeddings(toks), mask=mask, cache=state.cache)
        state.last_logits = self.gpt.head(h[:, -1])

    # -- full-sequence views -----------------------------------------------------------------
    @torch.no_grad()
    def logits(self, labels, tokens: torch.Tensor) -> torch.Tensor:
        cond, key_ok = self.condition(labels)
        return self.gpt(cond, tokens.to(self.device).long(), key_ok)

    @torch.no_grad()
    def sequence_probs(self, labels: torch.Tensor, tokens: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """`Teacher.sequence_probs` in one teacher-forced forward (two with CFG) instead of n cached steps."""
        tokens = tokens.to(self.device).long()
        cfg = sampling.cfg_scale > 1.0
        cond, key_ok = self.condition(labels, cfg)
        logits = self.gpt(cond, torch.cat([tokens, tokens]) if cfg else tokens, key_ok).float()  # [B', n, V]
        B, n = tokens.shape
        c, u = (logits[:B], logits[B:]) if cfg else (logits, None)
        flat = probs_from_logits(c.reshape(B * n, -1), None if u is None else u.reshape(B * n, -1), sampling)
        return flat.view(B, n, -1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        if tokens.is_floating_point():                                   # [B, n, C] embeddings
            x = self.vq.decode_embeddings(tokens.to(self.vq.post_quant_conv.weight.dtype))
        else:                                                            # [B, n] indices
            x = self.vq.decode_code(tokens)
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, self.vq.post_quant_conv.weight.dtype) * 2 - 1
        return self.vq.encode(x)

    def decode_differentiable(self, emb: torch.Tensor) -> torch.Tensor:
        x = self.vq.decode_embeddings(emb.to(self.device, self.vq.post_quant_conv.weight.dtype))
        return x.float().clamp(-1, 1)


# ---- loading -------------------------------------------------------------------------------
GPT_IGNORE = ("freqs_cis", "*k_cache", "*v_cache", "*kv_cache*")
VQ_IGNORE = ("quantize.codebook_used",)


# The key that tells the two condition layouts apart.
CONDITION_KEYS = {"c2i": "cls_embedding.embedding_table.weight", "t2i": "cls_embedding.cap_proj.fc1.weight"}


def check_model_type(state: dict, cfg: GPTConfig, where: str) -> None:
    """Raise a one-line CheckpointMismatchError when `state` is the other condition layout
    (class-conditional vs text-conditional) than `cfg.model_type`, naming the telling key."""
    want = cfg.model_type
    other = "t2i" if want == "c2i" else "c2i"
    if CONDITION_KEYS[want] not in state and CONDITION_KEYS[other] in state:
        kind = {"c2i": "class-conditional", "t2i": "text-to-image"}
        raise CheckpointMismatchError(
            f"{where}: a {kind[other]} LlamaGen checkpoint (it has {CONDITION_KEYS[other]}, not "
            f"{CONDITION_KEYS[want]}) given to a model_type={want!r} config; use model_type={other!r}")


def load(config: Union[str, dict, GPTConfig, None] = "GPT-B", checkpoint=None, *,
         tokenizer_config: Union[str, dict, VQConfig, None] = None, tokenizer_checkpoint=None,
         device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
         ema: bool = False, tokenizer_ema: bool = False, weights_only: bool = True,
         image_size: Optional[int] = None) -> LlamaGenTeacher:
    """Build a LlamaGen teacher; checkpoints are paths or in-memory state dicts (None = random).

    config: preset ("GPT-L") or dict of official ModelArgs names (optionally with "preset" and
    "image_size"); image_size: 256 (block_size 256) or 384 (576) for a preset. Text-to-image:
    `{"preset": "GPT-XL", "model_type": "t2i"}` with `t2i_XL_stage1_256.pt` and `vq_ds16_t2i.pt`
    (`image_size=512` for `t2i_XL_stage2_512.pt`).
    The GPT is read from "model" / "module" / "state_dict" (or "ema" with ema=True), the VQ from
    "model" (or "ema" with tokenizer_ema=True); both strictly, ignoring only stale `freqs_cis`,
    KV-cache buffers and the VQ's `quantize.codebook_used`. The GPT is kept in `dtype`; the VQ in fp32.
    """
    vcfg = as_vq_config(tokenizer_config)
    gcfg = as_gpt_config(config, image_size, vcfg.downsample)
    nesting = ("ema",) if ema else ("model", "module", "state_dict")
    is_path = isinstance(checkpoint, (str, os.PathLike))
    source = checkpoint
    if checkpoint is not None:   # read once, to name a c2i/t2i mix-up before the key-by-key check
        source = read_state_dict(checkpoint, nesting=nesting, weights_only=weights_only)
        check_model_type(source, gcfg, os.fspath(checkpoint) if is_path else "checkpoint")
    try:
        gpt = load_strict(lambda: GPT(gcfg), source, ignore=GPT_IGNORE, nesting=nesting,
                          device=device, dtype=dtype, weights_only=weights_only,
                          what=f"LlamaGen GPT {gcfg}")
    except CheckpointMismatchError as e:
        if is_path:
            raise CheckpointMismatchError(f"{os.fspath(checkpoint)}: {e}") from None
        raise
    vq = load_strict(lambda: VQModel(vcfg), tokenizer_checkpoint, ignore=VQ_IGNORE,
                     nesting=("ema",) if tokenizer_ema else ("model",),
                     device=device, dtype=torch.float32, weights_only=weights_only,
                     what=f"LlamaGen VQ {vcfg}")
    ids = {"checkpoint": source_id(checkpoint), "ema": ema,
           "tokenizer_checkpoint": source_id(tokenizer_checkpoint), "tokenizer_ema": tokenizer_ema}
    teacher = LlamaGenTeacher(gpt, vq, ids)
    teacher.eval().requires_grad_(False)
    return teacher
