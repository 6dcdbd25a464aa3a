"""The per-token flow-matching map: noise ε ∈ R^C  ->  a codebook index distributed as p.

DD replaces each multinomial draw of the teacher by a deterministic map. For one token with next-token
distribution p over the codebook {c_j} ⊂ R^C, the data distribution is the Dirac mixture Σ_j p_j δ(c_j).
Interpolating x_t = t·x1 + (1 − t)·x0 (x0 ~ N(0, I), t = 0 noise, t = 1 data) gives the flow ODE whose
time-1 map pushes N(0, I) onto that mixture. Its data prediction is exact and cheap:

    D(x, t) = E[x1 | x_t = x] = Σ_j w_j c_j,
    log w_j = log p_j + (t·x·c_j − ½t²‖c_j‖²)/(1 − t)² + const(x)      (p_j = 0 -> w_j = 0)

(x_t | x1 = c_j ~ N(t·c_j, (1 − t)² I); the ‖x‖² term is constant in j and dropped, which avoids the
cancellation). We integrate dx/dλ = t·(D − x) with multistep DPM-Solver++ (`dpm_solver.py`) from
t_start to t_end and snap x/t_end to the nearest code (squared L2, as DD does) among the token's codes
with p > 0 (identical whenever the solve is accurate; it keeps a failed solve from emitting a token
the teacher could never sample).

Scale (grid_scale="codebook"): with y = x/t = x1 + s·x0, s = (1 − t)/t = e^{−λ}, the ODE is dy/dλ = D − y,
and the posterior splits between two codes at distance δ once s falls to ~δ. Scaling the codebook by k
maps the solution at λ to k times the solution at λ − log k, so the time grid (t_start, t_end and every
step) is placed for a codebook of spread 1 and shifted in λ by −log(code_spread(codebook)): the map of k·C
is then the map of C, for any k. Unshifted ("unit", the map before issue 14), a raw N(0, 3²) 4096 x 32
codebook (spread 17) has all its posterior splits inside the grid's first step (10 NFE: 58-62% agreement
with the exact map, χ² p < 1e-300 at 20 000 draws).

Start: x(t_start) = ε. The exact state is ε + t_start·(μ − ε) + O(t_start²) with μ = Σ_j p_j c_j (in
units of the spread): a token changes code only if its ε lies that close to a boundary between the
cells the exact map sends to different codes. Measured: DOP853 solves from x(1e-3) = ε and from t = 0
agree on 300/300 tokens (16384 x 8 l2); the remaining error of the map is the solver's.
End: at t_end (1 − 1e-3 at spread 1) the posterior has long collapsed to one code; x/t_end sits about
1e-3·spread·√C from it, far below half the 1% quantile of nearest-neighbour distances (0.17·spread for
random 16384 x 8 l2-normalised codes, 0.69·spread for random 4096 x 32 Gaussian ones).

NFE: the error sits where the posterior splits between neighbours (λ − log spread in [0, 3] for
16384 x 8 l2 codes); there DPM-Solver++(3M) converges at ~NFE⁻² in the share of tokens that land on
another code than the exact map: 16384 x 8 l2, p = softmax(2·N(0,1)) top-k 8000, 2000 tokens: 98.8% at
24 NFE, 99.25% at 32, 99.6% at 48, 99.8% at 64, 99.95% at 128. No grid shape (logSNR, EDM/Karras ρ,
asinh windows, refining single λ bands) or singlestep solver (Heun, 2S) did better per NFE. Hence the
default 48 NFE; for codebooks outside the validated ones `codebook_warning` (printed by `dd build-dataset`)
names more. tools/bench_flowmap.py and docs/flowmap.md have the full measurements.

Memory: the logits are [tokens, V] (V = 16384 for LlamaGen). `solve_flow` solves tokens in row chunks
sized from `mem_budget_mb` (each row holds its log p [V] plus two [V_CHUNK] logit buffers) and
`denoise` reduces over V in fixed chunks of V_CHUNK codes with an online log-sum-exp, so no dense
[B, k, V] fp32 tensor beyond the budget is ever built (the caller's `probs` aside).

Determinism: tokens never interact, and the V chunking is a constant (V_CHUNK), so each token's
reduction over V runs in the same order whatever the batch. Batch size and budget change only how many
rows share one matmul, which may change the BLAS kernel and so rounding at the 1e-7 level. An index
can change only if its ε lies within ~1e-6 of a cell boundary: the fp32 and fp64 solves (a
perturbation at least as large) give the same index on 2000/2000 tokens per codebook, and the tests
require identical indices across batch shapes, orders, row chunks and V-chunk sizes.

Teacher-agnostic: inputs are plain tensors (probs: [B, k, V], rows summing to 1, e.g. a teacher's
`step_probs`).

DD2 reuses the posterior: `denoise` also takes per-row times t [N] and is differentiable in x and log p
(a chunked backward that recomputes the weights), which `dd2_score.conditional_score` turns into the
teacher's conditional score at per-position τ = 1 − t. The flow map's own path (scalar t, no gradient)
computes exactly what it did before.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .dpm_solver import SPACINGS, VARIANTS, dpm_solver_pp, timesteps

# Codes per chunk of the reduction over V. A constant on purpose: the order of the online log-sum-exp
# must not depend on batch size or memory budget (see "Determinism" above).
V_CHUNK = 4096
# Where the time grid sits: "codebook" shifts it in λ by −log(code_spread(codebook)), so the map is the
# same for a codebook and any multiple of it; "unit" places it as for a codebook of spread 1 (the map
# before issue 14).
GRID_SCALES = ("codebook", "unit")
# Values that reproduce the map from before each field existed: a recorded config lacking a field
# (a data set's manifest, a run's info) was built with these (`FlowMapConfig.from_dict`).
LEGACY = {"grid_scale": "unit"}
# Below exp(-EXP_FLOOR) of the row's top weight a code's weight is floored there: exp() of very negative
# or -inf inputs takes a slow path (4-30x on x86), and e^-80·V is far below fp32 resolution of the sum.
EXP_FLOOR = 80.0


@dataclass(frozen=True)
class FlowMapConfig:
    """How the per-token flow ODE is solved. Saved with every dataset built from it (`to_dict`)."""

    nfe: int = 48                   # denoiser evaluations per token (DD: 10; see the module docstring)
    order: int = 3                  # multistep DPM-Solver++ order (1, 2, 3)
    spacing: str = "time_quadratic"  # "logsnr" | "time_uniform" | "time_quadratic" (dense near data)
    t_start: float = 1e-3           # x(t_start) = ε; λ = −6.9 (for a codebook of spread 1, see grid_scale)
    t_end: float = 1.0 - 1e-3       # snap x/t_end to the nearest code; λ = +6.9 (ditto)
    grid_scale: str = "codebook"    # "codebook": grid shifted by −log(code_spread); "unit": not shifted
    variant: str = "exact"          # "exact" (2·φ3) or "official" (dpm-solver @52bc3fb, φ3)
    lower_order_final: bool = True  # last step order 1, the one before ≤ 2 (see dpm_solver_pp)
    mem_budget_mb: float = 256.0    # per-call working memory for logits and log p

    def __post_init__(self):
        if self.nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {self.nfe}")
        if self.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {self.order}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; choose from {SPACINGS}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose from {VARIANTS}")
        if self.grid_scale not in GRID_SCALES:
            raise ValueError(f"unknown grid_scale {self.grid_scale!r}; choose from {GRID_SCALES}")
        if not 0.0 < self.t_start < self.t_end < 1.0:
            raise ValueError(f"need 0 < t_start < t_end < 1, got {self.t_start}, {self.t_end}")
        if self.mem_budget_mb <= 0:
            raise ValueError(f"mem_budget_mb must be positive, got {self.mem_budget_mb}")

    def timesteps(self, spread: float = 1.0) -> torch.Tensor:
        """float64 [nfe + 1] solver times for a codebook of `code_spread` `spread`."""
        shift = math.log(spread) if self.grid_scale == "codebook" else 0.0
        return timesteps(self.nfe, self.t_start, self.t_end, self.spacing, log_scale=shift)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowMapConfig":
        """The config a recorded dict describes; fields it lacks take their LEGACY value (the map from
        before the field existed), keys that are not fields are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{**LEGACY, **{k: v for k, v in d.items() if k in names}})


def code_spread(codebook: torch.Tensor) -> float:
    """RMS distance of the codes from their mean, sqrt(mean_j ‖c_j − c̄‖²), in float64: the codebook's
    scale, by which `grid_scale="codebook"` shifts the time grid (1.0 for l2-normalised random codes)."""
    cb = codebook.detach().to(torch.float64)
    return (cb - cb.mean(0)).pow(2).sum(1).mean().sqrt().item()


def relative_spacing(codebook: torch.Tensor, q: float = 0.01, rows: int = 1024) -> float:
    """The q-quantile of the codes' nearest-neighbour distances over `code_spread`: scale-free; it sets
    how late (in λ − log spread) the closest neighbours still split, which the grid must reach.
    Exact duplicate codes count as distance 0. [V, C] -> float; O(V²C), chunked."""
    cb = codebook.detach().to(torch.float64)
    sq = cb.pow(2).sum(1)
    nn = torch.empty(len(cb), dtype=torch.float64)
    for r in range(0, len(cb), rows):
        d = sq[r:r + rows, None] + sq[None] - 2.0 * cb[r:r + rows] @ cb.t()       # [rows, V]
        d[torch.arange(d.shape[0]), torch.arange(r, r + d.shape[0])] = math.inf   # not the code itself
        nn[r:r + rows] = d.min(1).values.clamp_min(0).sqrt()
    return (nn.quantile(q) / code_spread(codebook)).item()


# The codebooks the defaults were validated on (tools/bench_flowmap.py, docs/flowmap.md), all random:
# 16384 x 8 l2-normalised (the hardest: 99.6% agreement with the exact map at 48 NFE), 4096 x 32
# N(0, σ²) for σ 0.5 to 3 (any σ: with grid_scale="codebook" the map does not depend on σ), 4096 x 6 and
# 1024 x 4 l2-normalised, and 512 x 32 Gaussian codes plus 64 near-duplicates (relative_spacing 0.008:
# 99.7% at 48 NFE, 99.9% at 96). Doubling the NFE cuts the tokens that leave the exact map's code ~4x.
VALIDATED_MAX_CODES = 16384
VALIDATED_MIN_SPACING = 0.008


def codebook_warning(codebook: torch.Tensor, config: FlowMapConfig) -> Optional[str]:
    """One line when `config` has not been validated on a codebook like this one (else None), naming
    what to use instead. O(V²C) for `relative_spacing`: call it once per data set, not per step."""
    spread = code_spread(codebook)
    if config.grid_scale == "unit" and not 0.5 <= spread <= 2.0:
        return (f"flow map: grid_scale='unit' places the solver's time grid for a codebook of spread ~1, but this "
                f"codebook's spread is {spread:.3g}; use grid_scale='codebook' (the default, --grid-scale codebook)")
    nfe = 2 * FlowMapConfig.nfe
    if config.nfe >= nfe:
        return None
    if codebook.shape[0] > VALIDATED_MAX_CODES:   # (and spares the O(V²) spacing of a huge codebook)
        outside = f"{codebook.shape[0]} codes (validated up to {VALIDATED_MAX_CODES})"
    elif (r := relative_spacing(codebook)) < VALIDATED_MIN_SPACING:
        outside = f"a nearest-neighbour spacing (1% quantile) of {r:.3g} of its spread (validated down to " \
                  f"{VALIDATED_MIN_SPACING})"
    else:
        return None
    return (f"flow map: this codebook has {outside}; the {config.nfe}-NFE map was not validated on such codes: "
            f"use --nfe {nfe} (tools/bench_flowmap.py --codebook measures the map on it)")


# ---- the Dirac-mixture denoiser ------------------------------------------------------------------
def _logit_scales(t):
    """(a, b) with logits = log p + a·x·c − b·‖c‖²: a = t/(1 − t)², b = ½t²/(1 − t)².
    t: a float, or a tensor [N] of per-row times (then a and b are [N])."""
    inv = 1.0 / ((1.0 - t) * (1.0 - t))
    return t * inv, 0.5 * t * t * inv


def _augment(codebook: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """codebook [V, C] -> ([c, ‖c‖²] [V, C + 1], [c, 1]ᵀ [C + 1, V]).

    With them one addmm gives logits = log p + [a·x, −b]·[c, ‖c‖²] and one mm gives
    [Σ w c, Σ w] = ([c, 1]ᵀ·wᵀ)ᵀ; fewer passes over the [rows, V_CHUNK] buffer. The second is stored
    transposed: [C + 1, Vc] @ [Vc, rows] runs 1.2-3x faster than [rows, Vc] @ [Vc, C + 1] (MKL, 1 thread).
    """
    csq = codebook.pow(2).sum(1, keepdim=True)
    return torch.cat([codebook, csq], 1), torch.cat([codebook, torch.ones_like(csq)], 1).t().contiguous()


def _x_augment(x: torch.Tensor, t) -> torch.Tensor:
    """x's half of the logits, [a·x, −b] [N, C + 1] (see `_augment`); t a float or a tensor [N]."""
    a, b = _logit_scales(t)
    if isinstance(t, torch.Tensor):
        return torch.cat([x * a[:, None], -b[:, None]], 1)
    return torch.cat([x * a, x.new_full((x.shape[0], 1), -b)], 1)


def posterior_logits(x: torch.Tensor, t, logp: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Dense unnormalised log posterior weights [N, V] (small problems and tests only).

    x: [N, C]; logp: [N, V] (−inf where p = 0); codebook: [V, C]; t: a float or per-row times [N],
    0 <= t < 1.
    """
    a, b = _logit_scales(t)
    if isinstance(t, torch.Tensor):
        a, b = a[:, None], b[:, None]
    return logp + a * (x @ codebook.t()) - b * codebook.pow(2).sum(1)


def _posterior_sums(x: torch.Tensor, t, logp: torch.Tensor, cb_sq: torch.Tensor, cb_one_t: torch.Tensor,
                    v_chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The online log-sum-exp over fixed chunks of V behind `denoise`: (acc [N, C + 1], m [N]) with
    acc = [Σ w c, Σ w]·e^{−m} for the unnormalised weights w = e^{logits} (floored at e^{−EXP_FLOOR}
    of the running max), so D = acc[:, :C]/acc[:, C] and log Σ w = m + log acc[:, C]."""
    n, c = x.shape
    xa = _x_augment(x, t)                                          # [N, C + 1]
    m = x.new_full((n,), -math.inf)                                # running max of the logits
    acc = x.new_zeros(n, c + 1)                                    # running [Σ w c, Σ w] at scale e^{−m}
    for v0 in range(0, cb_sq.shape[0], v_chunk):
        sl = slice(v0, v0 + v_chunk)
        lg = torch.addmm(logp[:, sl], xa, cb_sq[sl].t())           # [N, Vc] log p + a x·c − b‖c‖²
        m_new = torch.maximum(m, lg.amax(1))
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # no support yet -> 0
        lg.sub_(shift[:, None]).clamp_(min=-EXP_FLOOR).exp_()     # weights at scale e^{−shift}
        acc = acc * torch.exp(m - shift)[:, None] + (cb_one_t[:, sl] @ lg.t()).t()
        m = m_new
    return acc, m


def _denoise(x: torch.Tensor, t, logp: torch.Tensor, cb_sq: torch.Tensor, cb_one_t: torch.Tensor,
             v_chunk: int) -> torch.Tensor:
    """D(x, t) [N, C] with an online log-sum-exp over fixed chunks of V (see `denoise`; cb_sq [V, C + 1],
    cb_one_t [C + 1, V] from `_augment`; t a float or per-row times [N])."""
    c = x.shape[1]
    acc, _ = _posterior_sums(x, t, logp, cb_sq, cb_one_t, v_chunk)
    return acc[:, :c] / acc[:, c:]


def _denoise_vjp(g: torch.Tensor, x: torch.Tensor, t, logp: torch.Tensor, cb_sq: torch.Tensor,
                 cb_one_t: torch.Tensor, d: torch.Tensor, log_z: torch.Tensor, v_chunk: int,
                 want_logp: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """gᵀ∂D/∂x [N, C] and gᵀ∂D/∂log p [N, V] (None unless want_logp), recomputing the weights chunk by
    chunk from the forward's D [N, C] and log Σ w [N] (nothing [N, V] is kept between the passes).

    With w_j the posterior weights, ∂D/∂log p_j = w_j (c_j − D) and ∂D/∂x = a·Cov_w[c] (a = t/(1 − t)²),
    so both are sums of r_j = w_j (g·c_j − g·D): gᵀ∂D/∂log p_j = r_j, gᵀ∂D/∂x = a·Σ_j r_j c_j.
    """
    n, c = x.shape
    a, _ = _logit_scales(t)
    xa = _x_augment(x, t)                                          # [N, C + 1]
    ga = torch.cat([g, -(g * d).sum(1, keepdim=True)], 1)          # [N, C + 1]: [g, −g·D]
    gx = x.new_zeros(n, c)
    glogp = torch.empty_like(logp) if want_logp else None
    for v0 in range(0, cb_sq.shape[0], v_chunk):
        sl = slice(v0, v0 + v_chunk)
        w = torch.addmm(logp[:, sl], xa, cb_sq[sl].t())            # [N, Vc] logits
        w.sub_(log_z[:, None]).clamp_(min=-EXP_FLOOR).exp_()      # normalised weights
        r = w.mul_(ga @ cb_one_t[:, sl])                           # [N, Vc] w_j (g·c_j − g·D)
        if glogp is not None:
            glogp[:, sl] = r
        gx += r @ cb_sq[sl, :c]
    return gx * (a[:, None] if isinstance(a, torch.Tensor) else a), glogp


class _Denoise(torch.autograd.Function):
    """`denoise` with a chunked, recomputing backward (x and log p; t and the codebook get none)."""

    @staticmethod
    def forward(ctx, x, t, logp, codebook, v_chunk):
        c = x.shape[1]
        cb_sq, cb_one_t = _augment(codebook.to(x.dtype))
        logp = logp.to(x.dtype)
        acc, m = _posterior_sums(x, t, logp, cb_sq, cb_one_t, v_chunk)
        d = acc[:, :c] / acc[:, c:]
        tt = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)
        ctx.t_is_tensor = isinstance(t, torch.Tensor)
        ctx.v_chunk = v_chunk
        ctx.save_for_backward(x, tt, logp, codebook, d, m + acc[:, c].log())
        return d

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, tt, logp, codebook, d, log_z = ctx.saved_tensors
        t = tt if ctx.t_is_tensor else float(tt)
        cb_sq, cb_one_t = _augment(codebook.to(x.dtype))
        gx, glogp = _denoise_vjp(g.to(x.dtype), x, t, logp, cb_sq, cb_one_t, d, log_z, ctx.v_chunk,
                                 ctx.needs_input_grad[2])
        return gx if ctx.needs_input_grad[0] else None, None, glogp, None, None


def denoise(x: torch.Tensor, t, logp: torch.Tensor, codebook: torch.Tensor,
            v_chunk: int = V_CHUNK) -> torch.Tensor:
    """Posterior mean D(x, t) = Σ_j softmax_j(logits) c_j of the Dirac mixture: [N, C].

    x: [N, C]; t: a float, or a tensor [N] of per-row times (each 0 <= t < 1); logp: [N, V]
    log-probabilities (−inf where p = 0; every row needs some support); codebook: [V, C]. Works in x's
    dtype; reduces over V in chunks of `v_chunk` codes with an online log-sum-exp, so the working set is
    ~2·N·v_chunk numbers beyond the inputs. Differentiable in x and logp (first order): the backward
    recomputes the weights chunk by chunk (`_denoise_vjp`); t and the codebook take no gradient.
    """
    if isinstance(t, torch.Tensor):
        if t.shape != (x.shape[0],):
            raise ValueError(f"per-row times must be [N] = [{x.shape[0]}], got {tuple(t.shape)}")
        t = t.to(x.dtype)
    if torch.is_grad_enabled() and (codebook.requires_grad or (isinstance(t, torch.Tensor) and t.requires_grad)):
        raise ValueError("denoise is differentiable in x and logp only, not in t or the codebook")
    return _Denoise.apply(x, t, logp, codebook, v_chunk)


# ---- nearest code ----------------------------------------------------------------------------------
def _nearest(x: torch.Tensor, cb_sq: torch.Tensor, v_chunk: int,
             support: Optional[torch.Tensor] = None, floor: float = 0.0) -> torch.Tensor:
    """argmin_j ‖x − c_j‖² = argmin_j (‖c_j‖² − 2 x·c_j) over V chunks; ties -> the lowest index.
    With support [N, V] (probabilities, floor 0, or log-probabilities, floor −inf), codes whose entry
    is <= floor are excluded."""
    n = x.shape[0]
    xa = torch.cat([-2.0 * x, x.new_ones(n, 1)], 1)              # [N, C + 1]
    best = x.new_full((n,), math.inf)
    idx = torch.zeros(n, dtype=torch.int64, device=x.device)
    for v0 in range(0, cb_sq.shape[0], v_chunk):
        d = xa @ cb_sq[v0:v0 + v_chunk].t()                       # [N, Vc]
        if support is not None:
            d.masked_fill_(support[:, v0:v0 + v_chunk] <= floor, math.inf)
        dmin, darg = d.min(1)
        better = dmin < best                                       # strict: earlier chunk wins ties
        best = torch.where(better, dmin, best)
        idx = torch.where(better, darg + v0, idx)
    return idx


def _nearest_rows(v: int, mem_budget_mb: float, v_chunk: int = V_CHUNK, itemsize: int = 4) -> int:
    """Rows of `nearest_code` per chunk: two [rows, v_chunk] distance buffers within the budget."""
    return max(1, int(mem_budget_mb * 2**20) // (2 * min(v, v_chunk) * itemsize))


@torch.no_grad()
def nearest_code(x: torch.Tensor, codebook: torch.Tensor, probs: Optional[torch.Tensor] = None,
                 mem_budget_mb: float = 256.0, v_chunk: int = V_CHUNK) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for each x: x [N, C], codebook [V, C] -> [N] int64.

    probs: optional [N, V]; then only codes with p > 0 are candidates (the flow map's snap).
    Chunked matmul on ‖c‖² − 2x·c (never a [N, V, C] broadcast). Computes in fp32, or fp64 if x is.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    cb_sq, _ = _augment(codebook.to(device=x.device, dtype=dtype))
    rows = _nearest_rows(codebook.shape[0], mem_budget_mb, v_chunk, x.element_size())
    out = [_nearest(x[r:r + rows], cb_sq, v_chunk, None if probs is None else probs[r:r + rows].to(x.device))
           for r in range(0, x.shape[0], rows)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=x.device)


# ---- the batch map ---------------------------------------------------------------------------------
def row_bytes(v: int, c: int, v_chunk: int = V_CHUNK, itemsize: int = 4) -> int:
    """Working bytes per token row: log p [V], two [min(V, v_chunk)] logit buffers, and the solver's
    state (x, three past D, the accumulator, ε, x_aug: ~8 vectors of C + 1) plus a few scalars."""
    return itemsize * (v + 2 * min(v, v_chunk) + 8 * (c + 1) + 8)


def chunk_rows(v: int, c: int, mem_budget_mb: float, v_chunk: int = V_CHUNK, itemsize: int = 4) -> int:
    """Token rows per solve chunk so that rows·row_bytes + the augmented codebooks fit the budget."""
    fixed = itemsize * 2 * v * (c + 1)
    per_row = row_bytes(v, c, v_chunk, itemsize)
    rows = (int(mem_budget_mb * 2**20) - fixed) // per_row
    if rows < 1:
        raise ValueError(f"mem_budget_mb={mem_budget_mb} is below one token's working set "
                         f"({(fixed + per_row) / 2**20:.2f} MiB)")
    return rows


def _solve_rows(eps: torch.Tensor, probs: torch.Tensor, cb_sq: torch.Tensor, cb_one_t: torch.Tensor,
                config: FlowMapConfig, ts: torch.Tensor, v_chunk: int, snap: bool) -> torch.Tensor:
    """One chunk of token rows: eps [n, C] (compute dtype), probs [n, V] (any dtype) -> x(ts[-1]) [n, C],
    or with snap the nearest code with p > 0 to x(ts[-1])/ts[-1] [n] int64."""
    n, v = probs.shape
    logp = torch.empty(n, v, dtype=eps.dtype, device=eps.device)               # [n, V]
    for v0 in range(0, v, v_chunk):                                            # cast chunk by chunk
        torch.log(probs[:, v0:v0 + v_chunk].to(device=eps.device, dtype=eps.dtype),
                  out=logp[:, v0:v0 + v_chunk])
    if not bool((logp.amax(1) > -math.inf).all()):
        raise ValueError("every token needs some probability mass (a probs row is all zero)")

    def denoise_fn(x, t):
        return _denoise(x, t, logp, cb_sq, cb_one_t, v_chunk)

    x = dpm_solver_pp(denoise_fn, eps, ts, order=config.order, variant=config.variant,
                      lower_order_final=config.lower_order_final)
    return _nearest(x / float(ts[-1]), cb_sq, v_chunk, logp, -math.inf) if snap else x


@torch.no_grad()
def solve_flow(eps: torch.Tensor, probs: torch.Tensor, codebook: torch.Tensor,
               config: FlowMapConfig = FlowMapConfig(), *, snap: bool = False,
               v_chunk: int = V_CHUNK, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integrate every token's flow ODE: eps [..., C], probs [..., V], codebook [V, C].

    Returns x(t_end) [..., C], or with snap=True the indices [...] int64 of the nearest code to
    x(t_end)/t_end among the token's codes with p > 0 (the plain nearest code whenever the solve is
    accurate; the restriction keeps a failed solve from emitting a token the teacher cannot sample).
    Runs on probs' device in `dtype` whatever the input dtypes (fp32; fp64 only to measure rounding).
    Tokens are solved in row chunks that fit `config.mem_budget_mb`.
    """
    *lead, c = eps.shape
    v = probs.shape[-1]
    if tuple(probs.shape[:-1]) != tuple(lead) or tuple(codebook.shape) != (v, c):
        raise ValueError(f"shape mismatch: eps {tuple(eps.shape)}, probs {tuple(probs.shape)}, "
                         f"codebook {tuple(codebook.shape)} (want [..., C], [..., V], [V, C])")
    dev = probs.device
    eps2 = eps.reshape(-1, c).to(device=dev, dtype=dtype)                      # [N, C]
    probs2 = probs.reshape(-1, v)                                               # [N, V] (a view if contiguous)
    cb_sq, cb_one_t = _augment(codebook.to(device=dev, dtype=dtype))
    ts = config.timesteps(code_spread(codebook))
    rows = chunk_rows(v, c, config.mem_budget_mb, v_chunk, eps2.element_size())
    outs = []
    for r in range(0, eps2.shape[0], rows):
        outs.append(_solve_rows(eps2[r:r + rows], probs2[r:r + rows], cb_sq, cb_one_t, config, ts, v_chunk, snap))
    if snap:
        return torch.cat(outs).reshape(lead) if outs else torch.zeros(lead, dtype=torch.int64, device=dev)
    return torch.cat(outs).reshape(*lead, c) if outs else eps2.reshape(*lead, c)


def flow_map(eps: torch.Tensor, probs: torch.Tensor, codebook: torch.Tensor,
             config: FlowMapConfig = FlowMapConfig()) -> torch.Tensor:
    """The DD flow map: eps [B, k, C], probs [B, k, V], codebook [V, C] -> idx [B, k] int64.

    idx is distributed as probs (up to solver error) when eps ~ N(0, I), and is a deterministic function
    of (eps, probs): the same token gets the same index whatever batch it is solved in.
    """
    return solve_flow(eps, probs, codebook, config, snap=True)


# ---- reference solve (tests, bench) ----------------------------------------------------------------
def _ref_rhs(codes: np.ndarray, logp: np.ndarray, csq: np.ndarray):
    def rhs(t, x):
        a = t / (1.0 - t) ** 2
        lg = logp + a * (codes @ x) - 0.5 * a * t * csq
        w = np.exp(lg - lg.max())
        d = (w @ codes) / w.sum()
        return (d - x) / (1.0 - t)
    return rhs


def reference_flow_map(eps, probs, codebook, t_start: float = 0.0, t_end: float = 1.0 - 1e-3,
                       rtol: float = 1e-10, return_x: bool = False, progress: bool = False):
    """Float64 DOP853 solve of dx/dt = (D(x, t) − x)/(1 − t) from x(t_start) = eps, snapped like
    `flow_map`. For a handful of tokens (one scipy solve each). t_start = 0 gives the exact map.

    eps [..., C], probs [..., V], codebook [V, C] (tensors or arrays) -> idx [...] int64 tensor
    (and x(t_end) [..., C] float64 with return_x=True). progress: a tqdm bar over the tokens.
    """
    from scipy.integrate import solve_ivp
    from tqdm import tqdm

    eps_np = np.asarray(torch.as_tensor(eps).detach().cpu(), dtype=np.float64)
    probs_np = np.asarray(torch.as_tensor(probs).detach().cpu(), dtype=np.float64)
    cb = np.asarray(torch.as_tensor(codebook).detach().cpu(), dtype=np.float64)
    lead, c = eps_np.shape[:-1], eps_np.shape[-1]
    eps_np, probs_np = eps_np.reshape(-1, c), probs_np.reshape(-1, cb.shape[0])
    xs = np.empty_like(eps_np)
    idx = np.empty(len(eps_np), dtype=np.int64)
    for i in tqdm(range(eps_np.shape[0]), desc="DOP853 reference", disable=not progress, leave=False):
        sup = np.flatnonzero(probs_np[i] > 0)                     # only the support matters
        codes = cb[sup]
        rhs = _ref_rhs(codes, np.log(probs_np[i, sup]), (codes * codes).sum(1))
        sol = solve_ivp(rhs, (t_start, t_end), eps_np[i], method="DOP853", rtol=rtol, atol=rtol)
        if not sol.success:
            raise RuntimeError(f"reference solve failed on token {i}: {sol.message}")
        xs[i] = sol.y[:, -1]
        idx[i] = sup[((codes - xs[i] / t_end) ** 2).sum(1).argmin()]   # snap within the support, as flow_map
    idx = torch.from_numpy(idx).reshape(lead)
    return (idx, torch.from_numpy(xs.reshape(*lead, c))) if return_x else idx
