"""`dd demo` (what `make demo` runs): the whole DD pipeline on a shipped digits teacher.

    build-dataset -> train -> sample (teacher, DD 1-step, DD 2-step, teacher-mixed, skip-N, onestep*)
    -> eval -> a table in the style of the paper's Table 1 (quality.py: floor row, g, precision/recall,
    mean ± sd over sampling seeds), a comparison grid, and plots.py's tradeoff.png / curves.png.

Every stage is the real `dd` verb, run in-process with the command line printed first, so the log
doubles as a recipe for a real teacher. FID is measured with the zoo's digits classifier features
(the Inception network means nothing on 16x16 digits) against the held-out real digits and against
the teacher's own samples; class accuracy is that classifier's agreement with the requested label.
`--family t2i` runs the text-to-image zoo teacher digits-t2i on prompts (`run_t2i_demo`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from typing import Callable, Dict, List, Optional, Tuple

import click

from .distributed import device_option_check
from .seeding import reference_seed, sample_seeds


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much work each stage does. `make demo` must finish in 10 minutes on 2 CPU cores."""

    num_pairs: int         # (noise, tokens) pairs made by the teacher + flow map
    train_steps: int
    batch_size: int        # training batch
    lr: float
    ema_decay: float       # short runs need a short EMA horizon
    num_samples: int       # images per method and sampling seed for the table
    sample_batch: int = 250
    num_seeds: int = 3     # sampling seeds per method (mean ± sd in the table)
    timestep_weights: Optional[Tuple[int, ...]] = None   # `dd train --timestep-weights` (None: uniform)
    dd2_steps: int = 300   # `dd demo --dd2`: CSD generator updates from the trained DD student
    dd2_warmup: int = 100  # ... and guidance updates before the first

    def training_words(self) -> str:
        """How the students train, for the table titles."""
        w = self.timestep_weights
        return (f"{self.train_steps} training steps of batch {self.batch_size}"
                + (f" (timesteps drawn {':'.join(map(str, w))})" if w else ""))


# t = 1 (the one-step sampler's input) drawn 3:1 against the second timestep: on digits-llamagen it
# beat the uniform draw for DD-1 and DD-2 alike (5:1 and t = 1 only lose DD-2; results/dd1_fit.md).
# 5600 steps: what fits `make demo`'s 10 minutes with train on both cores (`--procs 2`, ~11-13 steps/s);
# on one core the demo ran 2500 (DD-1 g 0.36 -> 0.24 with the longer run).
_LLAMAGEN_DEFAULT = DemoSize(num_pairs=8000, train_steps=5600, batch_size=64, lr=3e-3, ema_decay=0.9975,
                             num_samples=1000, timestep_weights=(3, 1))
# Work budgets per size and teacher. The VAR student sees 131 tokens a sample (twice LlamaGen's 65)
# under a float block-causal mask, so a sample costs ~2.4x: `make demo FAMILY=var` spends its 10 minutes
# on many small updates instead. On one core, at equal seconds, 1200 x 64 -> 2400 x 32 -> 8400 x 8 took
# DD-1 g 0.18 -> 0.14 -> 0.11, and teacher-mixed was clearly below DD-2 only at batch 8; on two ranks of
# batch 8, 8000 x 16 fits the same minutes (DD-1 g 0.08). VAR keeps the uniform draw: 3:1 and 2:1 left
# DD-2 no better than DD-1. (results/dd1_fit.md)
_VAR_DEFAULT = dataclasses.replace(_LLAMAGEN_DEFAULT, train_steps=8000, batch_size=16, lr=1.4e-3,
                                   ema_decay=0.9993, timestep_weights=None)
SIZES = {
    "default": {"llamagen": _LLAMAGEN_DEFAULT,
                "var": _VAR_DEFAULT,
                # digits-t2i (run_t2i_demo): the LlamaGen recipe, shorter (its 40 caption tokens make a
                # step ~1.15x LlamaGen's); 5 rows instead of 7 to sample.
                "t2i": dataclasses.replace(_LLAMAGEN_DEFAULT, train_steps=4400, ema_decay=0.997)},
    # tests/test_demo.py: the smallest LlamaGen run where DD still clearly beats onestep*.
    # Two sampling seeds (not three) keep the slow test short.
    "mini": {"llamagen": DemoSize(num_pairs=3000, train_steps=1000, batch_size=64, lr=3e-3, ema_decay=0.99,
                                  num_samples=500, num_seeds=2, dd2_steps=10, dd2_warmup=10)},
    # tools/run_table.py --size large (issue 13: <= 40 min a family): twice the pairs, more samples, and
    # each family's default recipe trained about 3x longer on the same 2 ranks, the EMA horizon kept at
    # ~6% (LlamaGen) and ~14% (VAR) of the run (at 40% it ruins the student: results/dd1_fit.md).
    "large": {"llamagen": dataclasses.replace(_LLAMAGEN_DEFAULT, num_pairs=16000, train_steps=16000,
                                              ema_decay=0.999, num_samples=2000),
              "var": dataclasses.replace(_VAR_DEFAULT, num_pairs=16000, train_steps=24000, ema_decay=0.9997,
                                         num_samples=2000)},
}


# The verbs whose work splits over local ranks without changing what they make: build-dataset writes
# the same shards on any number of ranks, train sees the same global batches (tests/test_dataset.py,
# tests/test_student.py), and so do `dd csd train` / `dd csd init` (tests/test_csd_train.py,
# tests/test_gts.py). Sampling stays in one process: its seconds per image go into the table.
ON_RANKS = ("build-dataset", "train", "csd")


def default_procs(device: str) -> int:
    """`--procs` when not given: on cpu the cores up to 2 (the machine `make demo` is sized for), on an
    accelerator 1 (torchrun puts a rank on each GPU)."""
    return min(2, os.cpu_count() or 1) if device == "cpu" else 1


def resolve_procs(procs: Optional[int], device: str) -> int:
    """A demo's --procs: None = default_procs(device); more ranks than GPUs on cuda are refused."""
    import torch

    if procs is None:
        return default_procs(device)
    if device.startswith("cuda") and procs > torch.cuda.device_count():
        raise click.BadParameter(f"{procs} ranks on cuda need {procs} GPUs; this machine has "
                                 f"{torch.cuda.device_count()}", param_hint="'--procs'")
    return procs


def procs_for_tool(ap, procs: Optional[int], device: str) -> int:
    """An argparse tool's --procs (tools/run_table.py, run_ard_table.py) by `resolve_procs`, a bad value
    ending in the parser's one-line error."""
    if procs is not None and procs < 1:
        ap.error(f"--procs {procs}: at least 1")
    try:
        return resolve_procs(procs, device)
    except click.BadParameter as e:
        ap.error(f"--procs {procs}: {e.message}")


def procs_option(f):
    """The demos' --procs (`dd demo`, `dd ard demo`)."""
    return click.option(
        "--procs", default=None, type=click.IntRange(min=1),
        help="Local processes (torchrun ranks) for build-dataset and train: the same shards and global "
             "batches on any number, so only the seconds (and float rounding) change. Sampling runs in one "
             "process (its ms / image are in the table). Default: on cpu the cores up to 2, on cuda 1 (a rank "
             "a GPU).")(f)


def run_on_ranks(args: List, procs: int, log: Callable[[str], None] = click.echo) -> None:
    """`dd ARGS` (args[0] a verb, or a group and its verb: "ard", "train") under torchrun on `procs`
    local ranks, each with this process's torch threads, printing its command line first. A failing
    rank raises one-line ClickException (the ranks' own messages are already on the terminal)."""
    import subprocess

    import torch

    from .distributed import torchrun_argv

    args = [str(a) for a in args]
    log(f"\n$ torchrun --standalone --nproc_per_node={procs} -m distilled_decoding "
        + " ".join(shlex.quote(a) for a in args))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    rc = subprocess.run(torchrun_argv(procs, args), env=env).returncode
    if rc:
        verb = " ".join(args[:2] if args[0] in ("ard", "csd") else args[:1])
        raise click.ClickException(f"dd {verb} on {procs} local ranks exited with status {rc} "
                                   "(its own messages are above)")


def run_dd(args: List[str], log: Callable[[str], None] = click.echo, procs: int = 1) -> None:
    """Run one `dd` verb, printing its command line first: in-process, or for a verb of ON_RANKS
    with procs > 1 under torchrun (`run_on_ranks`). The verbs are imported here, not through cli.py
    (which imports this module for `dd demo`: no import cycle)."""
    from .csd_train import csd_group
    from .dataset_cli import build_dataset_command
    from .sampling import sample_cmd
    from .train import train_command

    args = [str(a) for a in args]
    if procs > 1 and args[0] in ON_RANKS:
        return run_on_ranks(args, procs, log)
    if args[0] == "csd":
        return run_verb(csd_group.commands, args[1:], log, group="dd csd")
    run_verb({c.name: c for c in (build_dataset_command, train_command, sample_cmd)}, args, log)


def run_verb(verbs: Dict[str, click.Command], args: List, log: Callable[[str], None], group: str = "dd") -> None:
    """Run verb args[0] of `verbs` in-process with args[1:] (str()-ed), printing its command line
    (`group` names the command group, e.g. "dd ard") first."""
    args = [str(a) for a in args]
    log(f"\n$ {group} " + " ".join(shlex.quote(a) for a in args))
    verbs[args[0]].main(args=args[1:], prog_name=f"{group} {args[0]}", standalone_mode=False)


def _timing(path: str) -> dict:
    with open(os.path.join(path, "timing.json")) as f:
        return json.load(f)


def _draw_samples(run: str, smp: str, methods: List, ref_seed: int, seeds: List[int], size: DemoSize,
                  device: str, log: Callable[[str], None], extra: List[str] = ()) -> Tuple[dict, dict, dict]:
    """`dd sample` the teacher's reference draw at ref_seed, then every method (key, name, steps,
    args) at every seed, into smp/<key>-seed<s> -> ({key: [samples.npz]}, {key: [s / image]}, {key: [seeds]})."""
    plan = [("teacher", ref_seed, ["--run", run, "--baseline", "teacher"])]
    plan += [(key, s, args) for s in seeds for key, _, _, args in methods]
    files, spi, used = {}, {}, {}
    for key, s, args in plan:
        d = os.path.join(smp, f"{key}-seed{s}")
        run_dd(["sample", "--out", d] + args + list(extra) + ["--num-samples", str(size.num_samples),
                "--batch-size", str(size.sample_batch), "--seed", str(s), "--labels", "balanced",
                "--device", device, "--warmup"], log)
        files.setdefault(key, []).append(os.path.join(d, "samples.npz"))
        spi.setdefault(key, []).append(_timing(d)["seconds_per_image"])
        used.setdefault(key, []).append(s)
    return files, spi, used


def _build_and_train(name: str, data: str, run: str, size: DemoSize, seed: int, device: str, split: int,
                     log: Callable[[str], None], extra: List[str] = (), procs: int = 1) -> Tuple[float, float]:
    """`dd build-dataset` of teacher `name` into `data` (extra: more of its options), then `dd train`
    into `run` (resumed when it exists), both on `procs` local ranks -> (seconds building, seconds
    training)."""
    t0 = time.perf_counter()
    run_dd(["build-dataset", "--teacher", name] + list(extra) + ["--out", data, "--num-samples", str(size.num_pairs),
            "--batch-size", "500", "--shard-size", "2000", "--seed", str(seed), "--device", device], log, procs)
    t_data = time.perf_counter() - t0
    train = ["train", "--data", data, "--out", run, "--max-steps", str(size.train_steps),
             "--batch-size", str(size.batch_size), "--lr", str(size.lr), "--ema-decay", str(size.ema_decay),
             "--ckpt-every", str(size.train_steps), "--log-every", "100", "--num-workers", "0",
             "--seed", str(seed), "--device", device,
             # Every position on the logits head (greedy): on these 64-128-code codebooks it beats the
             # MSE-regressed embedding head by far (DD-1 FID vs teacher 136 against 256 at the paper's
             # scaled split, 1500 steps), and the embedding head has no LPIPS to sharpen it here.
             "--split", str(split)]
    if size.timestep_weights:
        train += ["--timestep-weights", ",".join(map(str, size.timestep_weights))]
    if os.path.exists(os.path.join(run, "config.json")) or os.path.isdir(os.path.join(run, "checkpoints")):
        train.append("--resume")
    run_dd(train, log, procs)
    return t_data, time.perf_counter() - t0 - t_data


def _train_dd2(name: str, run: str, csd_run: str, size: DemoSize, seed: int, device: str,
               log: Callable[[str], None], procs: int = 1) -> float:
    """`dd csd train` of a DD2 generator started from the trained DD student `run` (its embedding head at
    t = 1) into `csd_run` (resumed when it exists), on `procs` local ranks -> seconds. The settings of
    results/dd2_digits.md's DD-1-init runs: K = 2, lr 1e-3 for both networks, EMA 0.99, batch 32."""
    t0 = time.perf_counter()
    cmd = ["csd", "train", "--teacher", name, "--out", csd_run, "--init-run", run, "--max-steps", size.dd2_steps,
           "--batch-size", 32, "--guidance-steps", 2, "--guidance-warmup", size.dd2_warmup, "--lr", "1e-3",
           "--guidance-lr", "1e-3", "--ema-decay", "0.99", "--ckpt-every", size.dd2_steps, "--log-every", 10,
           "--num-workers", 0, "--seed", seed, "--device", device]
    if os.path.isdir(os.path.join(csd_run, "checkpoints")):
        cmd.append("--resume")
    run_dd(cmd, log, procs)
    return time.perf_counter() - t0


def _real_features(extractor, size: DemoSize, seed: int):
    """The held-out digits' features [297, D] and the real-vs-real FID floor of `size.num_samples`
    training digits against them."""
    from teachers.zoo import digits_data
    from . import quality

    real_f = extractor.features(digits_data("test")[0].to(extractor.device)).cpu().numpy()
    train_f = extractor.features(digits_data("train")[0].to(extractor.device)).cpu().numpy()
    return real_f, quality.real_floor(real_f, train_f, size.num_samples, seed)


def _write_results(out: str, info: dict) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(info["table"] + "\n")


def run_demo(family: str, out: str, size: DemoSize, seed: int = 0, device: str = "cpu",
             log: Callable[[str], None] = click.echo, procs: int = 1, dd2: bool = False) -> dict:
    """Run the pipeline into `out` and return {"rows": [...], "table": markdown}. Re-running reuses
    the finished data set and training run (both resume) and re-draws the samples. `procs`: local
    ranks of build-dataset and train (the numbers do not depend on it, the seconds do). dd2: also train
    a DD2 generator by CSD from the DD student (`_train_dd2`) and add its row and its start's (the
    student's embedding head at t = 1)."""
    from teachers import load_teacher
    from . import plots, quality
    from .extractors import DigitsExtractor
    from .sampling import default_regen
    from .student_run import read_run_config

    name = f"digits-{family}"
    teacher = load_teacher(name, device=device)
    S = teacher.num_steps
    data, run, smp = (os.path.join(out, d) for d in ("data", "run", "samples"))
    t0 = time.perf_counter()
    t_data, t_train = _build_and_train(name, data, run, size, seed, device, S, log, procs=procs)

    csd_run = os.path.join(out, "csd")
    t_dd2 = _train_dd2(name, run, csd_run, size, seed, device, log, procs) if dd2 else 0.0
    trained = tuple(read_run_config(run)["student"]["timesteps"])
    a, b = default_regen(trained)
    n_skip = S // 2
    t_sample = time.perf_counter()
    methods = [
        ("floor", "teacher, independent draws (floor)", S, ["--run", run, "--baseline", "teacher"]),
        ("dd1", "DD 1-step", 1, ["--run", run, "--steps", "1"]),
        ("dd2", f"DD 2-step (t = {','.join(map(str, trained))})", 2, ["--run", run, "--steps", "2"]),
    ] + ([
        ("dd1emb", "DD 1-step, embedding head (DD2's start)", 1, ["--run", run, "--steps", "1", "--split", "0"]),
        ("csd", f"DD2 1-step (CSD, DD student + {size.dd2_steps} steps), snapped", 1,
         ["--run", csd_run, "--steps", "1", "--snap"]),
    ] if dd2 else []) + [
        ("mixed", f"DD teacher-mixed pre-trained-{a}-{b}", (b - a) + (2 if a > 1 else 1),
         ["--run", run, "--regen", f"{a}:{b}"]),
        ("skip", f"teacher skip-{n_skip}", S - n_skip, ["--run", run, "--baseline", f"skip-{n_skip}"]),
        ("onestep", "onestep* (token marginals)", 1, ["--data", data, "--baseline", "onestep"]),
    ]
    # Samples use noise and labels the student never saw in training (other seeds). The reference
    # teacher draw has a seed of its own, so the floor row is an independent draw of the same teacher.
    ref_seed, seeds = reference_seed(seed), sample_seeds(seed, size.num_seeds)
    files, spi, used = _draw_samples(run, smp, methods, ref_seed, seeds, size, device, log)
    compare = os.path.join(out, "compare.png")
    run_dd(["sample", "--run", run, "--compare", "--out", os.path.join(smp, "compare"), "--num-samples", "10",
            "--labels", ",".join(map(str, range(teacher.num_classes))), "--device", device], log)
    os.replace(os.path.join(smp, "compare", "compare.png"), compare)

    extractor = DigitsExtractor(device)
    real_f, floor_real = _real_features(extractor, size, seed)
    rows = quality.evaluate_rows([("teacher", f"teacher ({S}-step AR), reference draw", S)]
                                 + [(key, label, steps) for key, label, steps, _ in methods],
                                 files, used, real_f, extractor, spi)
    t_sample = time.perf_counter() - t_sample
    title = (f"{name}: {size.num_pairs} pairs, {size.training_words()}, {size.num_samples} samples "
             f"per method and seed, mean ± sd over {len(seeds)} sampling seeds, FID on digits-classifier "
             f"features vs {len(real_f)} held-out digits")
    notes = [f"Real-vs-real floor of the FID vs real column: {size.num_samples} training digits vs the "
             f"{len(real_f)} held-out ones score {floor_real:.2f} on the same features. Floor row: the "
             f"teacher at seeds {','.join(map(str, seeds))} against its reference draw at seed {ref_seed}; "
             f"precision/recall are against that reference (k = 3).",
             f"skip-{n_skip}: the teacher's first {S - n_skip} steps; the tokens of the {n_skip} skipped steps are "
             "drawn independently from the last computed step's prediction, so the step count is the paper's "
             "(LlamaGen skip-106 = 150 steps, VAR skip-1 = 9): the only per-position distributions a "
             "next-token model gives without another model call (sampling.py, `--skip-fill`)."]
    if dd2:
        notes.append(f"DD2: `dd csd train` from the DD student (its embedding head at t = 1), {size.dd2_warmup} "
                     f"guidance warm-up updates, then {size.dd2_steps} generator updates (K = 2 guidance updates "
                     f"each, batch 32, lr 1e-3, EMA 0.99) on {procs} rank(s): {t_dd2:.0f} s on top of the DD "
                     f"student's {t_train:.0f} s (docs/dd2.md); sampled snapped to the nearest codes.")
    table = quality.format_table(rows, title, notes)
    plots_out = {"tradeoff": plots.tradeoff_plot(rows, os.path.join(out, "tradeoff.png"), f"{name}: quality vs speed"),
                 "curves": plots.curves_plot(os.path.join(run, "metrics.jsonl"), os.path.join(out, "curves.png"),
                                             f"{name}: DD student training")}
    info = {"family": family, "size": dataclasses.asdict(size), "seed": seed, "device": device, "procs": procs,
            "reference_seed": ref_seed, "sample_seeds": seeds, "real_floor_fid": floor_real,
            "seconds": {"build_dataset": t_data, "train": t_train, "dd2_train": t_dd2, "sample_and_eval": t_sample,
                        "total": time.perf_counter() - t0},
            "rows": rows, "table": table, "compare": compare, "run": run, **plots_out}
    _write_results(out, info)
    return info


def run_t2i_demo(out: str, size: DemoSize, seed: int = 0, device: str = "cpu",
                 log: Callable[[str], None] = click.echo, procs: int = 1) -> dict:
    """`dd demo --family t2i`: the pipeline on the text-to-image zoo teacher digits-t2i, into `out`;
    -> {"rows", "table", ...} as `run_demo`. The rows of the paper's Table 3 (teacher, DD-1, DD-2)
    with the quality table's floor and onestep* rows, plus caption agreement (t2i_scores.py). The 40
    full captions go through the teacher's own text encoder (`dd build-dataset --prompts`, no feature
    files); `dd sample --prompts` draws them balanced. No teacher-mixed / skip rows and no --compare
    grid (class-conditional only). Re-running reuses the finished data set and run."""
    from teachers import load_teacher
    from teachers.zoo import attribute_thresholds
    from . import quality
    from .captions import read_prompts
    from .extractors import DigitsExtractor
    from .student_run import read_run_config
    from .t2i_scores import NAME, caption_columns, caption_scorer, write_prompts

    teacher = load_teacher(NAME, device=device)
    S = teacher.num_steps
    prompts = write_prompts(out)
    prompt_list = read_prompts(prompts)
    data, run, smp = (os.path.join(out, d) for d in ("data", "run", "samples"))
    t0 = time.perf_counter()
    t_data, t_train = _build_and_train(NAME, data, run, size, seed, device, S, log, extra=["--prompts", prompts],
                                      procs=procs)

    trained = tuple(read_run_config(run)["student"]["timesteps"])
    t_sample = time.perf_counter()
    methods = [
        ("floor", "teacher, independent draws (floor)", S, ["--run", run, "--baseline", "teacher"]),
        ("dd1", "DD 1-step", 1, ["--run", run, "--steps", "1"]),
        ("dd2", f"DD 2-step (t = {','.join(map(str, trained))})", 2, ["--run", run, "--steps", "2"]),
        ("onestep", "onestep* (token marginals per caption)", 1, ["--data", data, "--baseline", "onestep"]),
    ]
    ref_seed, seeds = reference_seed(seed), sample_seeds(seed, size.num_seeds)
    files, spi, used = _draw_samples(run, smp, methods, ref_seed, seeds, size, device, log,
                                     extra=["--prompts", prompts])

    extractor = DigitsExtractor(device)
    real_f, floor_real = _real_features(extractor, size, seed)
    rows = quality.evaluate_rows([("teacher", f"teacher ({S}-step AR), reference draw", S)]
                                 + [(key, label, steps) for key, label, steps, _ in methods],
                                 files, used, real_f, extractor, spi,
                                 per_file=caption_scorer(prompt_list, attribute_thresholds(NAME)))
    t_sample = time.perf_counter() - t_sample
    title = (f"{NAME}: {len(prompt_list)} captions, {size.num_pairs} pairs, {size.training_words()}, "
             f"{size.num_samples} samples per method and seed (balanced over the captions), mean ± sd over "
             f"{len(seeds)} sampling seeds, FID on digits-classifier features vs {len(real_f)} held-out digits")
    notes = [f"Real-vs-real floor of the FID vs real column: {size.num_samples} training digits vs the "
             f"{len(real_f)} held-out ones score {floor_real:.2f}. Floor row: the teacher at seeds "
             f"{','.join(map(str, seeds))} against its reference draw at seed {ref_seed}; precision/recall are "
             "against that reference (k = 3).",
             "class acc. = the classifier's digit equals the caption's digit; caption agr. = the digit AND the "
             "measured thickness and slant (teachers/digit_captions.py, thresholds from the teacher's JSON) "
             "all match the caption; thickness / slant agr. = each attribute alone."]
    table = quality.format_table(rows, title, notes, extra_columns=caption_columns())
    info = {"family": "t2i", "size": dataclasses.asdict(size), "seed": seed, "device": device, "procs": procs,
            "reference_seed": ref_seed, "sample_seeds": seeds, "real_floor_fid": floor_real,
            "seconds": {"build_dataset": t_data, "train": t_train, "sample_and_eval": t_sample,
                        "total": time.perf_counter() - t0},
            "rows": rows, "table": table, "run": run, "prompts": prompts}
    _write_results(out, info)
    return info


@click.command("demo")
@click.option("--family", type=click.Choice(["llamagen", "var", "t2i"]), default="llamagen", show_default=True,
              help="Which shipped digits teacher to distil (t2i: the text-to-image digits-t2i).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory. Default: demo_out/<family>.")
@click.option("--size", "size_name", type=click.Choice(sorted(SIZES)), default="default", show_default=True,
              help="Work budget: default fits `make demo` (~10 min on 2 CPU cores); large takes ~25 min "
                   "(results/digits_table_large.md).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", callback=device_option_check, show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="torch CPU threads (of each rank). The digits models are too small to gain from more, and on a "
                   "busy 2-core machine two OpenMP threads run many times slower than one.")
@click.option("--dd2", is_flag=True, default=False,
              help="Also train a DD2 generator by conditional score distillation from the DD student (`dd csd "
                   "train`, the size's dd2 steps: 1.5-3 more minutes on 2 CPU cores) and add its row and its start's.")
@procs_option
def demo_cmd(family, out, size_name, seed, device, threads, dd2, procs):
    """Run build-dataset -> train -> sample -> eval on a shipped digits teacher; print a Table 1."""
    import torch

    procs = resolve_procs(procs, device)
    torch.set_num_threads(threads)
    out = out or os.path.join("demo_out", family)
    if family not in SIZES[size_name]:
        raise click.UsageError(f"--size {size_name} has no budget for {family}: {sorted(SIZES[size_name])}")
    if family == "t2i" and dd2:
        raise click.UsageError("--dd2: DD2 (`dd csd train`) supports class-conditional teachers only, not t2i")
    if family == "t2i":
        info = run_t2i_demo(out, SIZES[size_name][family], seed=seed, device=device, procs=procs)
    else:
        info = run_demo(family, out, SIZES[size_name][family], seed=seed, device=device, procs=procs, dd2=dd2)
    s = info["seconds"]
    click.echo(f"\n{info['table']}\n")
    click.echo(f"build-dataset {s['build_dataset']:.0f}s, train {s['train']:.0f}s, total {s['total']:.0f}s."
               + (f" Comparison grid (rows teacher / DD-1 / DD-2 / teacher-mixed): {info['compare']}"
                  if "compare" in info else ""))
    click.echo(f"Table: {os.path.join(out, 'table.md')}, all numbers: {os.path.join(out, 'results.json')}")
