"""ARD sampling speed: ms/image of an ARD student (S steps, N lower blocks, each mask) against step
distillation (the same student with N = 0), both through `ard_student.ard_sample`.

    python tools/bench_ard.py                                   # DiT-S/2 at 256 px, S = 4, batch 8
    python tools/bench_ard.py --config DiT-XL/2 --device cuda --batch 64 --repeats 20

Random weights of the named preset (the official init; the cost does not depend on the values).
Runs are interleaved (SD, ARD M1..M4, SD, ...) and the median of --repeats is reported, with the
analytic GFLOPs ratio of `ard_flops.py` beside it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    from distilled_decoding.ard_flops import ard_gflops, step_distillation_gflops
    from distilled_decoding.ard_student import ARDConfig, ard_sample, build_ard_student
    from distilled_decoding.ard_train import default_lower_layers
    from teachers.dit import DiT, as_dit_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="DiT-S/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="S")
    ap.add_argument("--lower-layers", type=int, default=None, help="N (default: the paper's 6/28 of the depth)")
    ap.add_argument("--masks", default="M1,M2,M3,M4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    cfg = as_dit_config(a.config, a.image_size)
    N = default_lower_layers(cfg.depth) if a.lower_layers is None else a.lower_layers
    times = tuple(round(999 * (a.steps - k) / a.steps) for k in range(a.steps))
    torch.manual_seed(0)
    teacher = DiT(cfg).to(a.device, dtype).eval()
    students = {"SD (N = 0)": build_ard_student(teacher, ARDConfig(cfg.to_dict(), a.steps, 0, "M1", times)).eval()}
    for m in a.masks.split(","):
        students[f"ARD {m} (N = {N})"] = build_ard_student(teacher, ARDConfig(cfg.to_dict(), a.steps, N, m, times)).eval()
    noise = torch.randn(a.batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=a.device, dtype=dtype)
    labels = torch.randint(0, cfg.num_classes, (a.batch,), device=a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    for s in students.values():                                           # warm-up
        ard_sample(s, noise, labels)
    runs = {name: [] for name in students}
    for _ in range(a.repeats):
        for name, s in students.items():
            sync()
            t0 = time.perf_counter()
            ard_sample(s, noise, labels)
            sync()
            runs[name].append((time.perf_counter() - t0) / a.batch * 1e3)
    print(f"{a.config} at {a.image_size} px, S = {a.steps}, batch {a.batch}, {a.dtype}, {a.device}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"median of {a.repeats}")
    sd = statistics.median(runs["SD (N = 0)"])
    sd_flops = step_distillation_gflops(cfg, a.steps)
    print("| student | ms/image | vs SD | GFLOPs/image (analytic) | vs SD |")
    print("|---|---:|---:|---:|---:|")
    for name, r in runs.items():
        ms = statistics.median(r)
        lower, mask = (0, "M1") if name.startswith("SD") else (N, name.split()[1])
        g = ard_gflops(cfg, a.steps, lower, mask)
        print(f"| {name} | {ms:.2f} | {ms / sd:.3f}x | {g:.2f} | {g / sd_flops:.4f}x |")


if __name__ == "__main__":
    main()
