"""DD2 (CSD one-step generator) vs the DD-1 student at equal training wall-clock on a digits teacher
(issue 20; not in CI).

    python tools/run_dd2_table.py --family llamagen --out demo_out/dd2 [--data DS] [--csd-args "..."]

One pair data set per family (`--data` re-uses one). A DD-1 student (`dd train --timesteps 1`, the
budget of tools/run_ddh_table.py) initialises the CSD generator (`dd csd train --init-run`); the CSD
run's seconds (its guidance warm-up and its optimizer steps) plus the DD-1 init's make DD2's training
wall-clock, and a second DD-1 student trained for as many steps as that wall-clock buys at the DD-1
init's measured speed is the equal-budget baseline. Rows: teacher reference, floor, onestep*, both DD-1
students sampled with the logits head (split = all steps, as the DD tables) and with the embedding
head (split 0, what the generator starts from), and the CSD generator decoded directly and snapped to
the nearest codes. Quality as `dd demo` (quality.py, mean ± sd over 3 sampling seeds). Writes the
family's section of results/dd2_digits.md (or --results/dd2_digits.md); finished runs and samples in
--out are re-used.

--init gts: DD2's own initialisation instead. `dd csd init` (the AR-diffusion model, GTS loss, on the
pair data set's teacher sequences, --gts-steps, --gts-args) starts both CSD networks (`dd csd train
--init-run`); DD2's wall-clock = the init's optimizer steps + CSD's, and the equal-budget DD-1 is trained
for what that buys at the DD-1 init's speed (the DD-1 init run is trained, or re-used, for that speed
only). Rows: floor, onestep*, the GTS init's own generator (x = ε − v(ε, 1, shifted ε)), GTS + CSD
(direct / snapped), the equal-budget DD-1, and the DD-1-init CSD run when --out holds it. Section
"FAMILY-gts" of the results page.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import torch  # noqa: E402

from distilled_decoding.csd_train import csd_train_command  # noqa: E402
from distilled_decoding.gts_train import csd_init_command  # noqa: E402
from distilled_decoding.demo import run_dd, run_verb  # noqa: E402
from run_ddh_table import SIZE, sample_and_evaluate, train_argv, write_section, train_seconds  # noqa: E402


def csd_seconds(run: str) -> float:
    """A CSD run's training wall-clock: its guidance warm-up (config.json) plus its optimizer steps."""
    with open(os.path.join(run, "config.json")) as f:
        warm = float(json.load(f).get("warmup_seconds", 0.0))
    return warm + train_seconds(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llamagen", choices=["llamagen", "var"])
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_out", "dd2"))
    ap.add_argument("--data", default=None, help="an existing pair data set of the teacher (default: built in --out)")
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    ap.add_argument("--dd1-steps", type=int, default=SIZE.train_steps, help="steps of the DD-1 init")
    ap.add_argument("--csd-steps", type=int, default=200)
    ap.add_argument("--csd-args", default="--guidance-steps 2 --guidance-warmup 100 --lr 1e-4 --guidance-lr 1e-3 "
                    "--ema-decay 0.99", help="more `dd csd train` options")
    ap.add_argument("--init", default="dd1", choices=["dd1", "gts", "gts-guidance"],
                    help="the CSD init: a DD-1 student (generator only), DD2's AR-diffusion init (both networks), "
                         "or the DD-1 generator with the AR-diffusion guidance network")
    ap.add_argument("--gts-steps", type=int, default=600, help="--init gts: steps of `dd csd init`")
    ap.add_argument("--gts-args", default="--lr 1e-3 --ema-decay 0.99 --freeze-backbone-steps 100",
                    help="--init gts: more `dd csd init` options")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from teachers import load_teacher
    from distilled_decoding import quality

    fam, out, seed = args.family, os.path.join(args.out, args.family), args.seed
    name = f"digits-{fam}"
    teacher = load_teacher(name, device="cpu")
    S = teacher.num_steps
    size = dataclasses.replace(SIZE, train_steps=args.dd1_steps)
    data = args.data or os.path.join(out, "data")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        run_dd(["build-dataset", "--teacher", name, "--out", data, "--num-samples", str(size.num_pairs),
                "--batch-size", "500", "--shard-size", "2000", "--seed", str(seed), "--device", "cpu"])
    commands = []

    def train(run: str, cmd: list) -> None:
        commands.append("dd " + " ".join(cmd))
        if not os.path.exists(os.path.join(run, "config.json")):
            if cmd[0] == "csd":
                run_verb({"train": csd_train_command, "init": csd_init_command}, cmd[1:], print, group="dd csd")
            else:
                run_dd(cmd)

    dd1 = os.path.join(out, "dd1")
    train(dd1, train_argv(data, dd1, size, seed) + ["--timesteps", "1", "--split", str(S)])
    if args.init != "dd1":
        return gts_table(args, name, data, out, size, seed, S, dd1, train, commands)
    csd = os.path.join(out, "csd")
    steps = args.csd_steps
    train(csd, ["csd", "train", "--teacher", name, "--out", csd, "--init-run", dd1, "--max-steps", str(steps),
                "--batch-size", str(size.batch_size), "--ckpt-every", str(steps), "--log-every", "10",
                "--num-workers", "0", "--seed", str(seed), "--device", "cpu", "--no-progress"]
          + shlex.split(args.csd_args))
    t_dd1, t_csd = train_seconds(dd1), csd_seconds(csd)
    eq_steps = max(args.dd1_steps, round((t_dd1 + t_csd) / t_dd1 * args.dd1_steps))
    dd1_eq = os.path.join(out, "dd1-equal")
    train(dd1_eq, train_argv(data, dd1_eq, size, seed, eq_steps) + ["--timesteps", "1", "--split", str(S)])
    t_eq = train_seconds(dd1_eq)

    methods = [("floor", "teacher, independent draws (floor)", S, ["--run", dd1, "--baseline", "teacher"]),
               ("onestep", "onestep* (token marginals)", 1, ["--data", data, "--baseline", "onestep"])]
    for key, run, label in (("dd1", dd1, f"DD-1, {args.dd1_steps} steps (the CSD init)"),
                            ("dd1eq", dd1_eq, f"DD-1, {eq_steps} steps (equal wall-clock)")):
        methods.append((f"{key}-logits", f"{label}, logits head", 1, ["--run", run, "--steps", "1", "--split", str(S)]))
        methods.append((f"{key}-emb", f"{label}, embedding head", 1, ["--run", run, "--steps", "1", "--split", "0"]))
    methods.append(("csd", f"DD2 / CSD, DD-1 init + {steps} steps, direct", 1, ["--run", csd, "--steps", "1"]))
    methods.append(("csd-snap", f"DD2 / CSD, DD-1 init + {steps} steps, snapped", 1,
                    ["--run", csd, "--steps", "1", "--snap"]))
    rows, seeds = sample_and_evaluate(methods, ["--run", dd1, "--baseline", "teacher"], os.path.join(out, "samples"),
                                      size, seed, S)
    title = (f"{name}: DD-1 vs DD2 (CSD) at equal training wall-clock; {size.num_pairs} pairs, DD-1 batch "
             f"{size.batch_size}, lr {size.lr}, EMA {size.ema_decay}; {size.num_samples} samples per method and "
             f"seed, mean ± sd over {len(seeds)} sampling seeds")
    notes = [f"Training seconds (1 thread, shared machine): DD-1 init {t_dd1:.0f} s ({args.dd1_steps} steps); CSD "
             f"{t_csd:.0f} s (warm-up + {steps} steps); DD2 total {t_dd1 + t_csd:.0f} s; equal-budget DD-1 "
             f"{t_eq:.0f} s ({eq_steps} steps)."]
    table = quality.format_table(rows, title, notes)
    write_section(os.path.join(args.results, "dd2_digits.md"), "# DD2 (CSD) vs DD-1 on the digits teachers", fam, "run_dd2_table.py", table, commands)



def gts_table(args, name, data, out, size, seed, S, dd1, train, commands) -> None:
    """--init gts / gts-guidance: the AR-diffusion init (both networks / the guidance network beside a DD-1
    generator) + CSD against the DD-1 student of equal wall-clock."""
    from distilled_decoding import quality
    fam, both = args.family, args.init == "gts"
    gts, csd = os.path.join(out, "gts"), os.path.join(out, "csd-gts" if both else "csd-gtsg")
    gsteps, steps = args.gts_steps, args.csd_steps
    train(gts, ["csd", "init", "--data", data, "--out", gts, "--max-steps", str(gsteps), "--batch-size",
                str(size.batch_size), "--ckpt-every", str(gsteps), "--log-every", "50", "--num-workers", "0",
                "--seed", str(seed), "--device", "cpu", "--no-progress"] + shlex.split(args.gts_args))
    init = ["--init-run", gts] if both else ["--init-run", dd1, "--guidance-init", gts]
    train(csd, ["csd", "train", "--teacher", name, "--out", csd, *init, "--max-steps", str(steps),
                "--batch-size", str(size.batch_size), "--ckpt-every", str(steps), "--log-every", "10",
                "--num-workers", "0", "--seed", str(seed), "--device", "cpu", "--no-progress"]
          + shlex.split(args.csd_args))
    t_dd1, t_gts, t_csd = train_seconds(dd1), train_seconds(gts), csd_seconds(csd)
    total = t_gts + t_csd + (0.0 if both else t_dd1)
    eq_steps = max(args.dd1_steps, round(total / t_dd1 * args.dd1_steps))
    dd1_eq = os.path.join(out, f"dd1-equal-{eq_steps}")
    train(dd1_eq, train_argv(data, dd1_eq, size, seed, eq_steps) + ["--timesteps", "1", "--split", str(S)])
    t_eq = train_seconds(dd1_eq)

    methods = [("floor", "teacher, independent draws (floor)", S, ["--run", dd1, "--baseline", "teacher"]),
               ("onestep", "onestep* (token marginals)", 1, ["--data", data, "--baseline", "onestep"]),
               ("gts", f"GTS init alone ({gsteps} steps), direct", 1, ["--run", gts, "--steps", "1"]),
               ("gts-snap", f"GTS init alone ({gsteps} steps), snapped", 1, ["--run", gts, "--steps", "1", "--snap"])]
    what, key = ("GTS init", "csdg") if both else ("DD-1 generator + GTS guidance init", "csdgg")
    methods += [(key, f"DD2 / CSD, {what} + {steps} steps, direct", 1, ["--run", csd, "--steps", "1"]),
                (f"{key}-snap", f"DD2 / CSD, {what} + {steps} steps, snapped", 1,
                 ["--run", csd, "--steps", "1", "--snap"]),
                (f"dd1eq{eq_steps}-logits", f"DD-1, {eq_steps} steps (equal wall-clock), logits head", 1,
                 ["--run", dd1_eq, "--steps", "1", "--split", str(S)]),
                (f"dd1eq{eq_steps}-emb", f"DD-1, {eq_steps} steps (equal wall-clock), embedding head", 1,
                 ["--run", dd1_eq, "--steps", "1", "--split", "0"])]
    old = os.path.join(out, "csd")
    if os.path.exists(os.path.join(old, "config.json")):
        t_old = train_seconds(dd1) + csd_seconds(old)
        methods.append(("csd-snap", f"DD2 / CSD, DD-1 init (the earlier table, {t_old:.0f} s), snapped", 1,
                        ["--run", old, "--steps", "1", "--snap"]))
    rows, seeds = sample_and_evaluate(methods, ["--run", dd1, "--baseline", "teacher"], os.path.join(out, "samples"),
                                      size, seed, S)
    title = (f"{name}: DD2 from {'its AR-diffusion (GTS) init' if both else 'a DD-1 generator and a GTS guidance init'} vs DD-1 at equal training wall-clock; "
             f"{size.num_pairs} teacher sequences / pairs, batch {size.batch_size}; {size.num_samples} samples per "
             f"method and seed, mean ± sd over {len(seeds)} sampling seeds")
    notes = [f"Training seconds (1 thread, shared machine): GTS init {t_gts:.0f} s ({gsteps} steps); "
             + ("" if both else f"DD-1 generator init {t_dd1:.0f} s ({args.dd1_steps} steps); ")
             + f"CSD {t_csd:.0f} s (warm-up + {steps} steps); DD2 total {total:.0f} s; equal-budget DD-1 "
             f"{t_eq:.0f} s ({eq_steps} steps, from the DD-1 speed of {dd1}: {args.dd1_steps} steps in "
             f"{t_dd1:.0f} s)."]
    table = quality.format_table(rows, title, notes)
    write_section(os.path.join(args.results, "dd2_digits.md"), "# DD2 (CSD) vs DD-1 on the digits teachers",
                  f"{fam}-{args.init}", "run_dd2_table.py", table, commands)

if __name__ == "__main__":
    main()
