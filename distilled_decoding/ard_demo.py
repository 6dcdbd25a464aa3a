"""`dd ard demo`: the whole ARD pipeline on the zoo's pixel-space DiT (`digits-dit`), ending in a table
shaped like Table 1 of the ARD paper.

    ard build-dataset (DDIM-25 at CFG 1.5, S = 4, paper kept set) -> ard train x 3 -> ard sample -> eval

Rows: the teacher's DDIM-25 (one reference draw, and the same sampler at the evaluation seeds: the
floor row), the teacher's DDIM-S from the same noise, knowledge distillation (one step: the S = 1
sub-trajectory), step distillation (S steps: mask M1, no history) and ARD (S steps, mask M4 in the N
lower blocks). Every stage is the real `dd ard` verb, its command line printed first: in-process, or
with procs > 1 build-dataset and train under torchrun on that many local ranks (the same shards and global
batches, so only the seconds change); sampling and timing always run in this process.

Columns: FID against the held-out real digits and against the reference teacher draw on the zoo
classifier's features (`quality.py`: floor row, g, precision/recall, class accuracy, mean ± sd over
sampling seeds), g anchored at KD 1-step (g = 1: no better than one-step distillation, 0: as good as
the teacher), ms / image measured side by side in one process (the samplers take turns on the same
batch, median of the rounds), analytic GFLOPs per image (`ard_flops.py`; CFG doubles the teacher's
batch), and the mean squared error to the teacher's DDIM-25 image from the same noise and label.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import click
import numpy as np
import torch

from .demo import ON_RANKS, run_on_ranks, run_verb
from .seeding import reference_seed, sample_seeds

TEACHER = "digits-dit"


@dataclasses.dataclass(frozen=True)
class ARDDemoSize:
    """How much work each stage does. The default must finish in 10 minutes on 2 CPU cores (1 thread)."""

    num_trajectories: int
    train_steps: int          # each S-step student (M1, M4)
    kd_steps: int             # the one-step student (4x cheaper a step)
    batch_size: int
    lr: float
    ema_decay: float
    num_samples: int          # images per method and sampling seed
    num_seeds: int = 3
    num_steps: int = 4        # S
    sample_batch: int = 250
    timing_batch: int = 50
    timing_rounds: int = 3


SIZES = {
    "default": ARDDemoSize(num_trajectories=1000, train_steps=200, kd_steps=400, batch_size=32, lr=2e-3,
                           ema_decay=0.98, num_samples=300),
    # results/ard_digits_table.md: the default's data, 3x the training, more samples (~20 min on 1 thread)
    "long": ARDDemoSize(num_trajectories=1000, train_steps=600, kd_steps=1200, batch_size=32, lr=2e-3,
                        ema_decay=0.98, num_samples=500),
    # tests/test_ard_cli.py: every stage and the table, in seconds (the numbers mean nothing)
    "tiny": ARDDemoSize(num_trajectories=24, train_steps=3, kd_steps=3, batch_size=8, lr=1e-3, ema_decay=0.5,
                        num_samples=20, num_seeds=1, sample_batch=20, timing_batch=10, timing_rounds=1),
}


def _images(path: str) -> np.ndarray:
    with np.load(path) as z:
        return z["arr_0"].astype(np.float32) / 255.0


def endpoint_mse(path: str, teacher_path: str) -> float:
    """Mean squared error between two samples.npz of the same seed, image by image, in [0, 1]."""
    a, b = _images(path), _images(teacher_path)
    if a.shape != b.shape:
        raise ValueError(f"{path} and {teacher_path} hold different image sets ({a.shape} vs {b.shape})")
    return float(((a - b) ** 2).mean())


@torch.no_grad()
def side_by_side_timing(plans: Dict[str, object], batch: int, rounds: int, seed: int, device: str) -> Dict[str, float]:
    """Seconds per image of each plan's model (no decoding), the plans taking turns on one batch of
    noise and labels: one untimed warm-up each, then `rounds` rounds; the median per plan."""
    from .seeding import make_labels
    from .timing import Stopwatch
    from .trajectories import trajectory_noise
    some = next(iter(plans.values()))
    idx = list(range(batch))
    noise = trajectory_noise(seed, idx, some.teacher.latent_shape).to(device)
    labels = make_labels(seed, idx, some.teacher.num_classes, "balanced").to(device)
    for p in plans.values():
        p.sample(noise, labels)
    times = {k: [] for k in plans}
    for _ in range(rounds):
        for k, p in plans.items():
            sw = Stopwatch(device)
            with sw:
                p.sample(noise, labels)
            times[k].append(sw.seconds / batch)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def comparison_grid(plans: Dict[str, object], names: Dict[str, str], path: str, seed: int, device: str) -> str:
    """One row per sampler, one column per class, from the same noise: `path` (PNG)."""
    from .images import labelled_rows, save_png, to_uint8
    from .trajectories import trajectory_noise
    some = next(iter(plans.values()))
    n = some.teacher.num_classes
    noise = trajectory_noise(seed, range(n), some.teacher.latent_shape).to(device)
    labels = torch.arange(n, device=device)
    rows = [(names[k], to_uint8(p.teacher.decode(p.sample(noise, labels)))) for k, p in plans.items()]
    save_png(labelled_rows(rows), path)
    return path


@dataclasses.dataclass(frozen=True)
class Method:
    """One table row: `key`, its `label` and `steps`, drawn either by a student (`run`, an ARD run
    directory) or by the teacher (`baseline`: "teacher" = its DDIM at the data set's steps, "ddim-N")."""

    key: str
    label: str
    steps: int
    run: Optional[str] = None
    baseline: Optional[str] = None
    short: Optional[str] = None       # its name in the comparison grid (default: the label)

    def sample_args(self, data: str) -> List:
        return ["--run", self.run] if self.run else ["--baseline", self.baseline, "--data", data]


def run_ard(verbs: Dict[str, click.Command], args: List, log: Callable[[str], None], procs: int = 1) -> None:
    """`dd ard ARGS` in-process, or for a verb of `demo.ON_RANKS` with procs > 1 on that many local
    torchrun ranks (`demo.run_on_ranks`), as `demo.run_dd` does for `dd`."""
    if procs > 1 and str(args[0]) in ON_RANKS:
        run_on_ranks(["ard", *args], procs, log)
    else:
        run_verb(verbs, args, log, group="dd ard")


def build_trajectories(verbs: Dict[str, click.Command], data: str, size: ARDDemoSize, seed: int, device: str,
                       log: Callable[[str], None], history: str = "state", procs: int = 1) -> None:
    """`dd ard build-dataset` of the demo's teacher into `data` (resumes; a finished set is verified)."""
    run_ard(verbs, ["build-dataset", "--teacher", TEACHER, "--out", data, "--num-samples", size.num_trajectories,
                    "--num-steps", size.num_steps, "--batch-size", size.sample_batch, "--shard-size", 1000,
                    "--history", history, "--seed", seed, "--device", device], log, procs)


def train_student(verbs: Dict[str, click.Command], data: str, run: str, extra: List, steps: int, size: ARDDemoSize,
                  seed: int, device: str, log: Callable[[str], None], procs: int = 1) -> None:
    """`dd ard train` of one student (options `extra`, e.g. ["--mask", "M1"]) for `steps` steps at the
    size's batch, lr and EMA; a run already in `run` is resumed (a finished one is left as it is)."""
    args = ["train", "--data", data, "--out", run, *extra, "--max-steps", steps, "--batch-size", size.batch_size,
            "--lr", size.lr, "--ema-decay", size.ema_decay, "--ckpt-every", steps, "--log-every", max(1, steps // 4),
            "--num-workers", 0, "--seed", seed, "--device", device, "--no-progress"]
    if os.path.exists(os.path.join(run, "config.json")) or os.path.isdir(os.path.join(run, "checkpoints")):
        args.append("--resume")
    run_ard(verbs, args, log, procs)


def evaluate_methods(methods: List[Method], data: str, samples_dir: str, size: ARDDemoSize,
                     verbs: Dict[str, click.Command], seed: int = 0, device: str = "cpu", anchor: str = "kd",
                     grid: Optional[str] = None, log: Callable[[str], None] = click.echo) -> dict:
    """Sample every method at the evaluation seeds with `dd ard sample` (plus the teacher's reference
    draw), time them side by side, score them (`quality.evaluate_rows`, g anchored at `anchor`) and add
    GFLOPs and the MSE to the teacher's endpoint. `methods` must hold a "floor" row (the teacher at the
    data set's steps). Returns {"rows", "extra_columns", "notes", "seeds", "reference_seed",
    "teacher_steps", "cfg_scale", "num_real", "real_floor_fid", "compare"}."""
    from teachers.zoo import digits_data
    from . import quality
    from .ard_flops import ard_config_gflops, dit_gflops
    from .ard_sampling import make_plan
    from .ard_student import ARDConfig
    from .ard_train import read_ard_run_config
    from .extractors import DigitsExtractor

    with open(os.path.join(data, "manifest.json")) as f:
        steps = json.load(f)["settings"]["steps"]
    floor = next(m for m in methods if m.key == "floor")
    run_infos = {m.key: read_ard_run_config(m.run) for m in methods if m.run}
    # a student's samples are named by its training step: a longer run of the same --out samples anew
    # (a sample directory is never overwritten), while the teacher's sample sets are extended
    tags = {k: f"-step{info.get('step', 0)}" for k, info in run_infos.items()}
    ref_seed, seeds = reference_seed(seed), sample_seeds(seed, size.num_seeds)
    plan = [("teacher", ref_seed, floor.sample_args(data))] + [(m.key, s, m.sample_args(data))
                                                                for s in seeds for m in methods]
    files, used = {}, {}
    for key, s, extra in plan:
        d = os.path.join(samples_dir, f"{key}-seed{s}{tags.get(key, '')}")
        run_verb(verbs, ["sample", "--out", d, *extra, "--num-samples", size.num_samples, "--batch-size",
                         size.sample_batch, "--seed", s, "--labels", "balanced", "--device", device, "--no-progress"], log, group="dd ard")
        files.setdefault(key, []).append(os.path.join(d, "samples.npz"))
        used.setdefault(key, []).append(s)

    # ms / image side by side, and a comparison grid, with the very samplers `dd ard sample` used
    plans = {m.key: make_plan(m.run, m.baseline, None if m.run else data, None, device) for m in methods}
    log(f"\ntiming the samplers side by side: {size.timing_rounds} round(s) of {size.timing_batch} images each")
    spi = side_by_side_timing(plans, size.timing_batch, size.timing_rounds, ref_seed, device)
    spi["teacher"] = spi["floor"]
    compare = comparison_grid(plans, {m.key: m.short or m.label for m in methods}, grid, ref_seed, device) if grid else None

    extractor = DigitsExtractor(device)
    real, _ = digits_data("test")
    real_f = extractor.features(real.to(extractor.device)).cpu().numpy()
    train_f = extractor.features(digits_data("train")[0].to(extractor.device)).cpu().numpy()
    floor_real = quality.real_floor(real_f, train_f, size.num_samples, seed)
    table_methods = [("teacher", f"teacher DDIM-{steps}, reference draw", steps)] + [(m.key, m.label, m.steps)
                                                                                      for m in methods]
    timings = {k: [spi[k]] * len(v) for k, v in used.items()}
    rows = quality.evaluate_rows(table_methods, files, used, real_f, extractor, timings, anchor=anchor)

    dit = plans["floor"].teacher.model.cfg
    cfg_mult = 2 if plans["floor"].cfg_scale != 1.0 else 1                 # CFG: conditional + null halves
    gflops = {m.key: (ard_config_gflops(ARDConfig.from_dict(run_infos[m.key]["student"])) if m.run
                      else plans[m.key].steps * cfg_mult * dit_gflops(dit)) for m in methods}
    gflops["teacher"] = gflops["floor"]
    mse = {k: [endpoint_mse(p, t) for p, t in zip(files[k], files["floor"])] for k in files if k != "teacher"}
    for r in rows:
        r["gflops"] = gflops[r["key"]]
        r["mse_teacher_endpoint"] = mse.get(r["key"])

    def mse_cell(r):
        if r["key"] == "teacher":
            return "—"
        if r["key"] == "floor":
            return "0 (itself)"
        m, sd = quality.summarise(r["mse_teacher_endpoint"])
        return f"{m:.4f}" + (f" ± {sd:.4f}" if len(r["seeds"]) > 1 else "")

    anchor_label = next(m.label for m in methods if m.key == anchor)
    notes = [f"Real-vs-real floor of the FID vs real column: {size.num_samples} training digits vs the "
             f"{real.shape[0]} held-out ones score {floor_real:.2f}. Floor row: the teacher's DDIM-{steps} at seeds "
             f"{','.join(map(str, seeds))} against its reference draw at seed {ref_seed}; precision/recall are "
             f"against that reference (k = 3). g = (FID vs teacher − floor) / (FID vs teacher of {anchor_label} − floor).",
             f"ms / image: the model alone (no decoding), the samplers taking turns on one batch of "
             f"{size.timing_batch} in one process, median of {size.timing_rounds} round(s); speed-up vs the "
             f"teacher's DDIM-{steps}. GFLOPs: analytic (ard_flops.py), the teacher's doubled by CFG. MSE to "
             f"teacher endpoint: per pixel in [0, 1] against the teacher's DDIM-{steps} image from the same noise "
             "and label (the floor row's samples at the same seed)."]
    extra = [("GFLOPs / image", lambda r: f"{r['gflops']:.3f}"), ("MSE to teacher endpoint ↓", mse_cell)]
    return {"rows": rows, "extra_columns": extra, "notes": notes, "seeds": seeds, "reference_seed": ref_seed,
            "teacher_steps": steps, "cfg_scale": plans["floor"].cfg_scale, "num_real": int(real.shape[0]),
            "real_floor_fid": floor_real, "compare": compare}


def run_ard_demo(out: str, size: ARDDemoSize, verbs: Dict[str, click.Command], seed: int = 0, device: str = "cpu",
                 log: Callable[[str], None] = click.echo, procs: int = 1) -> dict:
    """Run the pipeline into `out`; return {"rows", "table", ...}. Re-running reuses the finished
    trajectory set and training runs (both resume) and re-draws the samples. procs: local ranks of
    build-dataset and train."""
    from . import quality
    from .ard_student import ARDConfig
    from .ard_train import read_ard_run_config

    S = size.num_steps
    data = os.path.join(out, "data")
    t0 = time.perf_counter()
    build_trajectories(verbs, data, size, seed, device, log, procs=procs)
    t_data = time.perf_counter() - t0

    students = {"kd": ["--steps", 1], "m1": ["--mask", "M1"], "ard": ["--mask", "M4"]}
    runs = {k: os.path.join(out, f"run-{k}") for k in students}
    for key, extra in students.items():
        train_student(verbs, data, runs[key], extra, size.kd_steps if key == "kd" else size.train_steps, size, seed,
                      device, log, procs=procs)
    t_train = time.perf_counter() - t0 - t_data
    N = ARDConfig.from_dict(read_ard_run_config(runs["ard"])["student"]).lower_layers

    t_sample = time.perf_counter()
    with open(os.path.join(data, "manifest.json")) as f:
        steps = json.load(f)["settings"]["steps"]
    methods = [Method("floor", f"teacher DDIM-{steps}, independent draws (floor)", steps, baseline="teacher",
                      short=f"teacher DDIM-{steps}"),
               Method("ddimS", f"teacher DDIM-{S}, same noise", S, baseline=f"ddim-{S}", short=f"teacher DDIM-{S}"),
               Method("kd", "KD 1-step (S = 1)", 1, run=runs["kd"], short="KD 1-step"),
               Method("m1", f"step distillation {S}-step (M1)", S, run=runs["m1"], short=f"step distillation {S}-step"),
               Method("ard", f"ARD {S}-step (M4, N = {N})", S, run=runs["ard"])]
    ev = evaluate_methods(methods, data, os.path.join(out, "samples"), size, verbs, seed, device, anchor="kd",
                          grid=os.path.join(out, "compare.png"), log=log)
    rows, seeds = ev["rows"], ev["seeds"]
    t_sample = time.perf_counter() - t_sample
    title = (f"{TEACHER}: {size.num_trajectories} DDIM-{steps} trajectories (CFG {ev['cfg_scale']:g}), "
             f"S = {S}, {size.train_steps} training steps per {S}-step student ({size.kd_steps} for KD), batch "
             f"{size.batch_size}; {size.num_samples} samples per method and seed, mean ± sd over {len(seeds)} "
             f"sampling seed(s); FID on digits-classifier features vs {ev['num_real']} held-out digits")
    table = quality.format_table(rows, title, ev["notes"], extra_columns=ev["extra_columns"])
    info = {"size": dataclasses.asdict(size), "seed": seed, "device": device, "threads": torch.get_num_threads(),
            "procs": procs,
            "reference_seed": ev["reference_seed"], "sample_seeds": seeds, "real_floor_fid": ev["real_floor_fid"],
            "lower_layers": N,
            "seconds": {"build_dataset": t_data, "train": t_train, "sample_and_eval": t_sample,
                        "total": time.perf_counter() - t0},
            "rows": rows, "table": table, "compare": ev["compare"], "runs": runs, "data": data}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(info, f, indent=2, default=float)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    return info
