"""Flow-map accuracy and cost (distilled_decoding/flowmap.py) on LlamaGen- and VAR-shaped codebooks.

    python tools/bench_flowmap.py --threads 1                        # the full table; see docs/flowmap.md
    python tools/bench_flowmap.py --setting var --var-code-std 3 --samples 4000 --ref-tokens 200 --no-teacher
    python tools/bench_flowmap.py --setting var --codebook var_cb.pt  # a real [V, C] codebook (torch.save)

Codebooks: "llamagen" = 16384 x 8 l2-normalised random codes; "var" = 4096 x 32 raw N(0, σ²) random codes,
one per --var-code-std; or a real codebook (--codebook, any [V, C]). Distributions: one fixed p per row,
softmax(2·N(0,1)) and Dirichlet(0.1) over V, masked like DD's sampling (llamagen top-k 8000; var top-k 900,
top-p 0.95). For each (codebook, p) and each sampler (the multinomial draw, the default map, the maps of
--compare, by default the defaults before the change of issue 14) it prints:

  chi2 p   χ² of --samples draws over 20 equal-mass bins of p (codes sorted by p), df = bins − 1;
           an exact sampler gives a uniform p-value (the multinomial row shows one at the same n)
  TV       total variation of those bin frequencies from the bin masses (the multinomial's: the noise floor)
  agree    share of --ref-tokens noises whose index equals a float64 DOP853 solve (rtol 1e-10) from t = 0
  gap      mean log p(idx) + H(p) ± s.e., nats (0 for an exact sampler; < 0: unlikely codes favoured)

and, per setting, the default map's fp32-vs-fp64 and batch-shape index flips, and its cost: CPU time of one
AR step's tokens through the map vs one KV-cached teacher step of GPT-L / VAR-d16 size (random weights,
step_probs + feed, batch 16 / 2; CPU-time clock, so other processes on the machine do not count).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from scipy.stats import chi2

from distilled_decoding.flowmap import (FlowMapConfig, code_spread, flow_map, reference_flow_map, relative_spacing,
                                        solve_flow)

SETTINGS = {
    # V, C, DD's top-k / top-p, l2-normalised codes, teacher (family, config), timed step, tokens per step,
    # the stand-in's (layers, width) if the teacher cannot be built, batch of the timed step
    "llamagen": dict(v=16384, c=8, top_k=8000, top_p=1.0, l2=True, teacher=("llamagen", "GPT-L"), step=128, k=1,
                     standin=(24, 1024), batch=16),
    "var": dict(v=4096, c=32, top_k=900, top_p=0.95, l2=False, teacher=("var", "d16"), step=9, k=256,
                standin=(16, 1024), batch=2),
}
P_KINDS = ("softmax(2N)", "Dirichlet(0.1)")
BINS = 20


def make_codebook(setting: str, std: float, seed: int = 0, path=None) -> torch.Tensor:
    """The setting's random codebook [V, C], or a real one saved with torch.save (e.g.
    `torch.save(teacher.codebook, "cb.pt")` for a teacher built from its checkpoints)."""
    s = SETTINGS[setting]
    if path:
        cb = torch.load(path, map_location="cpu")
        if cb.dim() != 2:
            raise SystemExit(f"{path}: a codebook is [V, C], got {tuple(cb.shape)}")
        return cb.float()
    cb = torch.randn(s["v"], s["c"], generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(cb, dim=1) if s["l2"] else std * cb


def masked_probs(kind: str, v: int, top_k: int, top_p: float, seed: int) -> torch.Tensor:
    """p [V]: softmax(2·N(0,1)) or Dirichlet(0.1), then top-k and top-p masked (as teachers.sampling does:
    keep a code while the mass before it is < top_p) and renormalised."""
    rng = np.random.default_rng(seed)
    if kind == "softmax(2N)":
        p = torch.from_numpy(2.0 * rng.standard_normal(v)).softmax(0)
    else:
        p = torch.from_numpy(rng.dirichlet(np.full(v, 0.1)))
    sp, order = p.sort(descending=True)
    keep = (torch.arange(v) < top_k) & (sp.cumsum(0) - sp < top_p)
    p = torch.zeros(v, dtype=torch.float64).index_copy_(0, order, torch.where(keep, sp, torch.zeros_like(sp)))
    return (p / p.sum()).float()


def equal_mass_bins(p: torch.Tensor, bins: int = BINS):
    """Codes sorted by descending p cut into `bins` slices of equal mass: (bin of each code [V], mass [B]).
    A code heavier than 1/bins leaves some slices empty; they are dropped."""
    pd = p.double()
    order = pd.argsort(descending=True)
    cum = pd[order].cumsum(0) - pd[order]
    b = torch.empty(len(p), dtype=torch.int64)
    b[order] = (cum * bins).long().clamp(max=bins - 1)
    b = b.unique(return_inverse=True)[1]
    return b, torch.zeros(int(b.max()) + 1, dtype=torch.float64).index_add_(0, b, pd)


def sample_stats(p: torch.Tensor, idx: torch.Tensor) -> dict:
    """χ² p-value and TV of idx [n] over the equal-mass bins of p [V], and mean log p(idx) + H(p) ± s.e."""
    b, mass = equal_mass_bins(p)
    n = idx.numel()
    counts = torch.bincount(b[idx], minlength=len(mass)).double()
    stat = ((counts - n * mass) ** 2 / (n * mass)).sum().item()
    logp = p.double().clamp_min(1e-300).log()
    gap = logp[idx] + -(p.double() * logp).sum()
    return {"chi2_p": chi2.sf(stat, len(mass) - 1), "tv": 0.5 * (counts / n - mass).abs().sum().item(),
            "gap": gap.mean().item(), "gap_se": gap.std().item() / math.sqrt(n)}


def parse_config(spec: str) -> FlowMapConfig:
    """"nfe=10,grid_scale=unit" -> FlowMapConfig (the other fields at their defaults)."""
    d = FlowMapConfig().to_dict()
    for item in filter(None, spec.split(",")):
        k, v = item.split("=")
        d[k] = type(d[k])(v == "True" if isinstance(d[k], bool) else v)
    return FlowMapConfig(**d)


def describe(cfg: FlowMapConfig) -> str:
    return f"{cfg.nfe} NFE {cfg.spacing} o{cfg.order} grid_scale={cfg.grid_scale}"


def cpu_timed(fn, repeats: int) -> float:
    """Median CPU seconds of fn() over `repeats` calls (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


def teacher_step_time(setting: str, batch: int, use_teacher: bool, repeats: int):
    """(description, median CPU seconds of one KV-cached teacher step, that step's probs [B, k, V]).

    One prefill up to the setting's step, then up to `repeats` successive steps of the same size
    (step_probs + feed); VAR's last scale is a single step, so it is timed once."""
    s = SETTINGS[setting]
    if use_teacher:
        try:
            from teachers import load_teacher
            torch.manual_seed(0)
            teacher = load_teacher(*s["teacher"], device="cpu")
            sampling = teacher.default_sampling
            labels = torch.randint(0, teacher.num_classes, (batch,))
            prefix = torch.randint(0, teacher.vocab_size, (batch, teacher.step_offsets[s["step"]]))
            state = teacher.start(labels, sampling, prefix=prefix)
            k = teacher.step_sizes[s["step"]]
            times, probs = [], None
            while len(times) < repeats and state.step < teacher.num_steps and teacher.step_sizes[state.step] == k:
                t0 = time.process_time()
                p = teacher.step_probs(state)
                teacher.feed(state, p.argmax(-1))
                times.append(time.process_time() - t0)
                probs = p if probs is None else probs
            desc = (f"{s['teacher'][0]} {s['teacher'][1]} random weights, step {s['step']} ({k} tokens/sample), "
                    f"cfg {sampling.cfg_scale}, median of {len(times)}")
            return desc, statistics.median(times), probs
        except Exception as e:  # noqa: BLE001 - teacher modules are optional here
            print(f"  teacher {s['teacher']} unavailable ({e.__class__.__name__}: {e}); using a stand-in")
    # Stand-in: the teacher's matmuls for one step (layers x (qkv, proj, 4x MLP) + head) on 2B·k rows (CFG).
    layers, d = s["standin"]
    rows = 2 * batch * s["k"]
    w = [torch.randn(d, 3 * d) / 32, torch.randn(d, d) / 32, torch.randn(d, 8 * d) / 32, torch.randn(4 * d, d) / 64]
    head, x = torch.randn(d, s["v"]) / 32, torch.randn(rows, d)

    def step():
        h = x
        for _ in range(layers):
            h = h + (h @ w[0])[:, :d] @ w[1]
            a, b = (h @ w[2]).chunk(2, 1)
            h = h + (torch.nn.functional.silu(a) * b) @ w[3]
        (h @ head).softmax(1)

    probs = torch.stack([masked_probs("softmax(2N)", s["v"], s["top_k"], s["top_p"], seed=99 + i)
                         for i in range(batch * s["k"])]).view(batch, s["k"], s["v"])
    return (f"stand-in: {layers}-layer width-{d} matmuls on {rows} rows (no attention)", cpu_timed(step, repeats),
            probs)


def bench_codebook(setting: str, cb: torch.Tensor, label: str, a, configs) -> None:
    s = SETTINGS[setting]
    v, c = cb.shape
    top_k = min(s["top_k"], v)
    default = configs[0][1]
    print(f"\n=== {setting}: codebook {v}x{c} {label}, spread {code_spread(cb):.3g}, nearest-neighbour "
          f"distance 1% quantile / spread {relative_spacing(cb):.3f}; top-k {top_k}, top-p {s['top_p']} ===")
    print(f"{'p':<15} {'sampler':<58} {'chi2 p':>8} {'TV':>7} {'agree':>8} {'log p(idx) + H':>18}  time")
    for pk, kind in enumerate(P_KINDS):
        p = masked_probs(kind, v, top_k, s["top_p"], seed=1 + pk)
        sup = p > 0
        ent = -(p[sup].double() * p[sup].double().log()).sum().item()
        head = f"{kind:<15}"
        n = a.samples
        draw = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(5 + pk))
        st = sample_stats(p, draw)
        print(f"{head} {'multinomial (support ' + str(int(sup.sum())) + ', H ' + f'{ent:.2f})':<58} "
              f"{st['chi2_p']:>8.3g} {st['tv']:>7.4f} {'-':>8} {st['gap']:>+9.4f} ± {st['gap_se']:.4f}")
        eps_ref = torch.randn(a.ref_tokens, c, generator=torch.Generator().manual_seed(2))
        t0 = time.process_time()
        ref = reference_flow_map(eps_ref, p.expand(a.ref_tokens, -1), cb, t_start=0.0, t_end=1.0 - 1e-5,
                                 rtol=1e-10, progress=a.progress)
        t_ref = time.process_time() - t0
        eps = torch.randn(n, c, generator=torch.Generator().manual_seed(4))
        for name, cfg in configs:
            t0 = time.process_time()
            idx = torch.cat([solve_flow(e, p.expand(len(e), -1), cb, cfg, snap=True) for e in eps.split(4096)])
            t_map = time.process_time() - t0
            st = sample_stats(p, idx)
            agree = (solve_flow(eps_ref, p.expand(a.ref_tokens, -1), cb, cfg, snap=True) == ref).double().mean()
            print(f"{head} {name + ' (' + describe(cfg) + ')':<58} {st['chi2_p']:>8.3g} {st['tv']:>7.4f} "
                  f"{100 * agree.item():>7.2f}% {st['gap']:>+9.4f} ± {st['gap_se']:.4f}  {t_map:.0f}s")
        print(f"{'':<15} (agreement over {a.ref_tokens} tokens, s.e. ~{100 * math.sqrt(0.005 * 0.995 / a.ref_tokens):.2f}"
              f" pts at 99.5%; DOP853 {t_ref:.0f}s)")
    # rounding and batch invariance of the default on the last p
    f64 = solve_flow(eps_ref, p.expand(a.ref_tokens, -1), cb, default, snap=True, dtype=torch.float64)
    base = solve_flow(eps_ref, p.expand(a.ref_tokens, -1), cb, default, snap=True)
    tiny = flow_map(eps_ref[:, None], p.expand(a.ref_tokens, 1, -1), cb,
                    FlowMapConfig(**dict(default.to_dict(), mem_budget_mb=2.0)))[:, 0]
    print(f"rounding ({a.ref_tokens} tokens, default): fp32 vs fp64 index flips {(base != f64).sum().item()}; "
          f"one batch vs 1-token rows in 2 MiB chunks {(base != tiny).sum().item()}")


def bench_cost(setting: str, cb: torch.Tensor, a, default: FlowMapConfig) -> None:
    s = SETTINGS[setting]
    desc, t_teacher, tprobs = teacher_step_time(setting, a.batch or s["batch"], a.teacher, a.repeats)
    b, k, _ = tprobs.shape
    teps = torch.randn(b, k, cb.shape[1], generator=torch.Generator().manual_seed(6))
    t_map = cpu_timed(lambda: flow_map(teps, tprobs.float(), cb, default), a.repeats)
    print(f"cost {setting}, batch {b} x {k} tokens: flow map ({describe(default)}) {1e3 * t_map:.1f} ms vs teacher "
          f"step {1e3 * t_teacher:.1f} ms CPU -> map/step = {t_map / t_teacher:.3f} ({desc}; "
          f"{torch.get_num_threads()} threads)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=list(SETTINGS) + ["all"], default="all")
    p.add_argument("--samples", type=int, default=20000, help="draws per p for chi2 / TV / gap")
    p.add_argument("--ref-tokens", type=int, default=2000, help="noises per p solved with DOP853 (agreement)")
    p.add_argument("--var-code-std", type=float, nargs="+", default=[0.5, 1.0, 3.0],
                   help="std of the VAR-like raw random codebooks")
    p.add_argument("--codebook", default=None,
                   help="a real [V, C] codebook (torch.save'd tensor) instead of the random ones; needs --setting")
    p.add_argument("--config", default="", help="the map under test: FlowMapConfig fields, e.g. 'nfe=32' "
                   "(default: FlowMapConfig's defaults)")
    p.add_argument("--compare", nargs="*", default=["nfe=10,grid_scale=unit"],
                   help="more maps to score (default: the defaults before issue 14)")
    p.add_argument("--batch", type=int, default=None, help="batch of the timed step (default llamagen 16, var 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--no-teacher", dest="teacher", action="store_false",
                   help="time the matmul stand-in instead of building the random-weight teacher")
    p.add_argument("--no-cost", dest="cost", action="store_false", help="skip the cost section")
    p.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="only the cost section")
    p.add_argument("--progress", action="store_true", help="progress bars for the DOP853 reference")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.codebook and a.setting == "all":
        p.error("--codebook needs --setting llamagen or --setting var")
    if a.threads:
        torch.set_num_threads(a.threads)
    default = parse_config(a.config)
    configs = [("default" if not a.config else "map", default)] + [(f"compare {i + 1}", parse_config(c))
                                                                    for i, c in enumerate(a.compare)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for setting in SETTINGS:
            if a.setting not in ("all", setting):
                continue
            stds = [None] if a.codebook or SETTINGS[setting]["l2"] else a.var_code_std
            for std in stds:
                cb = make_codebook(setting, std, path=a.codebook)
                label = f"from {a.codebook}" if a.codebook else "l2-normalised" if std is None else f"N(0, {std}^2)"
                if a.accuracy:
                    bench_codebook(setting, cb, label, a, configs)
            if a.cost:
                bench_cost(setting, cb, a, default)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s wall")


if __name__ == "__main__":
    main()
