"""Which earlier inputs a history-conditioned student may attend to: the one mask builder of ARD and DD-H.

A history-conditioned student (ARD, Kim et al. CVPR 2025, Fig. 3b; DD-H) reads S inputs at once, the
states x_0 (initial noise), x_1, ..., x_{S-1} of a few-step trajectory, each a block of L tokens.
Its lower layers let block k attend to a set of earlier blocks; its upper layers (and every layer of
a plain step-distillation student) see block k only. The block-level rule:

    M1 "current"  block k sees k                        (step distillation; DD-H --history none)
    M2 "window"   block k sees k-1 and k                (a window of two)
    M3 "noise"    block k sees 0 and k                  (initial noise + current; DD-H --history noise)
    M4 "causal"   block k sees 0 .. k                   (block-causal over all history, ARD's default;
                                                         DD-H --history all)

Within a block the pattern is the student's own (`within`: full for DiT, whatever the AR student
uses for DD-H). Masks are boolean, True = may attend, in the [queries, keys] orientation that
`F.scaled_dot_product_attention(attn_mask=...)` takes.
"""
from __future__ import annotations

from typing import Optional

import torch

# name -> aliases accepted on the command line; the canonical names are the paper's
MASKS = ("M1", "M2", "M3", "M4")
ALIASES = {"current": "M1", "none": "M1", "window": "M2", "noise": "M3", "causal": "M4", "all": "M4"}


def canonical(kind: str) -> str:
    """'M4' | 'causal' | 'all' -> 'M4' (ValueError naming the choices otherwise)."""
    k = ALIASES.get(kind, kind)
    if k not in MASKS:
        raise ValueError(f"unknown history mask {kind!r}; choose from {list(MASKS) + sorted(ALIASES)}")
    return k


def block_mask(num_blocks: int, kind: str) -> torch.Tensor:
    """[S, S] bool: entry (k, j) is True when block k (a query) may attend to block j (a key)."""
    kind = canonical(kind)
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    k = torch.arange(num_blocks)[:, None]
    j = torch.arange(num_blocks)[None, :]
    allowed = {
        "M1": j == k,
        "M2": (j == k) | (j == k - 1),
        "M3": (j == k) | (j == 0),
        "M4": j <= k,
    }[kind]
    return allowed


def history_mask(num_blocks: int, block_len: int, kind: str,
                 within: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[S·L, S·L] bool token mask: token (k, a) attends to token (j, b) iff block_mask[k, j] and,
    for j == k, within[a, b]; for j != k every token of an allowed earlier block is visible.

    within: [L, L] bool intra-block pattern (None = full attention, as in DiT).
    """
    blocks = block_mask(num_blocks, kind)
    full = blocks.repeat_interleave(block_len, 0).repeat_interleave(block_len, 1)
    if within is None:
        return full
    if within.shape != (block_len, block_len):
        raise ValueError(f"within must be [{block_len}, {block_len}], got {list(within.shape)}")
    same = torch.eye(num_blocks, dtype=torch.bool).repeat_interleave(block_len, 0).repeat_interleave(block_len, 1)
    inner = within.bool().repeat(num_blocks, num_blocks)
    return full & (~same | inner)


def visible_blocks(num_blocks: int, kind: str, k: int) -> list:
    """The blocks that block k attends to (ascending): what a KV cache must keep for step k."""
    return [j for j in range(num_blocks) if bool(block_mask(num_blocks, kind)[k, j])]
