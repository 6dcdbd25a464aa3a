"""Multistep DPM-Solver++ (data prediction, orders 1-3) on the flow-matching schedule.

Schedule (t = 0 noise, t = 1 data): x_t = t·x1 + (1 − t)·x0, so α(t) = t, σ(t) = 1 − t and
λ(t) = log(α/σ) = log t − log(1 − t) (= logit t, inverse t = sigmoid λ). λ increases towards the data.
With a data prediction D(x, t) ≈ E[x1 | x_t = x] the probability-flow ODE is the semilinear

    dx/dλ = −t·x + t·D(x, t)        (d log σ / dλ = −t, α = t),

whose variation-of-constants solution is x_i = (σ_i/σ_{i−1})·x_{i−1} + σ_i ∫ e^λ D dλ. Expanding D in λ
around λ_{i−1} gives the DPM-Solver++ updates (Lu et al. 2022, arXiv:2211.01095), with h = λ_i − λ_{i−1},
φ1 = expm1(−h), φ2 = φ1/h + 1, φ3 = φ2/h − 1/2 and the exact integrals

    σ_i ∫ e^λ (λ − λ_{i−1})^k / k! dλ = α_i·(−φ1, h·φ2, −h²·φ3)   for k = 0, 1, 2.

The multistep order-3 update approximates D' and D'' by divided differences: D1 ≈ h·D', D2 ≈ h²·D''/2,
so the D'' term is −α_i h² φ3 D'' = −2·α_i φ3 D2. The official code (LuChengTHU/dpm-solver @52bc3fb,
`multistep_dpm_solver_third_update`) uses −α_i φ3 D2, which makes its "order 3" only second order.
`variant="exact"` (default) uses 2·φ3; `variant="official"` reproduces the released coefficient.
Order 1 and 2 are identical in both variants (order 2 is the official default 'dpmsolver' form
−½ α_i φ1 D1_0). Step 1 is order 1, step 2 order ≤ 2, then `order`; NFE = len(ts) − 1, as the
official multistep sampler. `lower_order_final=True` drops the last two steps to orders 1 and 2
(the official flag, which the official code honours only below 10 steps; here it is honoured always).
The order-1 first step bounds the global order at 2 whatever `order` is, as in the official code.

Everything is a pure function over tensors, k-diffusion style: `denoise_fn(x, t) -> D` with t a Python
float. Step coefficients are computed in float64 from the times; x keeps its dtype and device.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

SPACINGS = ("logsnr", "time_uniform", "time_quadratic")
VARIANTS = ("exact", "official")


def lambda_of_t(t: float) -> float:
    """λ = log t − log(1 − t), computed with log1p so it stays exact near t = 1 and t = 0."""
    return math.log(t) - math.log1p(-t)


def t_of_lambda(lam: float) -> float:
    """Inverse of `lambda_of_t`: t = sigmoid(λ), written so that it never overflows."""
    if lam >= 0:
        return 1.0 / (1.0 + math.exp(-lam))
    e = math.exp(lam)
    return e / (1.0 + e)


def timesteps(nfe: int, t_start: float = 1e-3, t_end: float = 1.0 - 1e-3,
              spacing: str = "time_quadratic", log_scale: float = 0.0) -> torch.Tensor:
    """The nfe + 1 solver times from t_start (noise side) to t_end (data side): float64 [nfe + 1].

    log_scale: shift every λ of the grid by −log_scale (t_start and t_end included), i.e. place the grid
    for data of scale e^{log_scale} where it would sit for data of scale 1. Scaling the data by k maps the
    ODE's solution x_t to k·x_t at λ − log k (x_t/t = x1 + e^{−λ}·x0), so a grid shifted by log k solves
    the scaled problem exactly as the unscaled one. 0 leaves the grid untouched (bit for bit).

    spacing (the official `skip_type`s, read in DPM time τ = 1 − t, where the official code runs from
    τ = T (noise) down to τ = t_0 (data)):
      "logsnr":         uniform in λ;
      "time_uniform":   uniform in t;
      "time_quadratic": uniform in √τ, i.e. τ = (linspace(√(1 − t_start), √(1 − t_end)))², so the steps
                        are dense near the data end t = 1 (as the official 'time_quadratic').
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if not 0.0 < t_start < t_end < 1.0:
        raise ValueError(f"need 0 < t_start < t_end < 1, got t_start={t_start}, t_end={t_end}")
    if spacing == "logsnr":
        lams = torch.linspace(lambda_of_t(t_start), lambda_of_t(t_end), nfe + 1, dtype=torch.float64)
        ts = torch.sigmoid(lams)
    elif spacing == "time_uniform":
        ts = torch.linspace(t_start, t_end, nfe + 1, dtype=torch.float64)
    elif spacing == "time_quadratic":
        sq = torch.linspace(math.sqrt(1.0 - t_start), math.sqrt(1.0 - t_end), nfe + 1, dtype=torch.float64)
        ts = 1.0 - sq * sq
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose from {SPACINGS}")
    ts[0], ts[-1] = t_start, t_end  # exact end points whatever the rounding of the map back to t
    if log_scale:
        ts = torch.sigmoid(torch.log(ts) - torch.log1p(-ts) - log_scale)
    return ts


def multistep_update(x: torch.Tensor, t_prev: Sequence[float], d_prev: Sequence[torch.Tensor],
                     t_next: float, order: int, variant: str = "exact") -> torch.Tensor:
    """One multistep DPM-Solver++ step from t_prev[-1] to t_next.

    x: the state at t_prev[-1]; t_prev / d_prev: the last `order` times (oldest first, increasing) and
    the data predictions D made there (same shape as x). Returns the state at t_next.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if len(t_prev) < order or len(d_prev) < order:
        raise ValueError(f"an order-{order} step needs {order} previous values, got {len(d_prev)}")
    t0 = t_prev[-1]
    lam0, lam_next = lambda_of_t(t0), lambda_of_t(t_next)
    h = lam_next - lam0
    alpha = t_next
    phi1 = math.expm1(-h)                          # e^{−h} − 1, exact for small h
    m0 = d_prev[-1]
    # (σ_i/σ_{i−1}) x − α_i φ1 m0: the order-1 (DDIM / rectified-flow Euler) part.
    out = x * ((1.0 - t_next) / (1.0 - t0)) - (alpha * phi1) * m0
    if order == 1:
        return out
    m1 = d_prev[-2]
    h0 = lam0 - lambda_of_t(t_prev[-2])
    r0 = h0 / h
    d1_0 = (m0 - m1) * (1.0 / r0)                 # ≈ h·D'
    if order == 2:
        return out - (0.5 * alpha * phi1) * d1_0
    m2 = d_prev[-3]
    h1 = lambda_of_t(t_prev[-2]) - lambda_of_t(t_prev[-3])
    r1 = h1 / h
    d1_1 = (m1 - m2) * (1.0 / r1)
    d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))  # ≈ h·D' + O(h³)
    d2 = (d1_0 - d1_1) * (1.0 / (r0 + r1))        # ≈ h²·D''/2
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    c3 = 2.0 * phi3 if variant == "exact" else phi3
    return out + (alpha * phi2) * d1 - (alpha * c3) * d2


@torch.no_grad()
def dpm_solver_pp(denoise_fn: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor,
                  ts: Union[torch.Tensor, Sequence[float]], order: int = 3, variant: str = "exact",
                  lower_order_final: bool = False,
                  callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """Integrate dx/dλ = t·(D(x, t) − x) from ts[0] to ts[-1] with multistep DPM-Solver++.

    denoise_fn(x, t) -> D, same shape as x, t a Python float in (0, 1). ts: increasing times in (0, 1)
    (see `timesteps`). NFE = len(ts) − 1 (the state at ts[-1] is never denoised). Step orders are
    min(order, i + 1), and with lower_order_final also at most len(ts) − 1 − i (last step order 1).
    callback({"i", "t", "x", "denoised"}) is called after each model evaluation, k-diffusion style.
    """
    ts = [float(t) for t in (ts.tolist() if isinstance(ts, torch.Tensor) else ts)]
    if len(ts) < 2:
        raise ValueError("ts needs at least two times")
    if any(b <= a for a, b in zip(ts, ts[1:])) or not 0.0 < ts[0] or not ts[-1] < 1.0:
        raise ValueError("ts must increase strictly inside (0, 1)")
    t_hist, d_hist = [], []
    steps = len(ts) - 1
    for i in range(steps):
        d = denoise_fn(x, ts[i])
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "denoised": d})
        t_hist, d_hist = (t_hist + [ts[i]])[-order:], (d_hist + [d])[-order:]
        step_order = min(order, i + 1, steps - i) if lower_order_final else min(order, i + 1)
        x = multistep_update(x, t_hist, d_hist, ts[i + 1], step_order, variant)
    return x
