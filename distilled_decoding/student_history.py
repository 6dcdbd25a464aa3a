"""DD-H: the history-conditioned DD student's options, masks and sequential KV cache (issue 17).

A plain DD student runs its K sampler steps independently: step k sees X_{t_k} only (Algorithm 3). A
DD-H student (`--history noise|all --lower-layers N`) is the same backbone whose lower N layers also
attend to the keys/values of the earlier inputs X_{t_1}, ..., X_{t_{k-1}} of the same trajectory:
`history_mask.history_mask(K, L, kind, within)` with the backbone's own intra-sequence mask as
`within` (LlamaGen causal, VAR its scale mask); the upper layers see block k only. A per-token step
embedding `step_embed` [K, L, D], zero at initialisation, is added at block k's input.

Training is teacher-forced: every X_{t_k} is `make_xt(codebook[tokens], noise, t_k)`, so all K blocks
go through one forward (`DDStudent.forward_blocks`; the loss `dd_loss.dd_h_loss`). Sampling runs the
blocks one at a time (`DDStudent.forward(..., history=HistoryCache)`), the lower layers appending the
keys/values of each block to the cache, so a step costs the plain step plus attention over N layers'
cached blocks; teacher-forced and cached sequential outputs agree (tests/test_ddh.py).

At initialisation DD-H computes today's student exactly for `--history none`, for `--lower-layers 0`
and for the first block of every kind (no history yet); for later blocks of noise/all the history keys
join each lower layer's softmax from the start (as ARD's student), so a fresh DD-H differs there.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .history_mask import block_mask, canonical, history_mask

HISTORY_KINDS = ("none", "noise", "all")
OPTION_KEYS = ("history", "lower_layers", "history_steps")


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


class HistorySpec:
    """What a DD-H backbone keeps: kind (none | noise | all), N lower layers, K blocks, L slots a block,
    within [L, L] bool (the backbone's own mask, True = attend)."""

    def __init__(self, kind: str, lower: int, num_blocks: int, block_len: int, within: torch.Tensor):
        self.kind, self.lower, self.num_blocks, self.block_len = kind, int(lower), int(num_blocks), int(block_len)
        self.within = within.bool()
        self.mask = history_mask(self.num_blocks, self.block_len, canonical(kind), self.within)   # [K·L, K·L]
        self.blocks = block_mask(self.num_blocks, canonical(kind))                                 # [K, K]

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


class StepKV:
    """One lower layer's cache for one sampling step, in the protocol of VAR's `SelfAttention`
    (`update(k, v) -> keys and values to attend over`): the earlier visible blocks' keys/values
    [B, H, m·L, hd] (None: none) before the current block's, which it keeps in `.k`, `.v`."""

    def __init__(self, past_k: Optional[torch.Tensor], past_v: Optional[torch.Tensor]):
        self.past_k, self.past_v = past_k, past_v
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = k, v
        if self.past_k is None:
            return k, v
        return torch.cat((self.past_k, k), dim=2), torch.cat((self.past_v, v), dim=2)


class HistoryForward:
    """What both DD backbones (student_llamagen, student_var) do the same with or without DD-H: they
    bring `hidden`, `hidden_step`, `hidden_blocks` and `_heads` (hidden states -> logits, emb), and
    `history` (a HistorySpec, None for plain DD)."""

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

    def _spec(self, K: int) -> HistorySpec:
        if self.history is None:
            raise ValueError("not a DD-H student (trained without --history)")
        if K > self.history.num_blocks:
            raise ValueError(f"{K} blocks; this DD-H student was trained with {self.history.num_blocks}")
        return self.history
