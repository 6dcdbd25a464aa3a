"""The embedding-loss variants of issue 13 at an equal training budget on a digits teacher (not in CI).

    python tools/run_loss_table.py --family llamagen --out demo_out/loss
    python tools/run_loss_table.py --family llamagen --time-only     # ms per training step of each loss

One pair data set per family serves every row (`--data` re-uses an existing one). Three students,
each trained on the family's scaled 2-step schedule with the same steps, batch, lr, EMA and seed
(tools/run_ddh_table.py's budget): CE only (`--lambda-emb 0`), CE + MSE (`--emb-loss mse`) and CE +
perceptual (`--emb-loss perceptual`, perceptual.py). Each is sampled DD-1 and DD-2 twice: at the
scaled default split (the embedding head makes the AR steps from the split on) and at split = all
steps (the logits head everywhere, as `dd demo`); plus the teacher reference, floor and onestep*
rows g needs. `--perceptual-lambdas 0.1 ...` adds CE + perceptual students at other `--lambda-emb`. Before training, one process times a training step (forward, backward, AdamW) of each
loss side by side on the same batch. Writes the family's section of results/loss_variants.md (or
--results/loss_variants.md); finished data sets, runs and samples in --out are re-used.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import torch  # noqa: E402

from distilled_decoding.demo import run_dd  # noqa: E402
from run_ddh_table import SCHEDULES, SIZE, sample_and_evaluate, train_argv, write_section, train_seconds  # noqa: E402

# key -> (row label, `dd train` loss options)
LOSSES = {"ce": ("CE only", ["--lambda-emb", "0"]),
          "mse": ("CE + MSE", ["--emb-loss", "mse"]),
          "perceptual": ("CE + perceptual", ["--emb-loss", "perceptual"])}


def time_steps(teacher, data: str, batch_size: int, reps: int, seed: int = 0) -> dict:
    """ms per training step (forward, backward, AdamW step) of each loss of LOSSES on one batch of
    `data`, the losses interleaved round by round (so machine load hits them alike) -> {key: median ms}."""
    from distilled_decoding.dataset import PairDataset
    from distilled_decoding.dd_loss import dd_loss, make_emb_loss
    from distilled_decoding.student import build_student

    pairs = PairDataset(data)
    items = [pairs[i] for i in range(batch_size)]
    noise = torch.stack([x["noise"] for x in items]).float()
    tokens = torch.stack([x["tokens"] for x in items]).long()
    labels = torch.stack([x["label"] for x in items]).long()
    setups = {}
    for key, (_, opts) in LOSSES.items():
        student = build_student(teacher, seed=seed).train()
        kind = opts[1] if opts[0] == "--emb-loss" else "mse"
        lam = 0.0 if key == "ce" else 1.0
        ts = student.config.timesteps
        t = torch.tensor([ts[i % len(ts)] for i in range(batch_size)])
        setups[key] = (student, torch.optim.AdamW(student.parameters(), lr=1e-4), make_emb_loss(kind, teacher)[0], lam, t)
    times = {k: [] for k in setups}
    for r in range(reps + 2):                        # 2 warm-up rounds
        for key, (student, opt, fn, lam, t) in setups.items():
            t0 = time.perf_counter()
            loss, _ = dd_loss(student, noise, tokens, labels, t, codebook=student.codebook,
                              step_offsets=student.step_offsets, lambda_emb=lam, emb_loss=fn)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r >= 2:
                times[key].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llamagen", choices=sorted(SCHEDULES))
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_out", "loss"))
    ap.add_argument("--data", default=None, help="an existing pair data set of the teacher (default: built in --out)")
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    ap.add_argument("--train-steps", type=int, default=SIZE.train_steps)
    ap.add_argument("--time-reps", type=int, default=10, help="timed training steps per loss")
    ap.add_argument("--time-only", action="store_true", help="only time the training steps")
    ap.add_argument("--perceptual-lambdas", type=float, nargs="*", default=[],
                    help="more CE + perceptual students, at these --lambda-emb (default 1 only)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from teachers import load_teacher
    from distilled_decoding import quality
    from distilled_decoding.student import build_student

    size = dataclasses.replace(SIZE, train_steps=args.train_steps)
    fam, out, seed = args.family, os.path.join(args.out, args.family), args.seed
    name = f"digits-{fam}"
    teacher = load_teacher(name, device="cpu")
    S = teacher.num_steps
    scaled = build_student(teacher).config             # the paper's schedule and split scaled to the teacher
    timesteps, split = scaled.timesteps, scaled.split
    ts = ",".join(map(str, timesteps))
    data = args.data or os.path.join(out, "data")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(data, "manifest.json")):
        run_dd(["build-dataset", "--teacher", name, "--out", data, "--num-samples", str(size.num_pairs),
                "--batch-size", "500", "--shard-size", "2000", "--seed", str(seed), "--device", "cpu"])
    t_data = time.perf_counter() - t0
    ms = time_steps(teacher, data, size.batch_size, args.time_reps, seed)
    timing = (f"One training step (forward, backward, AdamW) on a batch of {size.batch_size} pairs, median of "
              f"{args.time_reps} interleaved steps per loss, 1 thread, in one process: "
              + ", ".join(f"{LOSSES[k][0]} {v:.0f} ms" for k, v in ms.items())
              + f" (perceptual / MSE = {ms['perceptual'] / ms['mse']:.2f}x).")
    print(timing)
    if args.time_only:
        return
    students = dict(LOSSES, **{f"perceptual-l{lam:g}": (f"CE + perceptual at lambda_emb {lam:g}",
                                                        ["--emb-loss", "perceptual", "--lambda-emb", f"{lam:g}"])
                               for lam in args.perceptual_lambdas})
    train_s, commands = {}, []
    for key, (_, opts) in students.items():
        run = os.path.join(out, key)
        cmd = train_argv(data, run, size, seed) + ["--timesteps", ts] + opts
        commands.append("dd " + " ".join(cmd))
        if not os.path.exists(os.path.join(run, "config.json")):
            run_dd(cmd)
        train_s[key] = train_seconds(run)
    methods = [("floor", "teacher, independent draws (floor)", S, ["--run", os.path.join(out, "mse"), "--baseline", "teacher"])]
    for key, (label, _) in students.items():
        run = os.path.join(out, key)
        for k in (1, 2):
            methods.append((f"{key}-dd{k}", f"{label}, DD-{k}, split {split} (embedding head from step {split})", k,
                            ["--run", run, "--steps", str(k), "--split", str(split)]))
        for k in (1, 2):
            methods.append((f"{key}-dd{k}-logits", f"{label}, DD-{k}, split {S} (logits head only)", k,
                            ["--run", run, "--steps", str(k), "--split", str(S)]))
    methods.append(("onestep", "onestep* (token marginals)", 1, ["--data", data, "--baseline", "onestep"]))
    rows, seeds = sample_and_evaluate(methods, ["--run", os.path.join(out, "mse"), "--baseline", "teacher"],
                                      os.path.join(out, "samples"), size, seed, S)
    title = (f"{name}: {size.num_pairs} pairs (one data set for every row), {size.train_steps} training steps of "
             f"batch {size.batch_size} for every student, timesteps {ts}, lr {size.lr}, EMA {size.ema_decay}, "
             f"{size.num_samples} samples per method and seed, mean ± sd over {len(seeds)} sampling seeds")
    notes = ["Training seconds (optimizer steps, 1 thread, from each run's metrics.jsonl): "
             + ", ".join(f"{students[k][0]} {v:.0f} s" for k, v in train_s.items()) + f"; build-dataset {t_data:.0f} s.",
             timing]
    table = quality.format_table(rows, title, notes)
    write_section(os.path.join(args.results, "loss_variants.md"), "# Embedding-loss variants on the digits teachers", fam, "run_loss_table.py", table, commands)


if __name__ == "__main__":
    main()
