"""The timestep -> data-prefix rule of Distilled Decoding, shared by training and sampling.

Timesteps are the paper's, 1-indexed over AR steps (a LlamaGen step = 1 token, a VAR step = 1 scale):
at t the first t − 1 steps are data, `step_offsets[t − 1]` tokens, and the rest noise. The authors'
code uses t − 1; `student_official.load_official` is the only place that meets their files. `prefix_mask` is
the one builder of "which tokens belong to the first k steps"; `make_xt` and the student's
`data_mask`, the loss's noise mask and the sampler's head split all use it.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .student_backbones import backbone_class


def offsets_of(step_sizes: Sequence[int]) -> tuple:
    offs = [0]
    for k in step_sizes:
        offs.append(offs[-1] + int(k))
    return tuple(offs)


def prefix_mask(step_offsets: Sequence[int], steps: torch.Tensor, n: int) -> torch.Tensor:
    """steps: [B] int (0 .. num_steps) -> [B, n] bool, True at the tokens of the first steps[b] AR
    steps (token i < step_offsets[steps[b]])."""
    offs = torch.tensor(step_offsets, device=steps.device)
    return torch.arange(n, device=steps.device)[None, :] < offs[steps.long()][:, None]


def make_xt(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
            step_offsets: Sequence[int]) -> torch.Tensor:
    """X_t: data [B, n, C] before step_offsets[t − 1], noise [B, n, C] from there on; t: [B]."""
    keep = prefix_mask(step_offsets, t.to(data.device).long() - 1, data.shape[1])
    return torch.where(keep[..., None], data, noise)


def default_schedule(family: str, model: dict, num_steps: int) -> Tuple[tuple, int]:
    """The paper's (timesteps, split) for this teacher, scaled to its number of AR steps.

    Paper values (LlamaGen-B {1, 81}/80, -L {1, 81}/130, VAR-d16 {1, 6}/5, d20/d24 {1, 5}/4) hold for
    teachers with the paper's step count (256 tokens, 10 scales). For other teachers (tiny ones) the
    data prefix and the split are scaled by num_steps / paper_num_steps, rounding half up:
    t2 = 1 + round((t2_paper − 1)·r) clipped to [2, num_steps], split = round(split_paper·r) clipped
    to [1, num_steps]. E.g. a 16-token LlamaGen gets {1, 6} and split 5; a 3-scale VAR {1, 3}, split 2.
    """
    paper_steps, timesteps, split = backbone_class(family).paper_defaults(model)
    if num_steps == paper_steps:
        return tuple(timesteps), int(split)
    r = num_steps / paper_steps
    rnd = lambda v: int(v * r + 0.5)  # noqa: E731 - round half up (Python's round is to even)
    ts = sorted({1} | {min(max(1 + rnd(t - 1), 2), num_steps) for t in timesteps if t > 1})
    return tuple(ts), min(max(rnd(split), 1), num_steps)
