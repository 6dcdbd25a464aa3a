"""DD2's teacher conditional score (distilled_decoding/dd2_score.py): the exact gradient of the smoothed
Dirac-mixture log-density at per-position times, on both codebook kinds; autograd through it; V chunking."""
import math

import pytest
import torch

from distilled_decoding.dd2_score import conditional_score, gaussian_mixture_log_density
from distilled_decoding.flowmap import denoise, posterior_logits

B, N, C, V = 3, 4, 4, 12


def _codebook(kind: str, v: int = V, c: int = C, seed: int = 0) -> torch.Tensor:
    """'l2': l2-normalised rows (LlamaGen's VQ); 'raw': unnormalised N(0, 2²) rows (VAR's)."""
    cb = torch.randn(v, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(cb, dim=1) if kind == "l2" else 2.0 * cb


def _problem(kind: str, seed: int = 1):
    """x, tau, logp (a third of each row's codes at p = 0), codebook; float64."""
    g = torch.Generator().manual_seed(seed)
    cb = _codebook(kind)
    logits = 2.0 * torch.randn(B, N, V, generator=g, dtype=torch.float64)
    drop = torch.rand(B, N, V, generator=g).argsort(-1) < V // 3
    logp = logits.masked_fill(drop, -math.inf).log_softmax(-1)
    tau = 0.15 + 0.8 * torch.rand(B, N, generator=g, dtype=torch.float64)          # per position
    x0 = cb[torch.multinomial(logp.exp().reshape(-1, V), 1, generator=g)].reshape(B, N, C)
    x = (1 - tau[..., None]) * x0 + tau[..., None] * torch.randn(B, N, C, generator=g, dtype=torch.float64)
    return x, tau, logp, cb


@pytest.mark.parametrize("kind", ["l2", "raw"])
def test_score_is_the_gradient_of_the_mixture_log_density(kind):
    x, tau, logp, cb = _problem(kind)
    s = conditional_score(x, tau, logp, cb)
    h = 1e-6
    fd = torch.empty_like(x)
    for k in range(C):                           # central differences, every position at once
        e = torch.zeros_like(x)
        e[..., k] = h
        fd[..., k] = (gaussian_mixture_log_density(x + e, tau, logp, cb)
                      - gaussian_mixture_log_density(x - e, tau, logp, cb)) / (2 * h)
    assert s.shape == (B, N, C) and s.dtype == torch.float64
    assert (s - fd).abs().max() <= 1e-4 * max(1.0, fd.abs().max().item()), (s - fd).abs().max()
    # the same through autograd on the dense density, and per-position τ really is per position
    xr = x.clone().requires_grad_(True)
    auto, = torch.autograd.grad(gaussian_mixture_log_density(xr, tau, logp, cb).sum(), xr)
    assert torch.allclose(s, auto, atol=1e-9, rtol=1e-9)
    tau_one = tau.clone()
    tau_one[:, 1:] = tau[:, :1]
    assert not torch.allclose(conditional_score(x, tau_one, logp, cb)[:, 1:], s[:, 1:])


def test_gradients_flow_through_the_score():
    g = torch.Generator().manual_seed(3)
    for kind in ("l2", "raw"):
        cb = _codebook(kind, v=5, c=2)
        x = torch.randn(1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
        logp = torch.randn(1, 2, 5, generator=g, dtype=torch.float64).log_softmax(-1).requires_grad_(True)
        tau = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda x, lp: conditional_score(x, tau, lp, cb, v_chunk=2), (x, logp))
    # backward through a loss, the way a generator sees it; no gradient w.r.t. tau is promised
    x, tau, logp, cb = _problem("raw", seed=4)
    xr = x.clone().requires_grad_(True)
    conditional_score(xr, tau, logp, cb).pow(2).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tau"):
        conditional_score(x, tau.clone().requires_grad_(True), logp, cb)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        conditional_score(x, tau * 0, logp, cb)


@pytest.mark.parametrize("kind", ["l2", "raw"])
def test_chunking_over_v_changes_nothing(kind):
    x, tau, logp, cb = _problem(kind, seed=5)
    outs = []
    for chunk in (V, 5, 1):
        xr, lr = x.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        s = conditional_score(xr, tau, lr, cb, v_chunk=chunk)
        w = torch.randn(s.shape, generator=torch.Generator().manual_seed(6), dtype=s.dtype)
        gx, gl = torch.autograd.grad((s * w).sum(), (xr, lr))
        outs.append((s.detach(), gx, gl))
    for s, gx, gl in outs[1:]:
        assert torch.allclose(s, outs[0][0], atol=1e-10, rtol=1e-10)
        assert torch.allclose(gx, outs[0][1], atol=1e-8, rtol=1e-8)
        assert torch.allclose(gl, outs[0][2], atol=1e-8, rtol=1e-8)
    # p = 0 codes carry only the flow map's weight floor (e^-80 of the top weight)
    assert outs[0][2][logp == -math.inf].abs().max() < 1e-30


def test_per_row_times_agree_with_the_flow_maps_scalar_time():
    x, tau, logp, cb = _problem("l2", seed=7)
    x2, lp2 = x.reshape(-1, C), logp.reshape(-1, V)
    for t in (0.0, 0.4, 0.9):
        scalar = denoise(x2, t, lp2, cb)
        rows = denoise(x2, torch.full((x2.shape[0],), t, dtype=torch.float64), lp2, cb)
        assert torch.allclose(scalar, rows, atol=1e-12)
    t_rows = 1 - tau.reshape(-1)
    dense = posterior_logits(x2, t_rows, lp2, cb).softmax(1) @ cb
    assert torch.allclose(denoise(x2, t_rows, lp2, cb, v_chunk=5), dense, atol=1e-10)
