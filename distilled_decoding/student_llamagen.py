"""LlamaGen-DD: the DD student of a LlamaGen teacher (the released `DDTransformer`, LlamaGen/
autoregressive/models/dd.py of microsoft/distilled_decoding, re-implemented).

Sequence: slot 0 = class embedding, slot 1 + i = token i (B × (1 + n) × dim), plain causal attention,
all 1 + n RoPE rows of the teacher's table (the class slot's row is zero, so its q and k vanish; token i
gets grid cell i). Inputs are continuous C-vectors (data: l2-normalised codebook rows; noise: N(0, I)),
projected by `tok_embeddings = Linear(C, dim)` with bias. `n_d_embed` (Embedding(2, dim)) is added once
at the input: 1 = data (the class slot and the data tokens), 0 = noise. The class slot's output is
dropped; the output at token i's own slot predicts clean token i (no next-token shift):
logits = output(norm(h)) (the teacher's head), emb = final_layer_conti(h, class embedding).

State-dict keys are the released ones (`cls_embedding.embedding_table.weight`, `tok_embeddings.{weight,
bias}`, `layers.*`, `norm.weight`, `output.weight`, `final_layer_conti.{linear.*, scale_shift_table}`,
`n_d_embed.weight`); the RoPE table is a derived, non-persistent buffer.

Text-to-image (`model_type="t2i"`; the authors released no t2i student, so this keeps the layout's
rules): the condition is a `teachers.base.Caption` wherever `labels` stands. Its T = cls_token_num
caption slots come first (features times the mask, through the teacher's CaptionEmbedder `cap_proj`;
the null caption `uncond_embedding` is kept but unused: no CFG, the student learns the guided
teacher's flow map), with the teacher's zero RoPE rows; attention is `condition_attention_mask` (causal,
padded caption slots blocked as keys) over caption + tokens; the caption slots' outputs are dropped.
`final_layer_conti` is conditioned on the mean of the caption embeddings over the real slots. DD-H is
class-conditional only. With zero RoPE rows and the padding masked, a left- and a right-padded caption
give the same token outputs.

Initialisation from the teacher: cls_embedding, layers, norm, output copied. `tok_embeddings` is the
least-squares fit of the teacher's token table on the codebook, (W, b) = argmin ‖codebook·Wᵀ + b − E‖
(the authors start it at random); so a data row c_j enters the network as (nearly) the teacher's
embedding E_j, exactly when E lies in the span of [codebook, 1]. n_d_embed and the embedding head
start as the authors' (N(0, 0.02) weights, zero bias, scale_shift_table randn/√dim).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from teachers.base import Caption
from teachers.llamagen import (GPT_IGNORE, Attention, CaptionEmbedder, GPTConfig, LabelEmbedder, RMSNorm, RopeTable,
                               TransformerBlock, apply_rope, condition_attention_mask)

from .student_history import (HistoryAttention, HistoryCache, HistoryForward, HistorySpec, history_options,
                              load_teacher_part)
from .student_layers import FinalLayer


@torch.no_grad()
def fit_token_projection(codebook: torch.Tensor, table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Least squares (float64, CPU): codebook [V, C], table [V, D] -> (W [D, C], b [D]) minimising
    ‖codebook·Wᵀ + b − table‖_F."""
    A = torch.cat([codebook.double().cpu(), torch.ones(codebook.shape[0], 1, dtype=torch.float64)], 1)  # [V, C+1]
    X = torch.linalg.lstsq(A, table.double().cpu(), driver="gelsd").solution                         # [C+1, D]
    return X[:-1].t().contiguous(), X[-1].contiguous()


class GatedAttention(Attention):
    """The attention of a DD-H lower layer that reads history (student_history.add_history_gate makes
    a teacher `Attention` one): called with a `HistoryAttention` as `kv`, its q, k, v (as the
    teacher's) go through the two softmaxes and the gate `history_gate` [H] there; otherwise it is
    the teacher's attention."""

    history_gate: nn.Parameter

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor] = None,
                kv=None) -> torch.Tensor:
        """x: [B, S, dim] (S = K·L teacher-forced, L a cached step); rope: [S, hd/2, 2] -> [B, S, dim]."""
        if not isinstance(kv, HistoryAttention):
            return super().forward(x, rope, mask, kv)
        B, S, D = x.shape
        hd, H, Hkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.wqkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = apply_rope(q.view(B, S, H, hd), rope).transpose(1, 2)        # [B, H, S, hd]
        k = apply_rope(k.view(B, S, Hkv, hd), rope).transpose(1, 2)      # [B, Hkv, S, hd]
        out = kv(q, k, v.view(B, S, Hkv, hd).transpose(1, 2), self.history_gate)
        return self.wo(out.transpose(1, 2).reshape(B, S, D))


class LlamaGenDD(HistoryForward, RopeTable, nn.Module):
    """The LlamaGen DD student backbone (released key layout)."""

    family = "llamagen"
    OFFICIAL_NESTING = ("ema",)           # llamagen-{B,L}.pt keep the weights under "ema"
    OFFICIAL_NESTING_RAW = ("model", "module", "state_dict")
    OFFICIAL_IGNORE = GPT_IGNORE          # stale RoPE tables / KV caches, if a file has them

    def __init__(self, cfg: GPTConfig, codebook_dim: int, history: Optional[str] = None,
                 lower_layers: Optional[int] = None, history_steps: Optional[int] = None):
        super().__init__()
        self.text_conditional = cfg.model_type == "t2i"
        if self.text_conditional and history is not None:
            raise ValueError("DD-H (--history) is class-conditional only; train a t2i student without it")
        self.history_opts = history_options(cfg.n_layer, history, lower_layers, history_steps)
        self.config = cfg
        self.codebook_dim = codebook_dim
        if self.text_conditional:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.cls_token_num)
        else:
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Linear(codebook_dim, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.final_layer_conti = FinalLayer(cfg.dim, codebook_dim)
        self.n_d_embed = nn.Embedding(2, cfg.dim)
        # [T + block_size, hd/2, 2] fp32 (condition rows zero; T = cls_token_num); derived, not in the state dict
        self.register_buffer("freqs_cis", self._rope(None), persistent=False)
        self.history = None
        if self.history_opts:       # DD-H (student_history.py): step embedding and history gates, zero at init
            K, L = self.history_opts["history_steps"], 1 + cfg.block_size
            self._add_history(L, cfg.dim, [layer.attention for layer in self.layers], GatedAttention, cfg.n_head)
            with torch.device("cpu"):      # masks are CPU constants, also when built on the meta device
                self.history = HistorySpec(self.history_opts["history"], self.history_opts["lower_layers"], K, L,
                                           torch.ones(L, L, dtype=torch.bool).tril())
        if not self.freqs_cis.is_meta:
            self.initialize_weights()

    # -- the StudentBackbone interface (student_backbones.py) ----------------------------------
    @staticmethod
    def paper_defaults(model: dict) -> Tuple[int, tuple, int]:
        """(paper AR steps, timesteps, split): {1, 81} for B and L; split 80 (B) or 130 (L)."""
        cfg = GPTConfig.from_dict(model)
        split = 130 if (cfg.n_layer, cfg.dim) == (24, 1024) else 80
        return 256, (1, 81), split

    @staticmethod
    def config_from_teacher(teacher) -> dict:
        return teacher.gpt.config.to_dict()

    @staticmethod
    def default_options(history: Optional[str] = None, lower_layers: Optional[int] = None,
                        history_steps: Optional[int] = None, **opts) -> dict:
        """{} for a plain student; DD-H's history / lower_layers / history_steps otherwise."""
        if opts:
            raise ValueError(f"LlamaGen DD student takes only the DD-H options, got {sorted(opts)}")
        return {k: v for k, v in (("history", history), ("lower_layers", lower_layers),
                                  ("history_steps", history_steps)) if v is not None}

    def options(self) -> dict:
        return dict(self.history_opts)

    @classmethod
    def build(cls, model: dict, codebook_dim: int, **opts) -> "LlamaGenDD":
        return cls(GPTConfig.from_dict(model), codebook_dim, **cls.default_options(**opts))

    @classmethod
    @torch.no_grad()
    def from_teacher(cls, teacher, **opts) -> "LlamaGenDD":
        """Initialised from a LlamaGenTeacher (see the module docstring), on the teacher's device."""
        gpt = teacher.gpt
        codebook = teacher.codebook.float()
        dev = codebook.device
        with dev:
            net = cls(gpt.config, codebook.shape[1], **cls.default_options(**opts))
        for name in ("cls_embedding", "layers", "norm", "output"):
            load_teacher_part(getattr(net, name), getattr(gpt, name))
        table = gpt.tok_embeddings.weight.float()
        W, b = fit_token_projection(codebook, table)
        net.tok_embeddings.weight.copy_(W)
        net.tok_embeddings.bias.copy_(b)
        # relative residual ‖fit − E‖² / ‖E − mean E‖²: 0 when E is affine in the codebook
        resid = (net.tok_embeddings(codebook) - table).pow(2).sum() / (table - table.mean(0)).pow(2).sum()
        net.init_notes = f"tok_embeddings: least-squares fit of the teacher's table, relative residual {resid.item():.3f}"
        return net.float()

    @property
    def step_sizes(self) -> tuple:
        return (1,) * self.config.block_size

    # -- weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The authors' init (`DDTransformer._init_weights`): N(0, initializer_range) Linear/Embedding
        weights, zero biases (the output head is overwritten by the teacher's)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.final_layer_conti.scale_shift_table, std=self.config.dim ** -0.5)
        if self.text_conditional:   # replaced by the teacher's in from_teacher
            nn.init.normal_(self.cls_embedding.uncond_embedding, std=self.config.caption_dim ** -0.5)

    # -- forward --------------------------------------------------------------------------------
    def _condition(self, labels) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """labels [B] (or t2i: a Caption [B, T, caption_dim]) -> (slot inputs [B, T, dim], the head's
        condition [B, 1, dim], caption mask [B, T] bool or None)."""
        if not self.text_conditional:
            if isinstance(labels, Caption):
                raise ValueError("a class-conditional student takes class labels, not a Caption")
            cond = self.cls_embedding(labels)                                 # [B, 1, dim]
            return cond, cond, None
        if not isinstance(labels, Caption):
            raise ValueError("a text-to-image student takes a Caption (features [B, T, D] and mask), not labels")
        T, D = self.config.cls_token_num, self.config.caption_dim
        if tuple(labels.features.shape[1:]) != (T, D):
            raise ValueError(f"caption features {tuple(labels.features.shape)}, the student takes [B, {T}, {D}]")
        w = self.cls_embedding.uncond_embedding
        mask = labels.mask.to(w.device)
        slots = self.cls_embedding(labels.features.to(w.device, w.dtype) * mask[..., None])   # [B, T, dim]
        m = mask[..., None].to(slots.dtype)
        pooled = (slots * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)      # [B, 1, dim]
        return slots, pooled, mask

    def _embed(self, x: torch.Tensor, labels, is_data: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """x: [B, n, C]; labels: [B] (t2i: Caption); is_data: [B, n] bool -> (layer input [B, T + n, dim],
        the head's condition [B, 1, dim], attention mask [B, 1, T + n, T + n] or None = causal)."""
        B, n, _ = x.shape
        if n > self.config.block_size:
            raise ValueError(f"{n} tokens exceed block_size {self.config.block_size}")
        slots, cond, key_ok = self._condition(labels)
        T = slots.shape[1]
        h = torch.cat([slots.to(self.tok_embeddings.weight.dtype), self.tok_embeddings(x)], dim=1)
        types = torch.cat([torch.ones_like(is_data[:, :1]).expand(B, T), is_data], dim=1).long()  # [B, T + n]
        mask = None if key_ok is None else condition_attention_mask(key_ok, 0, T + n)
        return h + self.n_d_embed(types), cond, mask

    def hidden(self, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor, block_causal: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, n, C]; labels: [B]; is_data: [B, n] bool -> (h [B, 1 + n, dim] before `norm`,
        class embedding [B, 1, dim]). block_causal: accepted for the VAR backbone's signature (LlamaGen's
        DD mask is the teacher's causal one)."""
        h, cond, mask = self._embed(x, labels, is_data)
        rope = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, rope, mask)                                          # causal (t2i: caption mask)
        return h, cond

    def hidden_blocks(self, xs: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """DD-H teacher-forced: xs [B, K, n, C]; labels [B]; is_data [B, K, n] -> (h [B, K, 1 + n, dim],
        class embedding [B, 1, dim]). The lower N layers run the K blocks as one sequence under
        `history.mask` through their gates (student_history.HistoryAttention); each block keeps its own
        RoPE positions."""
        B, K, n, C = xs.shape
        spec = self._spec(K)
        h, cond, _ = self._embed(xs.reshape(B * K, n, C), labels.repeat_interleave(K), is_data.reshape(B * K, n))
        L, D = h.shape[1:]
        h = (h.view(B, K, L, D) + self.step_embed[None, :K, :L])
        rope = self.freqs_cis[:L]
        if spec.gated:
            h = h.reshape(B, K * L, D)
            rope_k = rope.repeat(K, 1, 1)
            for i, layer in enumerate(self.layers[:spec.gated]):
                h = layer(h, rope_k, None, self._attention(i, L))
        h = h.reshape(B * K, L, D)
        for layer in self.layers[spec.gated:]:
            h = layer(h, rope)
        return h.view(B, K, L, D), cond[::K]

    def hidden_step(self, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor, cache: HistoryCache
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """DD-H cached sampling step `cache.step`: x [B, n, C] -> (h [B, 1 + n, dim], class embedding);
        the lower layers attend to the cached earlier blocks and cache this one's keys/values."""
        self._spec(1)
        k = cache.check()
        h, cond, _ = self._embed(x, labels, is_data)
        L = h.shape[1]
        h = h + self.step_embed[k, :L]
        rope = self.freqs_cis[:L]
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, None, self._attention(i, L, cache))
        cache.advance()
        return h, cond

    def _heads(self, h: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """h [..., T + n, dim] (condition slots first); cond [B, 1, dim] -> (logits [..., n, V], emb [..., n, C])."""
        h = h[..., self.config.cls_token_num:, :]
        logits = self.output(self.norm(h)).float()
        shape = h.shape
        emb = self.final_layer_conti(h.reshape(shape[0], -1, shape[-1]), cond).float()
        return logits, emb.view(*shape[:-1], -1)
