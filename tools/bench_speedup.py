"""DD speed-up: teacher AR sampling (CFG, KV cache) vs DD 1-step and 2-step, measured in one run.

    python tools/bench_speedup.py                                   # LlamaGen GPT-L and VAR-d16, batch 1 and 16
    python tools/bench_speedup.py --family llamagen --teacher-steps 32 --batch 1 16
    python tools/bench_speedup.py --layers 4                         # reduced depth (labelled)

Random weights of the named teacher config; the student is `build_student(teacher)` (the paper's
timesteps and split for that teacher). Decoding (VQ decoder) is excluded everywhere: it is the same
for every sampler. Times are wall clock (CUDA synchronised), best of --repeat; every call is warmed up once at the
first batch size;
on a CPU shared with other jobs use `--threads 1 --clock cpu` (this process's CPU time), which
contention does not inflate.

Rows per batch size:
- teacher AR: `Teacher.sample` with the family's DD sampling (CFG 2.0: a doubled batch), KV cache.
  With --teacher-steps K only the first K AR steps run and the full run is extrapolated linearly in
  tokens (marked "est."); later LlamaGen steps attend over a longer cache, so this is a lower bound.
- DD-1 / DD-2: `sampling.dd_sample` with the first 1 / 2 trained timesteps (network, head merge and the
  nearest-code search that gives the tokens).
- student net: one `student(x, labels, t)` call (the backbone with both heads).
- bare fwd: the teacher's teacher-forced forward over the whole sequence (`Teacher.logits`: the
  class slot plus n-1 tokens for LlamaGen, the n-token block-causal pass for VAR), i.e. one bare
  backbone pass of the same size; DD-1 / bare fwd is the overhead of our student path.

--layers L rebuilds both configs with L transformer layers at the same width (all ratios then refer
to that depth and say so); use it, --teacher-steps and smaller --batch on slow CPUs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ENTRIES = [("llamagen", "GPT-L"), ("var", "d16")]
DEPTH_KEY = {"llamagen": "n_layer", "var": "depth"}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def timeit(fn, device, repeat: int = 1, warmup: bool = True) -> float:
    if warmup:
        fn()
    best = float("inf")
    for _ in range(max(1, repeat)):
        _sync(device)
        t0 = _clock()
        fn()
        _sync(device)
        best = min(best, _clock() - t0)
    return best


def bench_entry(family, config, batches, teacher_steps, layers, repeat, dtype, device, seed=0, log=print):
    from teachers import load_teacher
    from distilled_decoding.seeding import sample_noise
    from distilled_decoding.samplers import dd_sample
    from distilled_decoding.student import build_student

    cfg = config if layers is None else {"preset": config, DEPTH_KEY[family]: layers}
    name = f"{family} {config}" + (f" (reduced to {layers} layers)" if layers is not None else "")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    teacher = load_teacher(family, cfg, device=device, dtype=dtype).eval()
    student = build_student(teacher).eval()
    n_par = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    tr = teacher.gpt if family == "llamagen" else teacher.var
    ts = student.config.timesteps
    log(f"{name}: teacher transformer {n_par(tr):.0f}M, student {n_par(student):.0f}M params, built in "
        f"{time.perf_counter() - t0:.0f}s; {str(dtype).replace('torch.', '')}, {device}, "
        f"{torch.get_num_threads()} threads, {'CPU-time' if _clock is time.process_time else 'wall'} clock; "
        f"timesteps {ts}, split {student.config.split}")
    sampling = teacher.default_sampling
    S, n = teacher.num_steps, teacher.num_tokens
    K = S if teacher_steps is None else max(1, min(teacher_steps, S))
    k_tok = teacher.step_offsets[K]
    est = "est. " if K < S else ""
    log(f"  teacher sampling {sampling.to_dict()}; AR timed over {K} of {S} steps ({k_tok} of {n} tokens)"
        + ("; full AR time extrapolated linearly in tokens (a lower bound)" if K < S else ""))
    results = []
    for bi, B in enumerate(batches):
        warm = bi == 0                   # kernels are warm after the first batch size's calls
        g = torch.Generator(device=device).manual_seed(seed)
        labels = torch.randint(0, teacher.num_classes, (B,), generator=torch.Generator().manual_seed(seed)).to(device)
        noise = sample_noise(seed, range(B), n, teacher.embed_dim).to(device)
        tokens = torch.randint(0, teacher.vocab_size, (B, n), device=device)
        with torch.inference_mode():
            if warm:
                teacher.sample(labels, sampling, generator=g, stop_step=min(2, K))  # warm-up
            t_ar = timeit(lambda: teacher.sample(labels, sampling, generator=g, stop_step=K), device, 1,
                          warmup=False) * n / k_tok
            t1 = timeit(lambda: dd_sample(student, noise, labels, ts[:1]), device, repeat, warm)
            t2 = timeit(lambda: dd_sample(student, noise, labels, ts[:2]), device, repeat, warm) \
                if len(ts) > 1 else float("nan")
            t1_ = torch.ones(B, dtype=torch.long, device=device)
            t_net = timeit(lambda: student(noise, labels, t1_), device, repeat, warm)
            t_fwd = timeit(lambda: teacher.logits(labels, tokens), device, repeat, warm)
        r = dict(family=family, batch=B, ar=t_ar, dd1=t1, dd2=t2, net=t_net, fwd=t_fwd, est=bool(est))
        results.append(r)
        log(f"  batch {B:>3}: teacher AR {est}{t_ar:8.2f}s | DD-1 {t1:7.3f}s | DD-2 {t2:7.3f}s | "
            f"student net {t_net:7.3f}s | bare fwd {t_fwd:7.3f}s")
        log(f"             speed-up AR/DD-1 = {est}{t_ar / t1:6.1f}x, AR/DD-2 = {est}{t_ar / t2:6.1f}x; "
            f"DD-1/bare fwd = {t1 / t_fwd:.2f}, DD-1/student net = {t1 / t_net:.2f}")
    del teacher, student
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["llamagen", "var", "all"], default="all")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="time only the first K teacher AR steps and extrapolate (default: all)")
    p.add_argument("--layers", type=int, default=None, help="reduce both models to this many layers")
    p.add_argument("--repeat", type=int, default=1, help="DD / forward timings: best of R (after a warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                   help="wall: wall clock; cpu: this process's CPU time (robust on a shared CPU with "
                        "--threads 1; meaningless on CUDA)")
    a = p.parse_args(argv)
    global _clock
    _clock = CLOCK[a.clock]
    if a.clock == "cpu" and a.device != "cpu":
        p.error("--clock cpu only measures CPU devices")
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.float32
    for family, config in ENTRIES:
        if a.family in ("all", family):
            bench_entry(family, config, a.batch, a.teacher_steps, a.layers, a.repeat, dtype, a.device)


if __name__ == "__main__":
    main()
