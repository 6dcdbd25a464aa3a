"""The per-token flow map and its DPM-Solver++ (distilled_decoding/{flowmap,dpm_solver}.py).

Statistical checks use fixed seeds, so every run is deterministic; the stated false-failure rates are
what an exact sampler would see over random seeds, i.e. how unlucky a fixed seed would have to be.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from distilled_decoding import flowmap as fm
from distilled_decoding.dpm_solver import (SPACINGS, dpm_solver_pp, lambda_of_t, multistep_update,
                                           t_of_lambda, timesteps)
from distilled_decoding.flowmap import (FlowMapConfig, chunk_rows, code_spread, codebook_warning, denoise, flow_map,
                                        nearest_code, posterior_logits, reference_flow_map, relative_spacing,
                                        row_bytes, solve_flow)


# ---- fixtures: codebooks shaped like the teachers' -----------------------------------------------
def llamagen_codebook(seed=0):
    """16384 x 8, l2-normalised rows (LlamaGen VQ-16 looks codes up normalised)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(16384, 8, generator=g), dim=1)


def var_codebook(seed=0):
    """4096 x 32 raw rows (VAR: no l2 norm); N(0, 0.1²) per coordinate."""
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(4096, 32, generator=g)


CODEBOOKS = {"llamagen": llamagen_codebook, "var": var_codebook}
TOP_K = {"llamagen": 8000, "var": 900}  # DD's sampling defaults


def t_logits_probs(n, v, top_k, seed, df=10.0, scale=2.0):
    """[n, V] probabilities: softmax of Student-t logits, top-k masked (p = 0 outside the top k)."""
    logits = scale * torch.from_numpy(np.random.default_rng(seed).standard_t(df, (n, v))).float()
    kth = logits.topk(top_k, dim=1).values[:, -1:]
    return logits.masked_fill(logits < kth, -math.inf).softmax(1)


# ---- DPM-Solver++ ----------------------------------------------------------------------------------
def test_timesteps_spacings():
    for sp in SPACINGS:
        ts = timesteps(10, 1e-3, 1 - 1e-3, sp)
        assert ts.dtype == torch.float64 and ts.shape == (11,)
        assert ts[0].item() == 1e-3 and ts[-1].item() == 1 - 1e-3
        assert (ts[1:] > ts[:-1]).all()
    lam = torch.tensor([lambda_of_t(t) for t in timesteps(10, 1e-3, 1 - 1e-3, "logsnr").tolist()])
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(10), atol=1e-9)
    assert torch.allclose(timesteps(10, 0.1, 0.9, "time_uniform").diff(), torch.full((10,), 0.08, dtype=torch.float64))
    # time_quadratic = the official (linspace of √τ)² in DPM time τ = 1 − t: dense at the data end.
    ts = timesteps(10, 1e-3, 1 - 1e-3, "time_quadratic")
    tau = torch.linspace((1 - 1e-3) ** 0.5, 1e-3 ** 0.5, 11, dtype=torch.float64) ** 2
    assert torch.allclose(1 - ts, tau, atol=1e-12)
    assert (ts.diff()[1:] < ts.diff()[:-1]).all()
    for t in (1e-6, 0.3, 0.5, 1 - 1e-6):
        assert abs(t_of_lambda(lambda_of_t(t)) - t) < 1e-15
    assert abs(lambda_of_t(1e-12) - math.log(1e-12)) < 1e-11 and abs(lambda_of_t(0.25) + lambda_of_t(0.75)) < 1e-15


def test_order1_step_is_rectified_flow_euler():
    x, d = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t0, t1 = 0.2, 0.55
    euler = (1 - t1) / (1 - t0) * x + (t1 - t0) / (1 - t0) * d
    assert torch.allclose(multistep_update(x, [t0], [d], t1, 1), euler, atol=1e-14)


def _quadratic_d(lam):
    return 0.3 - 1.1 * lam + 0.7 * lam * lam


def _quadratic_d_integral(lam):  # ∫ e^λ (a + bλ + cλ²) dλ
    return math.exp(lam) * (0.3 - 1.1 * (lam - 1) + 0.7 * (lam * lam - 2 * lam + 2))


def test_order3_exact_for_d_quadratic_in_lambda():
    """With D quadratic in λ and exact history, the 2·φ3 update is exact; the official φ3 is not."""
    ts = [0.3, 0.42, 0.5, 0.71]
    x0 = torch.tensor([0.25], dtype=torch.float64)
    ds = [torch.tensor([_quadratic_d(lambda_of_t(t))], dtype=torch.float64) for t in ts[:3]]
    lam0, lam1 = lambda_of_t(ts[2]), lambda_of_t(ts[3])
    exact = (1 - ts[3]) / (1 - ts[2]) * x0 + (1 - ts[3]) * (_quadratic_d_integral(lam1) - _quadratic_d_integral(lam0))
    assert torch.allclose(multistep_update(x0, ts[:3], ds, ts[3], 3, "exact"), exact, rtol=0, atol=1e-13)
    assert (multistep_update(x0, ts[:3], ds, ts[3], 3, "official") - exact).abs().item() > 1e-3


# Manufactured solution: x*(λ) is known, D(x, λ) = x + x*'(λ)/t + K (x − x*(λ)) makes it the solution of
# dx/dλ = t (D − x) = x*' + t K (x − x*) (D depends smoothly on x and λ, like a real denoiser).
_K = -0.5


def _xstar(lam):
    return torch.tensor([[math.sin(lam), 0.5 * math.cos(0.7 * lam) + 0.2 * lam]], dtype=torch.float64)


def _dxstar(lam):
    return torch.tensor([[math.cos(lam), -0.35 * math.sin(0.7 * lam) + 0.2]], dtype=torch.float64)


def _manufactured_d(x, t):
    lam = lambda_of_t(t)
    return x + _dxstar(lam) / t + _K * (x - _xstar(lam))


def _solve_manufactured(order, variant, n, exact_warmup):
    ts = timesteps(n, t_of_lambda(-2.0), t_of_lambda(2.0), "logsnr").tolist()
    if not exact_warmup:
        x = dpm_solver_pp(_manufactured_d, _xstar(-2.0), ts, order=order, variant=variant)
        return (x - _xstar(2.0)).abs().max().item()
    x, th, dh = _xstar(-2.0), [], []
    for i in range(n):
        th, dh = (th + [ts[i]])[-3:], (dh + [_manufactured_d(x, ts[i])])[-3:]
        # the first order-1 steps take the exact solution, so only the order-`order` steps are measured
        x = _xstar(lambda_of_t(ts[i + 1])) if i < order - 1 else \
            multistep_update(x, th, dh, ts[i + 1], min(order, i + 1), variant)
    return (x - _xstar(2.0)).abs().max().item()


@pytest.mark.parametrize("order,variant,lo,hi", [(1, "exact", 0.9, 1.1), (2, "exact", 1.9, 2.1),
                                                 (3, "exact", 2.85, 3.15), (3, "official", 1.7, 2.15)])
def test_convergence_order(order, variant, lo, hi):
    ns = [40, 80, 160, 320]
    errs = [_solve_manufactured(order, variant, n, exact_warmup=True) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert lo <= slope <= hi, (errs, slope)


def test_solver_loop_warmup_and_lower_order_final():
    """dpm_solver_pp = orders 1, 2, 3, 3, ... of multistep_update; with lower_order_final the last two
    steps drop to 2 and 1. Its order-1 first step limits the global order to 2 (as in the official code)."""
    ts = timesteps(6, 0.1, 0.9, "logsnr").tolist()
    x0 = torch.randn(4, 2, dtype=torch.float64)
    seen = []
    out = dpm_solver_pp(_manufactured_d, x0, ts, order=3, lower_order_final=True, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(6)) and [s["t"] for s in seen] == ts[:6]
    x, th, dh = x0, [], []
    for i, o in enumerate([1, 2, 3, 3, 2, 1]):
        th, dh = (th + [ts[i]])[-3:], (dh + [_manufactured_d(x, ts[i])])[-3:]
        x = multistep_update(x, th, dh, ts[i + 1], o)
    assert torch.equal(out, x)
    errs = [_solve_manufactured(3, "exact", n, exact_warmup=False) for n in (40, 80, 160, 320)]
    assert 1.9 <= -np.polyfit(np.log([40, 80, 160, 320]), np.log(errs), 1)[0] <= 2.3


# ---- the Dirac-mixture denoiser ---------------------------------------------------------------------
def test_denoise_matches_dense_softmax():
    g = torch.Generator().manual_seed(0)
    v, c, n = 1000, 5, 7
    cb = torch.randn(v, c, generator=g, dtype=torch.float64)
    p = torch.rand(n, v, generator=g, dtype=torch.float64)
    p[:, :300] = 0          # the first chunks are entirely masked (online LSE starts at −inf)
    p[3, 310:] = 0          # a row with a tiny support
    p /= p.sum(1, keepdim=True)
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    for t in (0.0, 1e-3, 0.3, 0.8, 0.99, 1 - 1e-4):
        dense = posterior_logits(x, t, p.log(), cb).softmax(1) @ cb
        for chunk in (128, 333, 1000, 4096):
            assert torch.allclose(denoise(x, t, p.log(), cb, v_chunk=chunk), dense, atol=1e-10), (t, chunk)
    # t = 0: the prior mean; t -> 1 at x = t·c_j: the code itself
    assert torch.allclose(denoise(x, 0.0, p.log(), cb), p @ cb, atol=1e-12)
    j = p[0].argmax().item()
    t = 1 - 1e-4
    assert torch.allclose(denoise(t * cb[j:j + 1], t, p[:1].log(), cb), cb[j:j + 1], atol=1e-9)


def test_nearest_code_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    cb = torch.randn(5000, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3000, 8, generator=g, dtype=torch.float64)
    dist = torch.cat([((xs[:, None, :] - cb[None]) ** 2).sum(-1) for xs in x.split(200)])  # [N, V] brute force
    brute = dist.argmin(1)
    assert torch.equal(nearest_code(x, cb), brute)
    assert torch.equal(nearest_code(x, cb, mem_budget_mb=0.5, v_chunk=777), brute)
    got = nearest_code(x.float(), cb.float())                   # fp32: only float near-ties may differ
    assert got.dtype == torch.int64 and got.shape == (3000,)
    gap = dist.gather(1, got[:, None])[:, 0] - dist.min(1).values
    assert (got == brute).float().mean() > 0.999 and gap.max() < 1e-4
    allowed = torch.rand(3000, 5000, generator=g, dtype=torch.float64) < 0.1    # candidates: p > 0
    probs = allowed * torch.rand(3000, 5000, generator=g, dtype=torch.float64)
    assert torch.equal(nearest_code(x, cb, probs, v_chunk=1024), dist.masked_fill(probs == 0, math.inf).argmin(1))
    cb[17] = cb[3]                                               # exact duplicate: the lower index wins
    assert nearest_code(cb[17:18], cb, v_chunk=10).item() == 3


# ---- the flow map ------------------------------------------------------------------------------------
def _chi2_check(idx, bin_of_code, bin_mass, alpha=1e-3):
    """Chi-square goodness of fit of the mapped codes' bins against the bins' p-mass.

    Rejects at level alpha = 1e-3: an exact sampler fails one such check with probability 1e-3 over
    random seeds (the seeds here are fixed, so the outcome is fixed too)."""
    n = idx.numel()
    counts = torch.bincount(bin_of_code[idx], minlength=len(bin_mass)).double()
    expect = n * bin_mass.double()
    stat = ((counts - expect) ** 2 / expect).sum().item()
    limit = chi2.ppf(1 - alpha, len(bin_mass) - 1)
    return stat, limit, (counts / n - bin_mass).abs().sum().item() / 2


def _case_probs(kind, cb, seed):
    """One fixed p [V] and a coarse binning of the codes (bin_of_code [V], bin_mass [B])."""
    v = cb.shape[0]
    g = torch.Generator().manual_seed(seed)
    if kind == "peaked":        # six named codes hold 98%, the rest share 2%
        top = torch.randperm(v, generator=g)[:6]
        p = torch.full((v,), 0.02 / (v - 6))
        p[top] = torch.tensor([0.5, 0.2, 0.1, 0.08, 0.06, 0.04])
        bins = torch.full((v,), 6, dtype=torch.int64)
        bins[top] = torch.arange(6)
    elif kind == "flat":        # uniform; bins = octiles of a random projection (a geometric statistic)
        p = torch.full((v,), 1.0 / v)
        proj = cb @ torch.randn(cb.shape[1], generator=g)
        bins = torch.empty(v, dtype=torch.int64)
        bins[proj.argsort()] = torch.arange(v) * 8 // v
    else:                       # top-k masked Student-t logits; bins = 8 slices of ~equal mass by rank
        p = t_logits_probs(1, v, TOP_K["llamagen" if v == 16384 else "var"], seed)[0]
        order = p.argsort(descending=True)
        cum = p[order].cumsum(0) - p[order]
        bins = torch.empty(v, dtype=torch.int64)
        bins[order] = (cum * 8).long().clamp(max=7)
        bins = bins.unique(return_inverse=True)[1]    # a code heavier than 1/8 leaves a slice empty
    mass = torch.zeros(int(bins.max()) + 1, dtype=torch.float64).index_add_(0, bins, p.double())
    return p, bins, mass


@pytest.mark.parametrize("book", ["llamagen", "var"])
@pytest.mark.parametrize("kind", ["peaked", "flat", "topk"])
def test_flow_map_preserves_distribution(book, kind):
    """2000 noises through the default map land in the coarse bins with p's masses (chi-square,
    alpha 1e-3), and never on a code with p = 0. At n = 2000 the check catches (noncentrality ~30)
    a bias of ~3% total variation on the bins if it sits in two bins, ~6% if spread over all."""
    cb = CODEBOOKS[book]()
    p, bins, mass = _case_probs(kind, cb, seed=11)
    n = 2000
    eps = torch.randn(n, 1, cb.shape[1], generator=torch.Generator().manual_seed(12))
    idx = flow_map(eps, p.expand(n, 1, -1), cb)[:, 0]
    assert (p[idx] > 0).all()
    stat, limit, tv = _chi2_check(idx, bins, mass)
    assert stat < limit, f"chi2 {stat:.1f} >= {limit:.1f} (TV on the bins {tv:.3f})"


def _equal_mass_bins(p, bins=20):
    """Codes sorted by descending p cut into `bins` slices of equal mass: (bin of each code [V], mass [B])."""
    order = p.double().argsort(descending=True)
    cum = p.double()[order].cumsum(0) - p.double()[order]
    b = torch.empty(len(p), dtype=torch.int64)
    b[order] = (cum * bins).long().clamp(max=bins - 1)
    b = b.unique(return_inverse=True)[1]
    return b, torch.zeros(int(b.max()) + 1, dtype=torch.float64).index_add_(0, b, p.double())


OLD_DEFAULTS = FlowMapConfig(nfe=10, grid_scale="unit")   # FlowMapConfig() before issue 14


@pytest.mark.parametrize("kind", ["l2", "raw"])
def test_chi2_old_defaults_fail_new_pass(kind):
    """χ² over 20 equal-mass bins of p (codes by descending p), alpha 1e-3, on a small codebook of each
    kind: the old defaults (10 NFE, grid not placed for the codebook's scale) fail it, the defaults pass.
    l2: 1024 x 4 l2-normalised codes (denser than LlamaGen's, so 10 000 noises show the old map's error
    that 16384 x 8 shows at ~20 000), p ~ Dirichlet(0.1); measured old p-value 2e-8.
    raw: 1024 x 32 N(0, 3²) codes (VAR-like, spread 17), p = softmax(2·N(0,1)) top-k 900: the old grid
    crosses every posterior split in its first step."""
    g = torch.Generator().manual_seed(0)
    if kind == "l2":
        cb = torch.nn.functional.normalize(torch.randn(1024, 4, generator=g), dim=1)
        p = torch.from_numpy(np.random.default_rng(1).dirichlet(np.full(1024, 0.1))).float()
        n = 10000
    else:
        cb = 3.0 * torch.randn(1024, 32, generator=g)
        logits = 2.0 * torch.from_numpy(np.random.default_rng(1).standard_normal(1024)).float()
        logits[logits < logits.topk(900).values[-1]] = -math.inf
        p = logits.softmax(0)
        n = 4000
    bins, mass = _equal_mass_bins(p)
    eps = torch.randn(n, cb.shape[1], generator=torch.Generator().manual_seed(4))
    stat_old, limit, tv_old = _chi2_check(solve_flow(eps, p.expand(n, -1), cb, OLD_DEFAULTS, snap=True), bins, mass)
    stat_new, _, tv_new = _chi2_check(solve_flow(eps, p.expand(n, -1), cb, snap=True), bins, mass)
    assert stat_old > limit, f"old defaults: chi2 {stat_old:.1f} < {limit:.1f} (TV {tv_old:.3f})"
    assert stat_new < limit, f"defaults: chi2 {stat_new:.1f} >= {limit:.1f} (TV {tv_new:.3f})"


def test_grid_scale_makes_the_map_scale_free():
    """grid_scale="codebook" shifts the time grid by log(code_spread): the map of k·codebook is the map of
    the codebook (up to fp32 rounding at cell boundaries), for k from 0.5 to 3; "unit" is not."""
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(512, 16, generator=g)
    p = t_logits_probs(1, 512, 300, seed=2)[0]
    n = 400
    eps = torch.randn(n, 16, generator=torch.Generator().manual_seed(3))
    base = solve_flow(eps, p.expand(n, -1), cb, snap=True)
    for k in (0.5, 3.0):
        assert (solve_flow(eps, p.expand(n, -1), k * cb, snap=True) != base).sum() <= 1, k
    unit = FlowMapConfig(grid_scale="unit")
    assert (solve_flow(eps, p.expand(n, -1), 3.0 * cb, unit, snap=True) != base).sum() > 10
    # the grid: λ shifted by exactly −log(spread); spread 1 leaves it bit for bit
    cfg = FlowMapConfig()
    lam = lambda ts: torch.log(ts) - torch.log1p(-ts)
    assert torch.equal(cfg.timesteps(1.0), timesteps(cfg.nfe, cfg.t_start, cfg.t_end, cfg.spacing))
    assert torch.allclose(lam(cfg.timesteps(7.0)), lam(cfg.timesteps(1.0)) - math.log(7.0), atol=1e-9)
    assert torch.equal(unit.timesteps(7.0), unit.timesteps(1.0))
    assert code_spread(3.0 * cb) == pytest.approx(3.0 * code_spread(cb), rel=1e-6)


def test_legacy_config_and_codebook_warning():
    """A recorded config without grid_scale is the map from before it existed ("unit"). The warning names
    a larger NFE for near-duplicate codes or more codes than validated, and grid_scale='codebook' for the
    "unit" grid on a codebook far from spread 1."""
    assert FlowMapConfig.from_dict({"nfe": 10, "unknown": 1}) == FlowMapConfig(nfe=10, grid_scale="unit")
    assert FlowMapConfig.from_dict(FlowMapConfig().to_dict()) == FlowMapConfig()
    g = torch.Generator().manual_seed(0)
    sparse = torch.randn(512, 32, generator=g)                      # VAR-like: relative spacing ~0.7
    assert codebook_warning(sparse, FlowMapConfig()) is None
    assert relative_spacing(2.0 * sparse) == pytest.approx(relative_spacing(sparse), rel=1e-9)
    dense = torch.cat([sparse, sparse[:64] + 1e-3 * torch.randn(64, 32, generator=g)])   # near-duplicates
    msg = codebook_warning(dense, FlowMapConfig())
    assert "spacing" in msg and f"--nfe {2 * FlowMapConfig().nfe}" in msg
    assert codebook_warning(dense, FlowMapConfig(nfe=2 * FlowMapConfig().nfe)) is None
    big = torch.nn.functional.normalize(torch.randn(16385, 2, generator=g), dim=1)
    assert "16385 codes" in codebook_warning(big, FlowMapConfig())
    assert "grid_scale='codebook'" in codebook_warning(10 * sparse, FlowMapConfig(grid_scale="unit"))


def test_flow_map_deterministic_across_batching():
    """Same (eps, p) -> same index whatever the batch shape, order, row chunking or V chunking."""
    cb = llamagen_codebook()
    n = 120
    p = t_logits_probs(n, cb.shape[0], TOP_K["llamagen"], seed=3)
    eps = torch.randn(n, cb.shape[1], generator=torch.Generator().manual_seed(4))
    base = flow_map(eps.view(1, n, -1), p.view(1, n, -1), cb)[0]
    assert torch.equal(flow_map(eps.view(n, 1, -1), p.view(n, 1, -1), cb)[:, 0], base)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    assert torch.equal(flow_map(eps[perm].view(8, 15, -1), p[perm].view(8, 15, -1), cb).view(-1), base[perm])
    parts = [flow_map(eps[i:i + 13, None], p[i:i + 13, None], cb)[:, 0] for i in range(0, n, 13)]
    assert torch.equal(torch.cat(parts), base)
    small = FlowMapConfig(mem_budget_mb=2.0)                      # ~9 rows per chunk
    assert chunk_rows(16384, 8, 2.0) < 16
    assert torch.equal(flow_map(eps[:, None], p[:, None], cb, small)[:, 0], base)
    assert torch.equal(solve_flow(eps, p, cb, snap=True, v_chunk=1000), base)   # other V-reduction order
    # inputs in other dtypes are cast to fp32 first
    assert torch.equal(flow_map(eps.double()[None], p.double()[None], cb.double())[0], base)


def test_flow_map_agrees_with_dop853_reference():
    """With enough NFE the solver reproduces the float64 DOP853 solve (same start) on a handful of tokens."""
    for book in ("llamagen", "var"):
        cb = CODEBOOKS[book]()
        n = 6
        p = t_logits_probs(n, cb.shape[0], TOP_K[book], seed=7)
        eps = torch.randn(n, cb.shape[1], generator=torch.Generator().manual_seed(8))
        cfg = FlowMapConfig(nfe=40)
        ts = cfg.timesteps(code_spread(cb))                       # the grid placed for this codebook's scale
        t_start, t_end = ts[0].item(), ts[-1].item()
        ref_idx, ref_x = reference_flow_map(eps, p, cb, t_start=t_start, t_end=t_end, rtol=1e-9, return_x=True)
        x = solve_flow(eps, p, cb, cfg)
        assert (x.double() - ref_x).norm(dim=1).max() < 2e-3, book
        assert torch.equal(solve_flow(eps, p, cb, cfg, snap=True), ref_idx), book
        assert torch.equal(nearest_code(x / t_end, cb, p), ref_idx), book           # the snap, spelled out
        # the reference started exactly at t = 0 lands on the same codes: the O(t_start) start is harmless
        assert torch.equal(reference_flow_map(eps, p, cb, t_start=0.0, t_end=t_end, rtol=1e-9), ref_idx)


def test_memory_budget_respected(monkeypatch):
    """The row chunks fit the budget: rows·row_bytes + the codebook copies <= mem_budget_mb, for
    LlamaGen's V = 16384 with 256 samples, and the result does not depend on the budget."""
    v, c, budget = 16384, 8, 4.0
    rows = chunk_rows(v, c, budget)
    assert rows * row_bytes(v, c) + 4 * 2 * v * (c + 1) <= budget * 2**20
    assert (rows + 1) * row_bytes(v, c) + 4 * 2 * v * (c + 1) > budget * 2**20   # and uses it
    assert rows * v * 4 < budget * 2**20 < 256 * v * 4            # a dense [256, V] would not fit
    with pytest.raises(ValueError, match="below one token"):
        chunk_rows(v, c, 0.5)
    seen = []
    real = fm._denoise

    def spy(x, t, logp, cb_sq, cb_one, v_chunk):
        seen.append((x.shape[0], logp.shape, v_chunk))
        return real(x, t, logp, cb_sq, cb_one, v_chunk)

    monkeypatch.setattr(fm, "_denoise", spy)
    cb = llamagen_codebook()
    p = t_logits_probs(256, v, TOP_K["llamagen"], seed=9)
    eps = torch.randn(256, 1, c, generator=torch.Generator().manual_seed(10))
    cfg = FlowMapConfig(mem_budget_mb=budget)
    small = flow_map(eps, p[:, None], cb, cfg)
    assert seen and max(s[0] for s in seen) == rows
    assert all(s[1] == (s[0], v) and s[0] * (v + 2 * min(v, s[2])) * 4 <= budget * 2**20 for s in seen)
    monkeypatch.setattr(fm, "_denoise", real)
    assert torch.equal(small, flow_map(eps, p[:, None], cb))


def test_config_and_validation():
    cfg = FlowMapConfig()
    assert FlowMapConfig(**cfg.to_dict()) == cfg
    assert cfg.to_dict()["nfe"] == 48 and cfg.to_dict()["spacing"] in SPACINGS
    with pytest.raises(Exception):
        cfg.nfe = 3                                               # frozen
    for bad in (dict(order=4), dict(spacing="cosine"), dict(variant="taylor"), dict(grid_scale="x"), dict(t_start=0.0),
                dict(t_end=1.0), dict(nfe=0), dict(mem_budget_mb=0)):
        with pytest.raises(ValueError):
            FlowMapConfig(**bad)
    cb = torch.randn(50, 4)
    with pytest.raises(ValueError, match="shape"):
        flow_map(torch.randn(2, 3, 4), torch.rand(2, 3, 49), cb)
    with pytest.raises(ValueError, match="probability mass"):
        flow_map(torch.randn(1, 1, 4), torch.zeros(1, 1, 50), cb)


def test_flowmap_does_not_import_teachers():
    code = ("import sys, distilled_decoding.flowmap, distilled_decoding.dpm_solver; "
            "assert not any(m == 'teachers' or m.startswith('teachers.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
