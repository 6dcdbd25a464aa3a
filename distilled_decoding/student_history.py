"""DD-H: the history-conditioned DD student's options, masks, gated attention and sequential KV cache
(issue 17).

A plain DD student runs its K sampler steps independently: step k sees X_{t_k} only (Algorithm 3). A
DD-H student (`--history noise|all --lower-layers N`) is the same backbone whose lower N layers also
attend to the keys/values of the earlier inputs X_{t_1}, ..., X_{t_{k-1}} of the same trajectory:
`history_mask.history_mask(K, L, kind, within)` with the backbone's own intra-sequence mask as
`within` (LlamaGen causal, VAR its scale mask); the upper layers see block k only. A per-token step
embedding `step_embed` [K, L, D], zero at initialisation, is added at block k's input.

The history enters through a zero-initialised gate. In each lower layer that can see history
(`--history noise|all`) the attention module carries `history_gate` alpha [H], zeros at
initialisation, and its output per head h is

    out_h = A_own_h + g_h · (A_full_h − A_own_h),    g_h = tanh(alpha_h)

A_full: one softmax over the block's own keys (under `within`) and the visible history keys (the
ungated DD-H attention); A_own: the softmax over the block's own keys only, what the plain student
computes. tanh: g(0) = 0 with slope 1 there (the gate gets a gradient from the first step), |g| < 1,
and g = 1.0 exactly in fp32 from alpha ≈ 9.5 (then the layer is the ungated DD-H attention). So a fresh
DD-H computes today's student exactly (g = 0: A_own alone; tests/test_ddh.py, ≤ 1e-6) for every kind,
N and block; training opens the gate per head. The gate costs one more softmax per lower layer, over
the block's own L keys only (A_own is computed block by block, 1/K of A_full's keys in the
teacher-forced pass); plain DD (no --history) and the upper layers run exactly as before.

The backbones (student_llamagen, student_var) turn their lower layers' attention modules into gated
subclasses (`add_history_gate`) that compute q, k, v as the teacher's and hand them to a
`HistoryAttention`, which does the two softmaxes, the gate and the cache here, once for both families.

Training is teacher-forced: every X_{t_k} is `make_xt(codebook[tokens], noise, t_k)`, so all K blocks
go through one forward (`DDStudent.forward_blocks`; the loss `dd_loss.dd_h_loss`). Sampling runs the
blocks one at a time (`DDStudent.forward(..., history=HistoryCache)`), the lower layers appending the
keys/values of each block to the cache, so a step costs the plain step plus attention over N layers'
cached blocks (and the own-block softmax); teacher-forced and cached sequential outputs agree
(tests/test_ddh.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .history_mask import block_mask, canonical, history_mask

HISTORY_KINDS = ("none", "noise", "all")
OPTION_KEYS = ("history", "lower_layers", "history_steps")
GATE = "history_gate"           # the parameter name of a gated attention module's alpha [H]


def history_options(depth: int, history: Optional[str] = None, lower_layers: Optional[int] = None,
                    history_steps: Optional[int] = None) -> dict:
    """The backbone options of DD-H ({} = a plain student): history in none | noise | all,
    lower_layers in [0, depth] (None = all of them), history_steps = K, the number of trained timesteps."""
    if history is None:
        if lower_layers is not None:
            raise ValueError("--lower-layers needs --history none|noise|all")
        return {}
    if history not in HISTORY_KINDS:
        raise ValueError(f"--history {history!r}: choose from {list(HISTORY_KINDS)}")
    n = depth if lower_layers is None else int(lower_layers)
    if not 0 <= n <= depth:
        raise ValueError(f"--lower-layers {n}: must be in [0, {depth}] (the student has {depth} layers)")
    if history_steps is None or int(history_steps) < 1:
        raise ValueError(f"DD-H needs the number of trained timesteps (history_steps), got {history_steps}")
    return {"history": history, "lower_layers": n, "history_steps": int(history_steps)}


def gated_layers(history: str, lower: int) -> int:
    """How many lower layers read history through a gate: N for noise / all, 0 for none (whose lower
    layers see their own block only, as the upper ones)."""
    return int(lower) if canonical(history) != "M1" else 0


class HistorySpec:
    """What a DD-H backbone keeps: kind (none | noise | all), N lower layers, K blocks, L slots a block,
    within [L, L] bool (the backbone's own mask, True = attend); `gated` = the lower layers that read
    history (`gated_layers`)."""

    def __init__(self, kind: str, lower: int, num_blocks: int, block_len: int, within: torch.Tensor):
        self.kind, self.lower, self.num_blocks, self.block_len = kind, int(lower), int(num_blocks), int(block_len)
        self.within = within.bool()
        self.mask = history_mask(self.num_blocks, self.block_len, canonical(kind), self.within)   # [K·L, K·L]
        self.blocks = block_mask(self.num_blocks, canonical(kind))                                 # [K, K]
        self.gated = gated_layers(kind, self.lower)

    def earlier(self, k: int) -> List[int]:
        """The earlier blocks j < k that block k's lower layers attend to."""
        return [j for j in range(k) if bool(self.blocks[k, j])]

    def blocks_mask(self, K: int, L: Optional[int] = None) -> torch.Tensor:
        """[K·L, K·L] bool: `mask` over the first K blocks, each cut to its first L slots (default all)."""
        Lf, S = self.block_len, self.num_blocks
        L = Lf if L is None else L
        return self.mask.view(S, Lf, S, Lf)[:K, :L, :K, :L].reshape(K * L, K * L)

    def step_mask(self, k: int, L: Optional[int] = None) -> torch.Tensor:
        """[L, (len(earlier(k)) + 1)·L] bool: block k's rows of `mask`, over the keys of its earlier
        visible blocks (in order) and then its own (each block cut to its first L slots)."""
        Lf = self.block_len
        L = Lf if L is None else L
        cols = torch.cat([torch.arange(j * Lf, j * Lf + L) for j in self.earlier(k) + [k]])
        return self.mask[k * Lf:k * Lf + L][:, cols]

    def kept(self, k: int) -> bool:
        """Whether some later block attends to block k (its keys/values must be cached)."""
        return bool(self.blocks[k + 1:, k].any())


class HistoryCache:
    """The lower layers' keys/values of the blocks run so far, for cached sequential sampling.

    Use one per batch: block k = 0, 1, ... in order; `DDStudent.forward(x, labels, t, history=cache)`
    runs block `cache.step` and advances it. kv[(layer, block)] = (k, v) [B, H, L, hd]."""

    def __init__(self, spec: HistorySpec):
        self.spec = spec
        self.step = 0
        self.kv: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}

    def past(self, layer: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Keys and values [B, H, m·L, hd] of the earlier blocks the current block sees (None, None: none)."""
        got = [self.kv[(layer, j)] for j in self.spec.earlier(self.step)]
        if not got:
            return None, None
        return torch.cat([k for k, _ in got], dim=2), torch.cat([v for _, v in got], dim=2)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.spec.kept(self.step):
            self.kv[(layer, self.step)] = (k, v)

    def check(self) -> int:
        """The block to run now (a ValueError past the K trained blocks)."""
        if self.step >= self.spec.num_blocks:
            raise ValueError(f"DD-H was trained for {self.spec.num_blocks} steps; step {self.step + 1} has no block")
        return self.step

    def advance(self) -> None:
        self.step += 1


def gate(alpha: torch.Tensor) -> torch.Tensor:
    """The history gate g = tanh(alpha): alpha [H] -> g [H] (see the module docstring)."""
    return torch.tanh(alpha)


def own_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, within: torch.Tensor,
                  scale: Optional[float] = None) -> torch.Tensor:
    """Each block of L slots attends to its own keys only, under within [L, L] bool:
    q, k, v [B, H, K·L, hd] -> [B, H, K·L, hd] (one softmax per block; the plain student's attention)."""
    B, H, S, hd = q.shape
    L = within.shape[0]
    K = S // L

    def blocks(t: torch.Tensor) -> torch.Tensor:                  # [B, H, K·L, d] -> [B·K, H, L, d]
        return t.reshape(B, H, K, L, t.shape[-1]).transpose(1, 2).reshape(B * K, H, L, t.shape[-1])

    out = F.scaled_dot_product_attention(blocks(q), blocks(k), blocks(v), attn_mask=within, scale=scale)
    return out.view(B, K, H, L, -1).transpose(1, 2).reshape(B, H, S, -1)


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """[B, Hkv, S, d] -> [B, H, S, d] (grouped-query keys/values repeated per query head)."""
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], dim=1)


class HistoryAttention:
    """How gated lower layer `layer` attends in one DD-H forward. Its gated attention module (see
    `add_history_gate`) computes q, k, v as the teacher's and calls this instead of its one softmax.

    Teacher-forced (cache None): q, k, v cover K blocks of L slots; A_full is one softmax under
    `spec.blocks_mask(K, L)`, A_own each block's softmax over its own keys. Cached step (cache given):
    q, k, v are block `cache.step`'s; A_full reads the cached keys of the earlier visible blocks and
    its own (`spec.step_mask`), A_own its own only; the block's keys/values are cached for the later
    blocks that see it."""

    def __init__(self, spec: "HistorySpec", layer: int, block_len: int, cache: Optional["HistoryCache"] = None):
        self.spec, self.layer, self.block_len, self.cache = spec, int(layer), int(block_len), cache

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                 scale: Optional[float] = None) -> torch.Tensor:
        """q [B, H, K·L, hd]; k, v [B, Hkv, K·L, hd] (Hkv divides H); alpha [H] -> [B, H, K·L, hd]:
        A_own + gate(alpha)·(A_full − A_own) per head."""
        H, S, L = q.shape[1], q.shape[2], self.block_len
        own = own_attention(q, _heads(k, H), _heads(v, H), self.spec.within[:L, :L].to(q.device), scale)
        if self.cache is None:
            if S == L:                                   # one block: nothing to read
                return own
            mask, kf, vf = self.spec.blocks_mask(S // L, L), k, v
        else:
            pk, pv = self.cache.past(self.layer)
            self.cache.store(self.layer, k, v)
            if pk is None:
                return own
            mask, kf, vf = self.spec.step_mask(self.cache.step, L), torch.cat((pk, k), 2), torch.cat((pv, v), 2)
        full = F.scaled_dot_product_attention(q, _heads(kf, H), _heads(vf, H), attn_mask=mask.to(q.device),
                                              scale=scale)
        g = gate(alpha).to(own.dtype).view(1, H, 1, 1)
        return own + g * (full - own)


def add_history_gate(attention: nn.Module, gated_cls: type, heads: int) -> None:
    """Make `attention` (a lower layer's attention module) an instance of `gated_cls`, the backbone's
    subclass of its class that reads history through `HistoryAttention`, with a zero gate
    `history_gate` [heads]. In place, as torch.nn.utils.parametrize swaps a module's class: the layer
    keeps its tensors and its key names and no random number is drawn, so a DD-H student's other
    initial weights are those of the plain student of the same seed."""
    if not issubclass(gated_cls, type(attention)):
        raise TypeError(f"{gated_cls.__name__} is not a subclass of {type(attention).__name__}")
    p = next(attention.parameters())
    attention.__class__ = gated_cls
    attention.register_parameter(GATE, nn.Parameter(torch.zeros(heads, dtype=p.dtype, device=p.device)))


def load_teacher_part(mine: nn.Module, theirs: nn.Module) -> None:
    """mine.load_state_dict(theirs.state_dict()), strictly, except for DD-H's history gates, which the
    teacher does not have (they keep their zeros)."""
    state = theirs.state_dict()
    state.update({k: v for k, v in mine.state_dict().items() if k.rsplit(".", 1)[-1] == GATE})
    mine.load_state_dict(state)


class HistoryForward:
    """What both DD backbones (student_llamagen, student_var) do the same with or without DD-H: they
    bring `hidden`, `hidden_step`, `hidden_blocks` and `_heads` (hidden states -> logits, emb),
    `history_opts` and `history` (a HistorySpec, None for plain DD)."""

    history: Optional[HistorySpec]

    def forward(self, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor,
                history: Optional[HistoryCache] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, n, C]; labels: [B]; is_data: [B, n] bool -> (logits [B, n, V] fp32, emb [B, n, C]
        fp32); the class/start slot is dropped. history: DD-H's cache (a sampling step)."""
        if history is None:
            return self._heads(*self.hidden(x, labels, is_data))
        return self._heads(*self.hidden_step(x, labels, is_data, history))

    def forward_blocks(self, xs: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """DD-H teacher-forced: xs [B, K, n, C] -> (logits [B, K, n, V], emb [B, K, n, C])."""
        return self._heads(*self.hidden_blocks(xs, labels, is_data))

    def _add_history(self, block_len: int, dim: int, attentions: Sequence[nn.Module], gated_cls: type,
                     heads: int) -> None:
        """DD-H's parameters: `step_embed` [K, L, dim] and a gate [heads] in each lower attention module
        that reads history, all zero (so a fresh DD-H is the plain student)."""
        o = self.history_opts
        self.step_embed = nn.Parameter(torch.zeros(o["history_steps"], block_len, dim))
        for att in list(attentions)[:gated_layers(o["history"], o["lower_layers"])]:
            add_history_gate(att, gated_cls, heads)

    def _attention(self, layer: int, block_len: int, cache: Optional[HistoryCache] = None
                   ) -> Optional[HistoryAttention]:
        """What layer `layer` attends with in a DD-H forward: a HistoryAttention for the gated lower
        layers, None (its own block, as the plain student) for the others."""
        return HistoryAttention(self.history, layer, block_len, cache) if layer < self.history.gated else None

    def _spec(self, K: int) -> HistorySpec:
        if self.history is None:
            raise ValueError("not a DD-H student (trained without --history)")
        if K > self.history.num_blocks:
            raise ValueError(f"{K} blocks; this DD-H student was trained with {self.history.num_blocks}")
        return self.history
