"""DD-H vs plain DD on a digits teacher at an equal training budget (issue 17; not in CI).

    python tools/run_ddh_table.py --family llamagen --out demo_out/ddh

One pair data set per family is shared by every row. Rows: plain DD students trained for 1, 2 and 4
timesteps (DD-1/2/4: each sample one uniformly drawn timestep per step, as `dd train`) and DD-H
students trained for 2 and 4 (`--history all --lower-layers N`: every timestep of the trajectory
teacher-forced per step), all with the same optimizer steps, batch of pairs, lr and EMA, each sampled
with its own trained timesteps (`--control` adds DD-H-4 with `--history none`: the same teacher-forced
training without history); plus the teacher reference, floor and onestep* rows that g needs.
Quality and timing as `dd demo` (quality.py, mean ± sd over the sampling seeds). Writes the family's
section of results/ddh_table.md (or --results/ddh_table.md); finished data sets, runs and samples in
--out are re-used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from typing import List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from distilled_decoding.demo import DemoSize, run_dd, _timing  # noqa: E402
from distilled_decoding.seeding import reference_seed, sample_seeds  # noqa: E402

# 4-step and 2-step schedules per family (the 2-step one is the paper's scaled default)
SCHEDULES = {"llamagen": {1: "1", 2: "1,21", 4: "1,17,33,49"}, "var": {1: "1", 2: "1,4", 4: "1,2,3,4"}}
SIZE = DemoSize(num_pairs=3000, train_steps=600, batch_size=32, lr=3e-3, ema_decay=0.99, num_samples=500)


def train_seconds(run: str) -> float:
    """The optimizer steps' wall time of a finished run, from its metrics.jsonl (steps / it_per_s per line)."""
    total, prev = 0.0, 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            total += (rec["step"] - prev) / rec["it_per_s"]
            prev = rec["step"]
    return total


def train_argv(data: str, run: str, size: DemoSize, seed: int, steps: Optional[int] = None) -> List[str]:
    """The `dd train` arguments every student of these tables shares (size's budget, CPU, 1 process);
    the caller adds its timesteps, split and loss options."""
    steps = size.train_steps if steps is None else steps
    return ["train", "--data", data, "--out", run, "--max-steps", str(steps), "--batch-size", str(size.batch_size),
            "--lr", str(size.lr), "--ema-decay", str(size.ema_decay), "--ckpt-every", str(steps), "--log-every",
            "100", "--num-workers", "0", "--seed", str(seed), "--device", "cpu", "--no-progress"]


def sample_and_evaluate(methods: Sequence[tuple], reference: List[str], samples: str, size: DemoSize, seed: int,
                        S: int) -> Tuple[list, list]:
    """Sample every method [(key, label, steps, `dd sample` source args)] at the sampling seeds and the
    teacher (`reference`: its source args) at the reference seed, as `dd demo` (re-using finished
    samples under `samples`), and score them (quality.py) -> (rows, sampling seeds)."""
    from teachers.zoo import digits_data
    from distilled_decoding import quality
    from distilled_decoding.extractors import DigitsExtractor

    ref_seed, seeds = reference_seed(seed), sample_seeds(seed, size.num_seeds)
    plan = [("teacher", ref_seed, reference)] + [(key, s, extra) for s in seeds for key, _, _, extra in methods]
    files, spi, used = {}, {}, {}
    for key, s, extra in plan:
        d = os.path.join(samples, f"{key}-seed{s}")
        if not os.path.exists(os.path.join(d, "samples.npz")):
            run_dd(["sample", "--out", d] + extra + ["--num-samples", str(size.num_samples), "--batch-size",
                    str(size.sample_batch), "--seed", str(s), "--labels", "balanced", "--device", "cpu", "--warmup",
                    "--no-progress"])
        files.setdefault(key, []).append(os.path.join(d, "samples.npz"))
        spi.setdefault(key, []).append(_timing(d)["seconds_per_image"])
        used.setdefault(key, []).append(s)
    extractor = DigitsExtractor("cpu")
    real, _ = digits_data("test")
    real_f = extractor.features(real.to(extractor.device)).cpu().numpy()
    rows = quality.evaluate_rows([("teacher", f"teacher ({S}-step AR), reference draw", S)]
                                 + [(key, label, steps) for key, label, steps, _ in methods],
                                 files, used, real_f, extractor, spi)
    return rows, seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llamagen", choices=sorted(SCHEDULES))
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_out", "ddh"))
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    ap.add_argument("--history", default="all", choices=["none", "noise", "all"])
    ap.add_argument("--lower-layers", type=int, default=None, help="default: half the student's layers")
    ap.add_argument("--train-steps", type=int, default=SIZE.train_steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", action="store_true", help="add DD-H-4 with --history none (no history)")
    ap.add_argument("--equal-compute", action="store_true", help="add plain DD-4 trained for 4x the steps")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from teachers import load_teacher
    from distilled_decoding import quality

    size = dataclasses.replace(SIZE, train_steps=args.train_steps)
    fam, out, seed = args.family, os.path.join(args.out, args.family), args.seed
    name = f"digits-{fam}"
    teacher = load_teacher(name, device="cpu")
    S = teacher.num_steps
    depth = teacher.gpt.config.n_layer if fam == "llamagen" else teacher.var.cfg.depth
    lower = depth // 2 if args.lower_layers is None else args.lower_layers
    data = os.path.join(out, "data")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(data, "manifest.json")):
        run_dd(["build-dataset", "--teacher", name, "--out", data, "--num-samples", str(size.num_pairs),
                "--batch-size", "500", "--shard-size", "2000", "--seed", str(seed), "--device", "cpu"])
    t_data = time.perf_counter() - t0
    students = [("dd1", "DD 1-step", 1, []), ("dd2", "DD 2-step", 2, []), ("dd4", "DD 4-step", 4, []),
                ("ddh2", f"DD-H 2-step (history {args.history}, lower {lower}/{depth})", 2,
                 ["--history", args.history, "--lower-layers", str(lower)]),
                ("ddh4", f"DD-H 4-step (history {args.history}, lower {lower}/{depth})", 4,
                 ["--history", args.history, "--lower-layers", str(lower)])]
    if args.equal_compute:  # plain DD-4 given DD-H-4's forward work: 4x the steps (each DD-H step runs 4 blocks)
        students.append(("dd4x", "DD 4-step, 4x steps (DD-H-4's forward work)", 4,
                         ["--max-steps", str(4 * size.train_steps)]))
    if args.control:    # the same teacher-forced K-block training without history: what the history adds
        students.append(("ddhn4", "DD-H 4-step, history none (control)", 4, ["--history", "none"]))
    train_s, commands = {}, []
    for key, _, k, extra in students:
        run = os.path.join(out, key)
        # the equal-compute row: its own step count (and checkpoint at the end)
        steps = int(extra[extra.index("--max-steps") + 1]) if "--max-steps" in extra else None
        cmd = (train_argv(data, run, size, seed, steps) + ["--timesteps", SCHEDULES[fam][k], "--split", str(S)]
               + ([] if steps else extra))
        commands.append("dd " + " ".join(cmd))
        if not os.path.exists(os.path.join(run, "config.json")):
            run_dd(cmd)
        train_s[key] = train_seconds(run)
    methods = [("floor", "teacher, independent draws (floor)", S, ["--run", os.path.join(out, "dd1"), "--baseline", "teacher"])]
    methods += [(key, f"{label} (t = {SCHEDULES[fam][k]})", k, ["--run", os.path.join(out, key)])
                for key, label, k, _ in students]
    methods += [("onestep", "onestep* (token marginals)", 1, ["--data", data, "--baseline", "onestep"])]
    rows, seeds = sample_and_evaluate(methods, ["--run", os.path.join(out, "dd1"), "--baseline", "teacher"],
                                      os.path.join(out, "samples"), size, seed, S)
    title = (f"{name}: {size.num_pairs} pairs (one data set for every row), {size.train_steps} training steps of "
             f"batch {size.batch_size} for every student, lr {size.lr}, EMA {size.ema_decay}, {size.num_samples} "
             f"samples per method and seed, mean ± sd over {len(seeds)} sampling seeds")
    notes = ["Training seconds (optimizer steps, 1 thread, from each run's metrics.jsonl): " + ", ".join(f"{k} {v:.0f} s" for k, v in train_s.items())
             + f"; build-dataset {t_data:.0f} s."]
    table = quality.format_table(rows, title, notes)
    write_section(os.path.join(args.results, "ddh_table.md"), "# DD-H vs DD on the digits teachers", fam, "run_ddh_table.py", table, commands)


def write_section(path: str, heading: str, family: str, script: str, table: str, commands) -> None:
    """Write `table` and the training `commands` as `family`'s section of the results page `path` (created
    with `heading`), headed by the exact command line of `script` that made it; print the table."""
    cmd = " ".join(["python", f"tools/{script}"] + [shlex.quote(a) for a in sys.argv[1:]])
    body = (f"Made by `{cmd}` on {platform.processor() or platform.machine()} (1 thread, torch "
            f"{torch.__version__}, cpu, a 2-core machine shared with other jobs, so seconds are noisy).\n\n"
            f"{table}\n\nThe training commands:\n\n" + "\n".join(f"    {c}" for c in commands))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    old = open(path).read() if os.path.exists(path) else heading + "\n"
    with open(path, "w") as f:
        f.write(splice(old, family, body))
    print(table)
    print(f"wrote the {family} section of {path}")


def splice(text: str, family: str, body: str) -> str:
    """`text` with `body` between the family's BEGIN/END markers (appended when it has none)."""
    begin, end = f"<!-- BEGIN {family} -->", f"<!-- END {family} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


if __name__ == "__main__":
    main()
