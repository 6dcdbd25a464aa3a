"""DD2's teacher conditional score: the exact score of the teacher's next-token distribution, smoothed.

DD2 (Liu et al., NeurIPS 2025, §3.2.1) puts every token on the rectified-flow path of its own time τ,

    q^τ = (1 − τ)·q + τ·ε,     ε ~ N(0, I),   τ = 0 data, τ = 1 noise,

and, given a clean prefix q_<i, reads the teacher's next-token probabilities p over the codebook {c_j} as
the Dirac mixture Σ_j p_j δ(c_j). Smoothed along the path that is the Gaussian mixture
p_τ(x) = Σ_j p_j N(x; (1 − τ)·c_j, τ² I), whose score is exact:

    ∇_x log p_τ(x) = ((1 − τ)·E[c | x] − x) / τ²,

with E[c | x] the posterior mean over the codebook. That posterior is the one the DD flow map integrates
(`flowmap.denoise`), whose time runs the other way: flowmap's t = 1 − τ (x_t = t·x1 + (1 − t)·x0, t = 1
data). So the score is one call of `denoise` with per-row times t = 1 − τ_i, chunked over V the same way,
and differentiable in x and log p through `denoise`'s recomputing backward.

`conditional_score` is the teacher score s_Φ(q_i^τ, τ_i | q_<i) for a batch of sequences once the caller
has the teacher's log-probabilities at each position (conditioned on whatever prefix it chose: DD2 uses the
generator's own output with stop-gradient, see `csd.py`); `conditional_velocity` is the same quantity as
the velocity E[ε − x0 | x_τ] that DD2's networks predict (the GTS initialisation's regression target).
"""
from __future__ import annotations

import torch

from .flowmap import V_CHUNK, denoise


def _posterior_mean(x: torch.Tensor, tau: torch.Tensor, logp: torch.Tensor, codebook: torch.Tensor,
                    v_chunk: int) -> tuple:
    """(E[c | x_τ] [B, n, C], τ [B, n, 1] in x's dtype) after the shape and range checks."""
    b, n, c = x.shape
    v = codebook.shape[0]
    if tuple(tau.shape) != (b, n) or tuple(logp.shape) != (b, n, v) or codebook.shape[1] != c:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, tau {tuple(tau.shape)}, logp {tuple(logp.shape)}, "
                         f"codebook {tuple(codebook.shape)} (want [B, n, C], [B, n], [B, n, V], [V, C])")
    if tau.requires_grad:
        raise ValueError("conditional_score takes no gradient w.r.t. tau")
    tau = tau.to(x.dtype)
    if not bool(((tau > 0) & (tau <= 1)).all()):
        raise ValueError("tau must lie in (0, 1] (τ = 0 is the data itself, where the score is undefined)")
    d = denoise(x.reshape(b * n, c), 1.0 - tau.reshape(b * n), logp.reshape(b * n, v), codebook, v_chunk)
    return d.reshape(b, n, c), tau[..., None]


def conditional_score(x: torch.Tensor, tau: torch.Tensor, logp: torch.Tensor, codebook: torch.Tensor,
                      v_chunk: int = V_CHUNK) -> torch.Tensor:
    """∇_x log p_τ(x) per position: x [B, n, C], tau [B, n] in (0, 1], logp [B, n, V] (−inf where
    p = 0), codebook [V, C] -> [B, n, C] in x's dtype.

    p_τ at position i is Σ_j p_ij N((1 − τ_i)·c_j, τ_i² I) (DD2's path, τ = 1 noise). Differentiable in x
    and logp (first order); tau and the codebook take no gradient. No [B·n, V] buffer beyond logp itself
    and two [B·n, v_chunk] chunks (the gradient w.r.t. logp, when asked, is [B, n, V]).
    """
    d, tau = _posterior_mean(x, tau, logp, codebook, v_chunk)
    return ((1.0 - tau) * d - x) / (tau * tau)


def conditional_velocity(x: torch.Tensor, tau: torch.Tensor, logp: torch.Tensor, codebook: torch.Tensor,
                         v_chunk: int = V_CHUNK) -> torch.Tensor:
    """The same teacher conditional as a velocity, E[ε − x0 | x_τ] = (x − E[c | x])/τ (what DD2's networks
    predict, App. E.1; `csd.score_from_velocity` maps it back to `conditional_score`). Shapes and
    gradients as `conditional_score`; finite at τ = 1, where it is x − Σ_j p_j c_j."""
    d, tau = _posterior_mean(x, tau, logp, codebook, v_chunk)
    return (x - d) / tau


def gaussian_mixture_log_density(x: torch.Tensor, tau: torch.Tensor, logp: torch.Tensor,
                                 codebook: torch.Tensor) -> torch.Tensor:
    """log p_τ(x) of the smoothed Dirac mixture, dense over V (tests and small problems only):
    x [B, n, C], tau [B, n], logp [B, n, V], codebook [V, C] -> [B, n]. `conditional_score` is its
    gradient in x."""
    c = x.shape[-1]
    tau = tau.to(x.dtype)[..., None]                                       # [B, n, 1]
    d2 = (x[..., None, :] - (1.0 - tau)[..., None] * codebook).pow(2).sum(-1)   # [B, n, V]
    return torch.logsumexp(logp - d2 / (2.0 * tau * tau), -1) - c * torch.log(tau[..., 0]) \
        - 0.5 * c * torch.log(torch.tensor(2.0 * torch.pi, dtype=x.dtype))
