"""DD2's conditional score distillation (CSD): the losses of the one-step generator and of its guidance
network, as small pure functions over tensors (the networks and the loop are the caller's).

Setting (DD2 §3.2.2–3.2.3). A generator maps noise to a whole sequence of token embeddings x0 [B, n, C] in
one forward. At every position i, a time τ_i and noise ε_i put its token on the path
x_τ = (1 − τ)·x0 + τ·ε (τ = 0 data, τ = 1 noise; `diffuse`). Two scores are compared there:
- the teacher's, s_real = `dd2_score.conditional_score` of the teacher's next-token distribution given the
  generator's own prefix x0_<i with stop-gradient (`teacher_score`);
- the guidance ("fake") network's, s_fake ≈ the score of the generator's own conditional distribution at
  position i given the same prefix, trained by flow matching on the generator's detached samples
  (`guidance_loss`), K updates per generator update.
The generator's loss (`generator_loss`) is the score-distillation surrogate whose gradient is
Σ_i ω(τ_i)·(s_fake − s_real)ᵀ ∂x_τ,i/∂θ: the gradient of the per-position KL between the generator's
and the teacher's smoothed conditionals. Summed over positions, with the prefix held fixed, the optimum
is the teacher's joint distribution (DD2's Prop. 1).

What the paper leaves open, chosen here (defaults in `CSDConfig`; measured on the toy teacher of
tests/csd_toy.py, numbers in docs/dd2.md; to be re-chosen on the digits teachers):
- τ = sigmoid(N(−1, 1.5²)) per position, clipped to [0.02, 0.98] ("logit_normal"; median 0.27), or
  U[tau_min, tau_max] ("uniform"). On the toy the generator snaps to codes only from the small-τ part
  (below τ ≈ 0.15 the descent direction points at the nearest code) while the dependence on the prefix is
  taught at τ ≈ 0.3–0.9; the logit-normal draw gives both, and beat uniform on the toy;
- ω(τ) = τ²/(1 − τ) ("denoiser"): with ∂x_τ/∂x0 = (1 − τ) the gradient reaching x0 is then
  (1 − τ)·(D_fake − D_real), the difference of the two posterior means in data units, and a velocity
  error δv of the guidance network moves it by only τ·δv. "unit" (ω = 1, the plain KL gradient) weighs
  small τ by 1/τ²: on the toy it collapsed the generator onto one code.
The GTS initialisation (§3.3, Eq. 6; `gts_loss`) regresses a network's velocity on the teacher's
analytic one (`dd2_score.conditional_velocity`) on teacher-generated sequences, before CSD.
Parameterisation (App. E.1): networks predict the velocity v = ε − x0 of the path; `score_from_velocity`
turns a prediction into a score, s = −(x_τ + (1 − τ)·v)/τ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .dd2_score import conditional_score, conditional_velocity
from .flowmap import V_CHUNK

TAU_DISTS = ("uniform", "logit_normal")
WEIGHTS = {
    "denoiser": lambda tau: tau * tau / (1.0 - tau),
    "unit": lambda tau: torch.ones_like(tau),
}


@dataclass(frozen=True)
class CSDConfig:
    """How CSD draws its times and weighs its positions (the paper is silent on both)."""

    tau_dist: str = "logit_normal"   # "logit_normal" | "uniform" on [tau_min, tau_max]
    tau_min: float = 0.02
    tau_max: float = 0.98
    logit_mean: float = -1.0         # logit_normal only: τ = sigmoid(N(logit_mean, logit_std²)), clipped
    logit_std: float = 1.5
    weight: str = "denoiser"         # ω(τ), a key of WEIGHTS
    guidance_steps: int = 5          # K guidance updates per generator update (DD2: 5, 2 after alignment)

    def __post_init__(self):
        if self.tau_dist not in TAU_DISTS:
            raise ValueError(f"unknown tau_dist {self.tau_dist!r}; choose from {TAU_DISTS}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"unknown weight {self.weight!r}; choose from {tuple(WEIGHTS)}")
        if not 0.0 < self.tau_min < self.tau_max < 1.0:
            raise ValueError(f"need 0 < tau_min < tau_max < 1, got {self.tau_min}, {self.tau_max}")
        if self.guidance_steps < 1:
            raise ValueError(f"guidance_steps must be >= 1, got {self.guidance_steps}")


def tau_options(f: Callable) -> Callable:
    """The τ-draw options of `dd csd train` and `dd csd init` (CSDConfig's fields and defaults)."""
    import click

    d = CSDConfig()
    for opt in reversed((
            click.option("--tau-dist", type=click.Choice(list(TAU_DISTS)), default=d.tau_dist, show_default=True),
            click.option("--tau-min", default=d.tau_min, show_default=True, type=float),
            click.option("--tau-max", default=d.tau_max, show_default=True, type=float),
            click.option("--logit-mean", default=d.logit_mean, show_default=True, type=float),
            click.option("--logit-std", default=d.logit_std, show_default=True, type=float))):
        f = opt(f)
    return f


def sample_tau(shape, config: CSDConfig = CSDConfig(), *, generator: Optional[torch.Generator] = None,
               device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-position times [*shape] in [tau_min, tau_max], drawn as `config.tau_dist` says."""
    if config.tau_dist == "uniform":
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return config.tau_min + (config.tau_max - config.tau_min) * u
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.sigmoid(config.logit_mean + config.logit_std * z).clamp(config.tau_min, config.tau_max)


def diffuse(x0: torch.Tensor, tau: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_τ = (1 − τ)·x0 + τ·ε: x0, eps [B, n, C], tau [B, n] -> [B, n, C]."""
    tau = tau.to(x0.dtype)[..., None]
    return (1.0 - tau) * x0 + tau * eps


def score_from_velocity(x_tau: torch.Tensor, v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Score of a velocity prediction v ≈ E[ε − x0 | x_τ]: −(x_τ + (1 − τ)·v)/τ (= −E[ε | x_τ]/τ).
    x_tau, v [B, n, C], tau [B, n] -> [B, n, C]."""
    tau = tau.to(x_tau.dtype)[..., None]
    return -(x_tau + (1.0 - tau) * v) / tau


def teacher_score(x0: torch.Tensor, x_tau: torch.Tensor, tau: torch.Tensor,
                  teacher_logp: Callable[[torch.Tensor], torch.Tensor], codebook: torch.Tensor,
                  v_chunk: int = V_CHUNK) -> torch.Tensor:
    """s_real [B, n, C]: the teacher's conditional score at x_tau given the generator's own prefix.

    teacher_logp(x0) -> [B, n, V]: the teacher's next-token log-probabilities at every position given
    x0_<i (teacher forcing on the generator's sequence, however the teacher reads embeddings). It is
    called on x0.detach() without gradient: DD2's stop-gradient on the prefix.
    """
    with torch.no_grad():
        logp = teacher_logp(x0.detach())
        return conditional_score(x_tau.detach(), tau, logp, codebook, v_chunk)


def generator_loss(x_tau: torch.Tensor, s_fake: torch.Tensor, s_real: torch.Tensor, tau: torch.Tensor,
                   config: CSDConfig = CSDConfig()) -> torch.Tensor:
    """The CSD surrogate: scalar whose gradient w.r.t. the generator is
    mean_b Σ_i ω(τ_bi)·(s_fake − s_real)_biᵀ ∂x_τ,bi/∂θ. x_tau [B, n, C] carries the generator's graph;
    s_fake, s_real [B, n, C] and tau [B, n] are treated as constants."""
    w = WEIGHTS[config.weight](tau.detach().to(x_tau.dtype))[..., None]      # [B, n, 1]
    grad = (w * (s_fake.detach() - s_real.detach())).to(x_tau.dtype)
    return (x_tau * grad).sum() / x_tau.shape[0]


def guidance_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow matching on the generator's detached samples: mean_b Σ_i ‖v_pred − (ε − x0)‖²
    (v_pred [B, n, C] from the guidance network at diffuse(x0.detach(), τ, ε)); its minimiser's
    `score_from_velocity` is the score of the generator's smoothed conditionals."""
    return (v_pred - (eps - x0.detach())).pow(2).sum() / v_pred.shape[0]


def gts_target(x_tau: torch.Tensor, tau: torch.Tensor, logp: torch.Tensor, codebook: torch.Tensor,
               v_chunk: int = V_CHUNK) -> torch.Tensor:
    """The GTS regression target [B, n, C]: the teacher's analytic velocity v_Φ(x_τ, τ | prefix)
    (`dd2_score.conditional_velocity`, no gradient). x_tau [B, n, C]; tau [B, n] in (0, 1]; logp [B, n, V]:
    the teacher's log-probabilities at every position given the sequence's own (teacher-generated) prefix."""
    with torch.no_grad():
        return conditional_velocity(x_tau.detach(), tau, logp, codebook, v_chunk)


def gts_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """DD2's GTS loss (§3.3, Eq. 6), regressing the analytic teacher score, here in velocity units:
    mean_b Σ_i ‖v_pred − v_target‖² (v_target = `gts_target`; both [B, n, C]).

    The paper's weighting is not legible (dd2-facts.md). Velocity units are the guidance network's
    flow-matching units, so the init hands CSD a head already on its loss's scale, and stay finite at
    τ = 1, the generator's time (a score error is a velocity error times (1 − τ)/τ: unweighted score
    units would give τ = 1 no weight at all)."""
    return (v_pred - v_target.detach().to(v_pred.dtype)).pow(2).sum() / v_pred.shape[0]
