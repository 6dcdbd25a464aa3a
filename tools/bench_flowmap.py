"""Flow-map accuracy and cost (distilled_decoding/flowmap.py) on LlamaGen- and VAR-shaped codebooks.

    python tools/bench_flowmap.py --threads 1                      # both settings, ~3.5 min on 2 CPU cores
    python tools/bench_flowmap.py --setting var --ref-tokens 64 --tv-tokens 1024 --no-teacher  # ~40 s
    python tools/bench_flowmap.py --setting var --codebook var_cb.pt   # a real [V, C] codebook (torch.save)

Settings: "llamagen" = 16384 x 8 l2-normalised random codebook, top-k 8000; "var" = 4096 x 32 raw
N(0, var_code_std²) codebook, top-k 900 (DD's defaults). Per-token next-token distributions are
softmax(s·T) with T ~ Student-t(10) per code and s ~ log-uniform[1, 3] per token, top-k masked: top-1
probability from ~0.02 to ~0.9 (median ~0.2), entropy 1-8 nats (median ~4.5), like a CFG'd image AR.

Prints, per setting:
  1. agreement: share of tokens whose `--nfe`-NFE map index equals a float64 DOP853 solve (rtol 1e-10)
     started exactly at t = 0, per spacing / order / variant / lower_order_final (± binomial s.e.);
  2. rounding: index flips between the fp32 and fp64 solves, and between one batch and tiny row chunks;
  3. distribution: total variation on a coarse statistic — the probability-rank octile of the chosen
     code in its own p (8 slices of equal mass, by descending p) — next to a multinomial draw's TV at
     the same n (the noise floor), and the mean log p of the chosen code minus its expectation −H(p)
     (> 0: the map favours likely codes);
  4. cost: the map's wall time for one AR step's tokens vs one KV-cached teacher step of the same batch
     (`teachers.load_teacher(...)` random weights; a GPT-L-sized matmul stand-in if that import fails).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from distilled_decoding.dpm_solver import SPACINGS
from distilled_decoding.flowmap import FlowMapConfig, flow_map, nearest_code, reference_flow_map, solve_flow

SETTINGS = {
    # V, C, top-k, l2-normalised codes, teacher (family, config), timed step and its tokens per sample,
    # the stand-in's (layers, width) if the teacher cannot be built, default batch of the timed step
    "llamagen": dict(v=16384, c=8, top_k=8000, l2=True, teacher=("llamagen", "GPT-L"), step=128, k=1,
                     standin=(24, 1024), batch=16),
    "var": dict(v=4096, c=32, top_k=900, l2=False, teacher=("var", "d16"), step=9, k=256,
                standin=(16, 1024), batch=2),
}


def make_codebook(setting: str, var_code_std: float, seed: int = 0, path=None) -> torch.Tensor:
    """The setting's random codebook, or a real one: a [V, C] tensor saved with torch.save (e.g.
    `torch.save(teacher.codebook, "cb.pt")` for a teacher built from its checkpoints)."""
    s = SETTINGS[setting]
    if path:
        cb = torch.load(path, map_location="cpu").float()
        if tuple(cb.shape) != (s["v"], s["c"]):
            raise SystemExit(f"{path}: codebook {tuple(cb.shape)}, {setting} needs {(s['v'], s['c'])}")
        return cb
    cb = torch.randn(s["v"], s["c"], generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(cb, dim=1) if s["l2"] else var_code_std * cb


def realistic_probs(n: int, v: int, top_k: int, seed: int) -> torch.Tensor:
    """[n, V]: softmax(s·T), T ~ Student-t(10) iid, s ~ log-uniform[1, 3] per row, top-k masked."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.standard_t(10.0, (n, v)) * np.exp(rng.uniform(0, math.log(3), (n, 1))))
    kth = logits.topk(top_k, 1).values[:, -1:]
    return logits.masked_fill(logits < kth, -math.inf).softmax(1).float()


def sweep_configs(nfe: int):
    """(label, FlowMapConfig) for every spacing x order (x variant, x lower_order_final)."""
    out = []
    for sp in SPACINGS:
        for order in (1, 2, 3):
            for lof in ((True,) if order == 1 else (True, False)):
                for var in (("exact", "official") if order == 3 else ("exact",)):
                    label = f"{sp:<14} o{order} {var:<8} {'lof' if lof and order > 1 else '   '}"
                    out.append((label, FlowMapConfig(nfe=nfe, order=order, spacing=sp, variant=var,
                                                     lower_order_final=lof)))
    return out


def rank_octile(probs: torch.Tensor, idx: torch.Tensor):
    """Octile (0..7) of each chosen code in its own p, and each row's mass per octile: [N], [N, 8]."""
    sp, order = probs.double().sort(1, descending=True)
    mid = sp.cumsum(1) - 0.5 * sp                                    # centre of each code's mass slice
    octile = (mid * 8).long().clamp(max=7)                           # [N, V] in sorted order
    mass = torch.zeros(probs.shape[0], 8, dtype=torch.float64).scatter_add_(1, octile, sp)
    rank = (order == idx[:, None]).long().argmax(1)
    return octile.gather(1, rank[:, None])[:, 0], mass


def tv_stats(probs: torch.Tensor, idx: torch.Tensor):
    """(TV of the octile histogram vs its expectation, mean log p(idx) + H(p), its s.e.)."""
    oc, mass = rank_octile(probs, idx)
    freq = torch.bincount(oc, minlength=8).double() / len(idx)
    tv = 0.5 * (freq - mass.mean(0)).abs().sum().item()
    logp = probs.double().clamp_min(1e-300).log()
    ent = -(probs.double() * logp).sum(1)
    gap = logp.gather(1, idx[:, None])[:, 0] + ent
    return tv, gap.mean().item(), gap.std().item() / math.sqrt(len(idx))


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def teacher_step_time(setting: str, batch: int, device: str, use_teacher: bool, repeats: int):
    """(description, median seconds of one KV-cached teacher step, that step's probs [B, k, V]).

    One prefill up to the setting's step, then up to `repeats` successive steps of the same size
    (step_probs + feed); VAR's last scale is a single step, so it is timed once."""
    s = SETTINGS[setting]
    if use_teacher:
        try:
            from teachers import load_teacher
            torch.manual_seed(0)
            teacher = load_teacher(*s["teacher"], device=device)
            sampling = teacher.default_sampling
            labels = torch.randint(0, teacher.num_classes, (batch,), device=device)
            prefix = torch.randint(0, teacher.vocab_size, (batch, teacher.step_offsets[s["step"]]), device=device)
            state = teacher.start(labels, sampling, prefix=prefix)
            k = teacher.step_sizes[s["step"]]
            times, probs = [], None
            while len(times) < repeats and state.step < teacher.num_steps and teacher.step_sizes[state.step] == k:
                t0 = time.perf_counter()
                p = teacher.step_probs(state)
                teacher.feed(state, p.argmax(-1))
                times.append(time.perf_counter() - t0)
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
    w, head = [t.to(device) for t in w], (torch.randn(d, s["v"]) / 32).to(device)
    x = torch.randn(rows, d, device=device)

    def step():
        h = x
        for _ in range(layers):
            h = h + (h @ w[0])[:, :d] @ w[1]
            a, b = (h @ w[2]).chunk(2, 1)
            h = h + (torch.nn.functional.silu(a) * b) @ w[3]
        (h @ head).softmax(1)

    probs = realistic_probs(batch * s["k"], s["v"], s["top_k"], seed=99).view(batch, s["k"], s["v"])
    return (f"stand-in: {layers}-layer width-{d} matmuls on {rows} rows (no attention)", timed(step, repeats),
            probs.to(device))


def bench_setting(setting: str, a) -> None:
    s = SETTINGS[setting]
    cb = make_codebook(setting, a.var_code_std, path=a.codebook)
    desc = f"{s['v']}x{s['c']} " + (f"from {a.codebook}" if a.codebook else
                                    "l2-normalised" if s["l2"] else f"raw N(0, {a.var_code_std}^2)")
    print(f"\n=== {setting}: codebook {desc}, top-k {s['top_k']}, {a.nfe} NFE ===")

    # 1. agreement with the exact map ---------------------------------------------------------------
    t_sec = time.perf_counter()
    n = a.ref_tokens
    probs = realistic_probs(n, s["v"], s["top_k"], seed=1)
    eps = torch.randn(n, s["c"], generator=torch.Generator().manual_seed(2))
    top1 = probs.max(1).values
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(1)
    print(f"p: top-1 median {top1.median():.3f} (10-90%: {top1.quantile(0.1):.3f}-{top1.quantile(0.9):.3f}), "
          f"entropy median {ent.median():.2f} nats")
    t0 = time.perf_counter()
    ref = reference_flow_map(eps, probs, cb, t_start=0.0, t_end=FlowMapConfig().t_end, rtol=1e-10, progress=True)
    print(f"1. agreement with DOP853 from t=0 (rtol 1e-10, {n} tokens, {time.perf_counter() - t0:.0f}s); "
          f"s.e. ~{100 * math.sqrt(0.05 * 0.95 / n):.1f} pts at 95%")
    print("   (off-support: tokens whose x(t_end)/t_end is nearest to a code with p = 0; the map then snaps "
          "to the nearest code with p > 0)")
    default = FlowMapConfig(nfe=a.nfe)
    for label, cfg in sweep_configs(a.nfe):
        y = solve_flow(eps, probs, cb, cfg) / cfg.t_end
        agree = (nearest_code(y, cb, probs) == ref).double().mean().item()        # = flow_map's index
        off = (probs.gather(1, nearest_code(y, cb)[:, None]) == 0).sum().item()
        mark = "  <- default" if cfg == default else ""
        print(f"   {label} {100 * agree:6.1f}%  off-support {off}{mark}")
    for nfe in a.extra_nfe:
        agree = (solve_flow(eps, probs, cb, FlowMapConfig(nfe=nfe), snap=True) == ref).double().mean().item()
        print(f"   default at {nfe} NFE: {100 * agree:.1f}%")
    start = reference_flow_map(eps, probs, cb, t_start=default.t_start, t_end=default.t_end, rtol=1e-10,
                               progress=True)
    print(f"   DOP853 from x(t_start)=eps vs from t=0: {100 * (start == ref).double().mean():.1f}% agree")

    # 2. rounding ----------------------------------------------------------------------------------------
    base = solve_flow(eps, probs, cb, default, snap=True)
    f64 = solve_flow(eps, probs, cb, default, snap=True, dtype=torch.float64)
    tiny = flow_map(eps[:, None], probs[:, None], cb, FlowMapConfig(nfe=a.nfe, mem_budget_mb=2.0))[:, 0]
    v_other = solve_flow(eps, probs, cb, default, snap=True, v_chunk=1000)
    print(f"   [section 1: {time.perf_counter() - t_sec:.0f}s]")
    print(f"2. rounding: fp32 vs fp64 flips {(base != f64).sum().item()}/{n}; one batch vs tiny row chunks "
          f"{(base != tiny).sum().item()}/{n}; V chunk 4096 vs 1000 {(base != v_other).sum().item()}/{n}")

    # 3. distribution ------------------------------------------------------------------------------------
    m = a.tv_tokens
    probs = realistic_probs(m, s["v"], s["top_k"], seed=3)
    eps = torch.randn(m, s["c"], generator=torch.Generator().manual_seed(4))
    draw = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5))[:, 0]
    tv, gap, se = tv_stats(probs, draw)
    print(f"3. distribution over {m} tokens (rank-octile TV; mean log p(idx) + H):")
    print(f"   {'multinomial (noise floor)':<36} TV {tv:.4f}  gap {gap:+.3f} ± {se:.3f} nats")
    for label, cfg in [(f"default ({default.spacing} o3 exact lof)", default),
                       ("time_quadratic o2", FlowMapConfig(nfe=a.nfe, order=2)),
                       ("logsnr o3", FlowMapConfig(nfe=a.nfe, spacing="logsnr")),
                       ("time_uniform o3", FlowMapConfig(nfe=a.nfe, spacing="time_uniform")),
                       ("time_quadratic o3 official", FlowMapConfig(nfe=a.nfe, variant="official"))]:
        t0 = time.perf_counter()
        tv, gap, se = tv_stats(probs, solve_flow(eps, probs, cb, cfg, snap=True))
        print(f"   {label:<36} TV {tv:.4f}  gap {gap:+.3f} ± {se:.3f} nats  ({time.perf_counter() - t0:.0f}s)")

    # 4. cost ------------------------------------------------------------------------------------------
    t_sec = time.perf_counter()
    desc, t_teacher, tprobs = teacher_step_time(setting, a.batch or s["batch"], a.device, a.teacher, a.repeats)
    b, k, v = tprobs.shape
    teps = torch.randn(b, k, s["c"], generator=torch.Generator().manual_seed(6)).to(tprobs.device)
    tcb = cb.to(tprobs.device)
    t_map = timed(lambda: flow_map(teps, tprobs, tcb, default), a.repeats)
    print(f"4. cost, batch {b} x {k} tokens: flow map {1e3 * t_map:.1f} ms vs teacher step "
          f"{1e3 * t_teacher:.1f} ms -> map/step = {t_map / t_teacher:.2f} ({desc}; "
          f"{torch.get_num_threads()} threads, {a.device}) [section 4: {time.perf_counter() - t_sec:.0f}s]")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=list(SETTINGS) + ["all"], default="all")
    p.add_argument("--nfe", type=int, default=FlowMapConfig().nfe)
    p.add_argument("--extra-nfe", type=int, nargs="*", default=[20], help="also score the default at these NFE")
    p.add_argument("--ref-tokens", type=int, default=256, help="tokens solved with DOP853 (section 1-2)")
    p.add_argument("--tv-tokens", type=int, default=4096, help="tokens for the distribution check")
    p.add_argument("--var-code-std", type=float, default=0.1, help="std of the VAR-like raw codebook")
    p.add_argument("--codebook", default=None,
                   help="a real [V, C] codebook (torch.save'd tensor) instead of the random one; needs --setting")
    p.add_argument("--batch", type=int, default=None,
                   help="batch of the timed step (section 4; default llamagen 16, var 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--no-teacher", dest="teacher", action="store_false",
                   help="time the matmul stand-in instead of building the random-weight teacher")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.codebook and a.setting == "all":
        p.error("--codebook needs --setting llamagen or --setting var")
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for setting in SETTINGS:
            if a.setting in ("all", setting):
                bench_setting(setting, a)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
