"""DD2's CSD losses (distilled_decoding/csd.py): the surrogate's gradient is ω(τ)·(s_fake − s_real) through
x_τ, the guidance loss's minimiser is the generator's score, the teacher sees the prefix without gradient;
and on a two-token AR teacher CSD drives the generator's joint distribution far below onestep*'s
total variation (tests/csd_toy.py)."""
import pytest
import torch

from distilled_decoding.csd import (WEIGHTS, CSDConfig, diffuse, generator_loss, guidance_loss, sample_tau,
                                    score_from_velocity, teacher_score)
from distilled_decoding.dd2_score import conditional_score

from csd_toy import ToyConfig, train


def test_tau_draws_stay_in_range_and_follow_the_config():
    g = torch.Generator().manual_seed(0)
    for cfg in (CSDConfig(), CSDConfig(tau_dist="uniform", tau_min=0.1, tau_max=0.9)):
        tau = sample_tau((4000, 3), cfg, generator=g)
        assert tau.shape == (4000, 3) and tau.min() >= cfg.tau_min and tau.max() <= cfg.tau_max
    u = sample_tau((20000,), CSDConfig(tau_dist="uniform"), generator=g)
    assert abs(u.mean().item() - 0.5) < 0.01
    ln = sample_tau((20000,), CSDConfig(tau_dist="logit_normal", logit_mean=-1.0, logit_std=1.5), generator=g)
    assert abs(torch.logit(ln).median().item() + 1.0) < 0.05
    with pytest.raises(ValueError, match="tau_dist"):
        CSDConfig(tau_dist="beta")
    with pytest.raises(ValueError, match="weight"):
        CSDConfig(weight="snr")


def test_generator_loss_gradient_is_the_weighted_score_difference():
    g = torch.Generator().manual_seed(1)
    b, n, c = 4, 3, 2
    x0 = torch.randn(b, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    tau = torch.rand(b, n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    s_fake, s_real = (torch.randn(b, n, c, generator=g, dtype=torch.float64) for _ in range(2))
    for name, w in WEIGHTS.items():
        x_tau = diffuse(x0, tau, eps)
        loss = generator_loss(x_tau, s_fake, s_real, tau, CSDConfig(weight=name))
        grad, = torch.autograd.grad(loss, x0)
        want = w(tau)[..., None] * (s_fake - s_real) * (1 - tau)[..., None] / b     # ∂x_τ/∂x0 = 1 − τ
        assert torch.allclose(grad, want, atol=1e-12), name
    # "denoiser": the gradient reaching x0 is (1 − τ)(D_fake − D_real) / B, D from s = ((1 − τ)D − x)/τ²
    x_tau = diffuse(x0, tau, eps).detach()
    d_fake, d_real = (torch.randn(b, n, c, generator=g, dtype=torch.float64) for _ in range(2))
    t = tau[..., None]
    sf, sr = ((1 - t) * d_fake - x_tau) / t ** 2, ((1 - t) * d_real - x_tau) / t ** 2
    grad, = torch.autograd.grad(generator_loss(diffuse(x0, tau, eps), sf, sr, tau), x0)
    assert torch.allclose(grad, (1 - t) * (d_fake - d_real) / b, atol=1e-10)


def test_guidance_loss_minimiser_is_the_generators_score():
    """For a generator whose samples are a Dirac mixture, the velocity that minimises the flow-matching
    loss at x_τ is E[ε − x0 | x_τ] = E[(x_τ − x0)/τ | x_τ], and score_from_velocity of it is the exact
    mixture score (conditional_score). Checked in closed form and by the loss itself (Monte Carlo)."""
    g = torch.Generator().manual_seed(2)
    v, c, tau0 = 5, 2, 0.4
    cb = torch.randn(v, c, generator=g, dtype=torch.float64)
    logp = torch.randn(v, generator=g, dtype=torch.float64).log_softmax(0)
    x_tau = torch.randn(1, 1, c, generator=g, dtype=torch.float64) * 0.5
    tau = torch.tensor([[tau0]], dtype=torch.float64)
    post = (logp - ((x_tau[0, 0] - (1 - tau0) * cb) ** 2).sum(1) / (2 * tau0 ** 2)).softmax(0)   # p(c_j | x_τ)
    v_star = (post[:, None] * (x_tau[0, 0] - cb) / tau0).sum(0)
    exact = conditional_score(x_tau, tau, logp[None, None], cb)
    assert torch.allclose(score_from_velocity(x_tau, v_star[None, None], tau), exact, atol=1e-10)
    # the loss's own minimiser: draws (x0, ε) whose x_τ is the same point, weighted by the posterior
    m = 100000
    idx = torch.multinomial(post, m, replacement=True, generator=g)
    x0 = cb[idx][:, None]                                                  # [m, 1, C]
    eps = (x_tau - (1 - tau0) * x0) / tau0                                 # each lands on x_τ
    assert torch.allclose(diffuse(x0, tau.expand(m, 1), eps), x_tau.expand(m, 1, c))
    best = v_star[None, None].expand(m, 1, c)
    for d in (0.05, -0.05):
        assert guidance_loss(best, x0, eps) < guidance_loss(best + d, x0, eps)


def test_teacher_score_sees_the_prefix_without_gradient():
    g = torch.Generator().manual_seed(3)
    v, c = 6, 2
    cb = torch.randn(v, c, generator=g)
    seen = {}

    def teacher_logp(x0):                                   # position i depends on x0_<i
        seen["grad"] = x0.requires_grad or torch.is_grad_enabled()
        first = torch.zeros(x0.shape[0], 1, v)
        rest = (x0[:, :-1] @ cb.t())
        return torch.cat([first, rest], 1).log_softmax(-1)

    x0 = torch.randn(2, 3, c, generator=g, requires_grad=True)
    tau = torch.full((2, 3), 0.5)
    x_tau = diffuse(x0, tau, torch.randn(2, 3, c, generator=g))
    s = teacher_score(x0, x_tau, tau, teacher_logp, cb)
    assert not seen["grad"] and not s.requires_grad
    want = conditional_score(x_tau.detach(), tau, teacher_logp(x0.detach()), cb)
    assert torch.allclose(s, want)


def test_csd_drives_the_joint_toward_a_two_token_teacher():
    """The toy proof (tests/csd_toy.py; measured over seeds in docs/dd2.md): TV to the teacher's joint
    falls from the initial generator's to well below onestep*'s (independent per-position marginals)."""
    torch.set_num_threads(1)
    r = train(ToyConfig(), seed=0)
    assert r["tv_onestep"] > 0.6
    assert r["tv_end"] < 0.5 * r["tv_onestep"], r
    assert r["tv_end"] < 0.5 * r["tv_start"], r
