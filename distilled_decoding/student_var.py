"""VAR-DD: the DD student of a VAR teacher (the released `DD_Model`, VAR/models/dd.py and the
`n_d_emb` argument of VAR/models/basic_var.py of microsoft/distilled_decoding, re-implemented).

Sequence: the teacher's scales get an extra leading 1×1 level, patch_nums' = (1,) + patch_nums, so
L' = 1 + L slots (681 at 256 px): slot 0 = start token (class embedding + pos_start), slot 1 + i =
token i of the teacher's flat order (scale by scale, row-major), i.e. teacher scale s sits at level
s + 1. Token inputs are raw codebook rows (data) or N(0, I) noise, through the teacher's `word_embed`;
every slot adds `lvl_embed[level] + pos_1LC[slot]`.

Mask (`attn_bias_for_masking`): a query sees a key iff level(q) > level(k) or q == k: strictly earlier
scales plus itself, not its same-scale siblings (the teacher's is level(q) >= level(k)). No label
dropout. Noise/data type: `n_d_embed` (Embedding(2, C), 1 = data: the start slot and the data tokens)
is added at the input; with `layerwise_n_d_embed` (the released default) Linear_i(n_d) is added in
block i between the attention residual and the FFN, and Linear_depth(n_d) before both heads (without
it, the raw n_d embedding is added at each of those places, as the release does).
Heads, both modulated by the class embedding and with the start slot dropped: logits =
head(head_nm(h, cond)) (the teacher's), emb = final_layer_conti(h, cond).

Keys are the released ones: the teacher's (with `pos_1LC` [1, L', C], `lvl_embed` [S + 1, C]) plus
`n_d_embed.weight`, `layerwise_n_d_embed.{0..depth}.{weight, bias}`, `final_layer_conti.*`. The
buffers `lvl_1L`, `attn_bias_for_masking` and `*.zero_k_bias` are derived (non-persistent here,
ignored in released files).

Initialisation from the teacher: word_embed, class_emb, pos_start, blocks, shared_ada_lin, head_nm,
head copied; lvl_embed and pos_1LC rows 0 and 2.. from the teacher's rows 0 and 1.. (so every token of
teacher scale s >= 1 gets exactly the level/position embedding of the teacher slot that predicts it),
row 1 (the new first token) trunc_normal(0.02). The release re-initialises `class_emb.weight[1]` where it
meant `lvl_embed.weight[1]`; here class 1 keeps the teacher's embedding. n_d_embed trunc_normal(0.02);
the layerwise Linears and the embedding head's Linear as VAR's `init_weights` (trunc_normal,
std √(1/3C), zero bias); scale_shift_table randn/√C.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from teachers.var import (VAR_IGNORE, AdaLNBeforeHead, AdaLNSelfAttn, SelfAttention, SharedAdaLin, VARConfig,
                          block_causal_bias, init_linear_embedding_, level_ids)

from .student_history import (HistoryAttention, HistoryCache, HistoryForward, HistorySpec, history_options,
                              load_teacher_part)
from .student_layers import FinalLayer


def dd_attn_bias(levels: torch.Tensor) -> torch.Tensor:
    """levels [L] -> additive mask [1, 1, L, L]: 0 where level(q) > level(k) or q == k, else -inf."""
    d = levels.view(-1, 1)
    see = (d > d.t()) | torch.eye(len(levels), dtype=torch.bool, device=levels.device)
    return torch.where(see, 0.0, -torch.inf).reshape(1, 1, len(levels), len(levels))


class GatedSelfAttention(SelfAttention):
    """The attention of a DD-H lower block that reads history (student_history.add_history_gate makes
    a teacher `SelfAttention` one): called with a `HistoryAttention` as `cache`, its q, k, v (as the
    teacher's) go through the two softmaxes and the gate `history_gate` [H] there (`attn_bias` unused:
    the HistoryAttention holds the masks); otherwise it is the teacher's attention."""

    history_gate: nn.Parameter

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        """x: [B, S, C] (S = K·L teacher-forced, L a cached step) -> [B, S, C]."""
        if not isinstance(cache, HistoryAttention):
            return super().forward(x, attn_bias, cache)
        B, S, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, S, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)            # each [B, H, S, hd]
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        out = cache(q, k, v, self.history_gate, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, S, C))


class VARDD(HistoryForward, nn.Module):
    """The VAR DD student backbone (released key layout)."""

    family = "var"
    OFFICIAL_NESTING = ("trainer.ema_parameters",)     # var-d{16,20,24}.pth
    OFFICIAL_NESTING_RAW = ("trainer.var_wo_ddp", "model", "module", "state_dict")
    OFFICIAL_IGNORE = VAR_IGNORE

    def __init__(self, cfg: VARConfig, layerwise_n_d_embed: bool = True, history: Optional[str] = None,
                 lower_layers: Optional[int] = None, history_steps: Optional[int] = None):
        super().__init__()
        self.history_opts = history_options(cfg.depth, history, lower_layers, history_steps)
        if cfg.patch_nums[0] != 1:
            raise ValueError(f"the VAR DD student needs a 1×1 first scale, got patch_nums {cfg.patch_nums}")
        self.cfg = cfg                                                   # the teacher's config
        self.patch_nums = (1,) + tuple(cfg.patch_nums)                  # with the extra leading level
        C = self.C = cfg.embed_dim
        self.L = sum(pn * pn for pn in self.patch_nums)                  # 1 + teacher L
        self.Cvae, self.V = cfg.Cvae, cfg.V
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.V)
        self.n_d_embed = nn.Embedding(2, C)
        self.use_layerwise = bool(layerwise_n_d_embed)
        if self.use_layerwise:
            self.layerwise_n_d_embed = nn.ModuleList([nn.Linear(C, C) for _ in range(cfg.depth + 1)])
        self.final_layer_conti = FinalLayer(C, cfg.Cvae)
        self.register_buffer("lvl_1L", torch.empty(1, self.L, dtype=torch.long), persistent=False)
        self.register_buffer("attn_bias_for_masking", torch.empty(1, 1, self.L, self.L), persistent=False)
        self.history = None
        if self.history_opts:       # DD-H (student_history.py): step embedding and history gates, zero at init
            self._add_history(self.L, C, [b.attn for b in self.blocks], GatedSelfAttention, cfg.num_heads)
        self.reset_buffers()
        if not self.pos_1LC.is_meta:
            self.init_weights()

    # -- the StudentBackbone interface (student_backbones.py) ----------------------------------
    @staticmethod
    def paper_defaults(model: dict) -> Tuple[int, tuple, int]:
        """(paper AR steps, timesteps, split): d16 {1, 6} / 5; d20 and d24 {1, 5} / 4."""
        cfg = VARConfig.from_dict(model)
        if cfg.depth >= 20 and cfg.embed_dim >= 1280:
            return 10, (1, 5), 4
        return 10, (1, 6), 5

    @staticmethod
    def config_from_teacher(teacher) -> dict:
        d = teacher.var.cfg.to_dict()
        d["patch_nums"] = list(d["patch_nums"])
        return d

    @staticmethod
    def default_options(layerwise_n_d_embed: bool = True, history: Optional[str] = None,
                        lower_layers: Optional[int] = None, history_steps: Optional[int] = None) -> dict:
        """layerwise_n_d_embed, plus DD-H's history / lower_layers / history_steps when given."""
        d = {"layerwise_n_d_embed": bool(layerwise_n_d_embed)}
        d.update({k: v for k, v in (("history", history), ("lower_layers", lower_layers),
                                    ("history_steps", history_steps)) if v is not None})
        return d

    def options(self) -> dict:
        return {"layerwise_n_d_embed": self.use_layerwise, **self.history_opts}

    @classmethod
    def build(cls, model: dict, codebook_dim: int, **opts) -> "VARDD":
        cfg = VARConfig.from_dict(model)
        if cfg.Cvae != codebook_dim:
            raise ValueError(f"VAR Cvae {cfg.Cvae} != codebook dim {codebook_dim}")
        return cls(cfg, **cls.default_options(**opts))

    @classmethod
    @torch.no_grad()
    def from_teacher(cls, teacher, **opts) -> "VARDD":
        """Initialised from a VARTeacher (see the module docstring), on the teacher's device."""
        var = teacher.var
        with var.pos_1LC.device:
            net = cls(var.cfg, **cls.default_options(**opts))
        for name in ("word_embed", "class_emb", "shared_ada_lin", "blocks", "head_nm", "head"):
            load_teacher_part(getattr(net, name), getattr(var, name))
        net.pos_start.copy_(var.pos_start)
        for mine, theirs in ((net.lvl_embed.weight[None], var.lvl_embed.weight[None]), (net.pos_1LC, var.pos_1LC)):
            mine[:, 0] = theirs[:, 0]                  # start token
            mine[:, 2:] = theirs[:, 1:]                # teacher slot i >= 1 -> student slot i + 1
            nn.init.trunc_normal_(mine[:, 1], mean=0.0, std=0.02)   # the new first token
        return net.float()

    @property
    def step_sizes(self) -> tuple:
        return tuple(pn * pn for pn in self.cfg.patch_nums)

    # -- weights and buffers --------------------------------------------------------------------
    def reset_buffers(self, device=None) -> None:
        device = device or self.pos_1LC.device
        lv = level_ids(self.patch_nums).to(device)
        self.lvl_1L = lv.view(1, -1)
        self.attn_bias_for_masking = dd_attn_bias(lv)
        if self.history_opts:
            o = self.history_opts
            with torch.device("cpu"):      # masks are CPU constants, also when built on the meta device
                self.history = HistorySpec(o["history"], o["lower_layers"], o["history_steps"], self.L,
                                           dd_attn_bias(level_ids(self.patch_nums))[0, 0] == 0)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init as the release (`VAR.init_weights` then `init_with_teacher`'s new tensors):
        trunc_normal(√(1/3C)) Linear/Embedding weights and positions, zero biases, n_d_embed
        trunc_normal(0.02); the teacher's tensors are overwritten by `from_teacher`."""
        std = (1 / self.C / 3) ** 0.5
        init_linear_embedding_(self, std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        for b in self.blocks:
            if b.attn.attn_l2_norm:
                b.attn.scale_mul_1H11.fill_(torch.tensor(4.0).log().item())
            b.attn.q_bias.zero_()
            b.attn.v_bias.zero_()
        nn.init.trunc_normal_(self.n_d_embed.weight, std=0.02)
        nn.init.normal_(self.final_layer_conti.scale_shift_table, std=self.C ** -0.5)

    # -- forward --------------------------------------------------------------------------------
    def _n_d(self, i: int) -> torch.Tensor:
        """[2, C] type vectors added at place i (blocks 0..depth-1, depth = before the heads)."""
        nd = self.n_d_embed.weight
        return self.layerwise_n_d_embed[i](nd) if self.use_layerwise else nd

    def _embed(self, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, n, Cvae]; labels: [B]; is_data: [B, n] bool -> (layer input [B, 1 + n, C],
        cond [B, C], types [B, 1 + n] int64: 1 = data)."""
        B, n, _ = x.shape
        if n != self.L - 1:
            raise ValueError(f"the VAR DD student takes all {self.L - 1} tokens, got {n}")
        types = torch.cat([torch.ones_like(is_data[:, :1]), is_data], dim=1).long()   # [B, 1 + n]
        with torch.autocast(device_type=x.device.type, enabled=False):   # embeddings in fp32, as released
            cond = self.class_emb(labels)                                           # [B, C]
            sos = cond[:, None] + self.pos_start                                    # [B, 1, C]
            h = torch.cat([sos, self.word_embed(x.float())], dim=1)                 # [B, 1 + n, C]
            h = h + self.lvl_embed(self.lvl_1L) + self.pos_1LC
            h = h + self.n_d_embed.weight[types]
        return h, cond, types

    def _out(self, h: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return h.float() + self._n_d(len(self.blocks)).float()[types]

    def hidden(self, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor, block_causal: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, n, Cvae] (n = teacher L); labels: [B]; is_data: [B, n] bool -> (h [B, 1 + n, C]
        after the blocks and the last type embedding, i.e. what both heads read, fp32; cond [B, C]).
        block_causal: the teacher's mask (a slot sees its own and earlier levels) instead of DD's."""
        h, cond, types = self._embed(x, labels, is_data)
        bias = block_causal_bias(self.lvl_1L[0]) if block_causal else self.attn_bias_for_masking
        bc = self.shared_ada_lin(cond)
        for i, b in enumerate(self.blocks):
            h = b(h, bc, attn_bias=bias, add_after_attn=self._n_d(i)[types])
        return self._out(h, types), cond

    def hidden_blocks(self, xs: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """DD-H teacher-forced: xs [B, K, n, Cvae]; labels [B]; is_data [B, K, n] -> (h [B, K, 1 + n, C],
        cond [B, C]). The lower N blocks run the K blocks as one sequence under `history.mask` through
        their gates (student_history.HistoryAttention)."""
        B, K, n, Cv = xs.shape
        spec = self._spec(K)
        h, cond, types = self._embed(xs.reshape(B * K, n, Cv), labels.repeat_interleave(K),
                                     is_data.reshape(B * K, n))
        L, C = h.shape[1:]
        h = h.view(B, K, L, C) + self.step_embed[None, :K]
        cond = cond[::K]                                                  # [B, C]: one label per trajectory
        bc = self.shared_ada_lin(cond)
        if spec.gated:
            h, t_all = h.reshape(B, K * L, C), types.view(B, K * L)
            for i, b in enumerate(self.blocks[:spec.gated]):
                h = b(h, bc, cache=self._attention(i, L), add_after_attn=self._n_d(i)[t_all])
        h = h.reshape(B * K, L, C)
        bc_k = self.shared_ada_lin(cond.repeat_interleave(K, 0))
        for i in range(spec.gated, len(self.blocks)):
            h = self.blocks[i](h, bc_k, attn_bias=self.attn_bias_for_masking, add_after_attn=self._n_d(i)[types])
        return self._out(h, types).view(B, K, L, C), cond

    def hidden_step(self, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor, cache: HistoryCache
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """DD-H cached sampling step `cache.step`: x [B, n, Cvae] -> (h [B, 1 + n, C], cond [B, C]); the
        lower blocks attend to the cached earlier blocks and cache this one's keys/values."""
        self._spec(1)
        k = cache.check()
        h, cond, types = self._embed(x, labels, is_data)
        h = h + self.step_embed[k]
        bc = self.shared_ada_lin(cond)
        for i, b in enumerate(self.blocks):
            att = self._attention(i, self.L, cache)
            h = b(h, bc, attn_bias=None if att is not None else self.attn_bias_for_masking, cache=att,
                  add_after_attn=self._n_d(i)[types])
        cache.advance()
        return self._out(h, types), cond

    def _heads(self, h: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """h [B, (K,) 1 + n, C]; cond [B, C] -> (logits [B, (K,) n, V], emb [B, (K,) n, Cvae])."""
        shape = h.shape
        flat = h.reshape(shape[0], -1, shape[-1])
        logits = self.head(self.head_nm(flat, cond)).float().view(*shape[:-1], -1)[..., 1:, :]
        emb = self.final_layer_conti(flat, cond).float().view(*shape[:-1], -1)[..., 1:, :]
        return logits, emb
