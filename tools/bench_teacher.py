"""Teacher speed: KV-cached AR sampling tokens/s vs one teacher-forced forward, per family.

    python tools/bench_teacher.py                         # every entry, batch 1 and 8
    python tools/bench_teacher.py --family llamagen --steps 16 --batch 1 8

Random weights of the named config (no checkpoint needed). With `--steps N` only the first N AR steps
are timed and the full run is extrapolated linearly from them; later steps attend over a longer
cache, so the extrapolation is a lower bound on the full run's time. The sampling settings are the
teacher's `default_sampling` (DD's: LlamaGen cfg 2.0, i.e. a doubled batch) unless `--cfg` is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

# (family, config) entries; a family whose module cannot be imported is reported 'not available'.
ENTRIES = [("llamagen", "GPT-L"), ("var", "d16")]


def bench_entry(family: str, config: str, batches, steps, dtype, device, cfg, seed=0) -> None:
    from teachers import family_module, load_teacher
    try:
        family_module(family)
    except ImportError as e:
        print(f"{family} {config}: not available ({e.__class__.__name__}: {e})")
        return
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    teacher = load_teacher(family, config, device=device, dtype=dtype)
    print(f"{family} {config}: built with random weights in {time.perf_counter() - t0:.1f}s "
          f"({sum(p.numel() for p in teacher.parameters()) / 1e6:.0f}M params incl. tokenizer, "
          f"{dtype}, {device}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    sampling = teacher.default_sampling
    if cfg is not None:
        sampling = dataclasses.replace(sampling, cfg_scale=cfg)
    n_steps = teacher.num_steps if steps is None else min(steps, teacher.num_steps)
    n_tok = teacher.step_offsets[n_steps]
    print(f"  sampling {sampling.to_dict()}; timing {n_steps} of {teacher.num_steps} AR steps "
          f"({n_tok} of {teacher.num_tokens} tokens)"
          + ("; full-run numbers are extrapolated linearly" if n_steps < teacher.num_steps else ""))
    gen = torch.Generator(device=device).manual_seed(seed)
    for B in batches:
        labels = torch.randint(0, teacher.num_classes, (B,), device=device)
        teacher.sample(labels, sampling, generator=gen, stop_step=min(2, n_steps))   # warm-up
        t0 = time.perf_counter()
        teacher.sample(labels, sampling, generator=gen, stop_step=n_steps)
        t_ar = time.perf_counter() - t0
        t_ar_full = t_ar * teacher.num_tokens / n_tok
        tokens = torch.randint(0, teacher.vocab_size, (B, teacher.num_tokens), device=device)
        teacher.logits(labels, tokens[:, : teacher.step_offsets[min(2, teacher.num_steps)]])
        t0 = time.perf_counter()
        teacher.logits(labels, tokens)
        t_tf = time.perf_counter() - t0
        est = "est. " if n_steps < teacher.num_steps else ""
        print(f"  batch {B}: AR {B * n_tok / t_ar:8.1f} tokens/s ({est}{t_ar_full:.1f}s per "
              f"{teacher.num_tokens}-token batch) | teacher-forced forward {t_tf:.2f}s "
              f"(conditional only) | AR / forward = {est}{t_ar_full / t_tf:.0f}x")


def main(argv=None) -> None:
    families = sorted({f for f, _ in ENTRIES})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=families + ["all"], default="all")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=None,
                   help="time only the first N AR steps and extrapolate (default: all)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cfg", type=float, default=None, help="override the CFG scale")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    with torch.inference_mode():
        for family, config in ENTRIES:
            if a.family in ("all", family):
                bench_entry(family, config, a.batch, a.steps, dtype, a.device, a.cfg)


if __name__ == "__main__":
    main()
