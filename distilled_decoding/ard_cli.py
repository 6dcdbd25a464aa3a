"""`dd ard`: ARD (autoregressive distillation of a DiT teacher) on the command line.

    dd ard build-dataset --teacher digits-dit --out traj --num-samples 4000     # teacher trajectories
    dd ard verify traj [--recompute 8]  |  dd ard info traj                     # check / summarise them
    dd ard train --data traj --out run ...                                      # the ARD student
    dd ard sample --run run --out smp [--baseline ddim-4 --data traj]           # images, samples.npz
    dd ard demo                                                                 # all of it on digits-dit

build-dataset and sample run on the shard store: re-run a killed command to resume it (byte-identical),
`torchrun --nproc_per_node=K -m distilled_decoding -- ard build-dataset ...` splits the shards over K
ranks, a directory is never overwritten with other settings. See docs/ard.md.
"""
from __future__ import annotations

import functools
import os

import click

from .demo import procs_option, resolve_procs
from .distributed import default_device, device_option_check, dist_info, finish_distributed, init_distributed
from .seeding import LABEL_MODES
from .shard_store import StoreError
from .store_cli import echo_info, report_problems
from .teacher_spec import DTYPES, TeacherSpec
from .trajectories import HISTORY_KINDS


# ---- the diffusion teacher's options ------------------------------------------------------------------
def _check_diffusion_spec(spec: TeacherSpec) -> None:
    """Refuse, naming the option, an unknown or AR teacher, and files given to a zoo teacher."""
    from teachers import DIFFUSION_FAMILIES, zoo
    if spec.teacher in DIFFUSION_FAMILIES:
        from teachers.dit import as_dit_config
        try:
            as_dit_config(spec.config)
        except (ValueError, TypeError) as e:
            raise click.BadParameter(f"not a {spec.teacher} config: {e}", param_hint="'--config'") from e
        return
    diffusion_zoo = sorted(n for n, v in zoo.ZOO.items() if v[0] in DIFFUSION_FAMILIES)
    if spec.teacher not in diffusion_zoo:
        raise click.BadParameter(f"{spec.teacher!r} is not a diffusion teacher; ARD distils {sorted(DIFFUSION_FAMILIES)} "
                                 f"or the zoo's {diffusion_zoo}", param_hint="'--teacher'")
    given = [n for n, v in (("--config", spec.config), ("--checkpoint", spec.checkpoint), ("--vae-config",
             spec.tokenizer_config), ("--vae", spec.tokenizer_checkpoint)) if v]
    if given:
        raise click.BadParameter(f"zoo teacher {spec.teacher!r} has its own weights and config; drop "
                                 f"{', '.join(given)}", param_hint=f"'{given[0]}'")


def _zoo_names() -> list:
    from teachers import zoo_names
    return zoo_names()


_TEACHER_OPTIONS = [
    click.option("--teacher", required=True, help="dit, or a zoo diffusion teacher (digits-dit)."),
    click.option("--config", default=None, help="DiT preset (DiT-XL/2, ...), a JSON object or a .json file."),
    click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="DiT checkpoint (a release file or a train.py checkpoint; omit for random weights)."),
    click.option("--vae", type=click.Path(exists=True), default=None,
                 help="The latent VAE: a diffusers AutoencoderKL directory or weights file (sd-vae-ft-ema)."),
    click.option("--vae-config", default=None, help="VAE config preset, JSON object or .json file."),
    click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
                 help="Precision of the teacher transformer (outputs are fp32)."),
    click.option("--unsafe-load", is_flag=True, default=False,
                 help="Unpickle trusted legacy checkpoints with weights_only=False."),
]


def diffusion_teacher_options(f):
    """Click decorator: the diffusion teacher's options; the command receives `teacher_spec`."""

    @functools.wraps(f)
    def wrapper(*args, teacher, config, checkpoint, vae, vae_config, dtype, unsafe_load, **kwargs):
        try:
            spec = TeacherSpec(teacher=teacher, config=config, checkpoint=checkpoint, tokenizer_config=vae_config,
                               tokenizer_checkpoint=vae, dtype=dtype, weights_only=not unsafe_load)
        except (ValueError, FileNotFoundError) as e:
            raise click.BadParameter(str(e)) from e
        _check_diffusion_spec(spec)
        return f(*args, teacher_spec=spec, **kwargs)

    wrapper.__click_params__ = list(getattr(f, "__click_params__", []))
    for opt in reversed(_TEACHER_OPTIONS):
        wrapper = opt(wrapper)
    return wrapper


def _cfg_channels(value: str):
    """--cfg-channels: "default" (the teacher's), "all", or a count."""
    if value in ("default", "all"):
        return value if value == "default" else None
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: default, all or a number of channels", param_hint="'--cfg-channels'") from None
    if n < 1:
        raise click.BadParameter(f"{value!r}: at least 1 channel", param_hint="'--cfg-channels'")
    return n


# ---- the group -------------------------------------------------------------------------------------------
@click.group("ard")
def ard_group():
    """ARD: distil a DiT teacher into a few-step autoregressive student (see docs/ard.md)."""


@ard_group.command("build-dataset")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--num-samples", required=True, type=click.IntRange(min=1), help="Number of trajectories.")
@click.option("--num-steps", "num_steps", type=click.IntRange(min=1), default=None,
              help="S: the student's steps; S+1 states are kept. Default: 4, or the length of an explicit --kept.")
@click.option("--kept", default="paper", show_default=True,
              help="paper: the states nearest tau_s = T*s/S; public: the public ARD code's DDIM indices "
                   "(25,15,10,5,0 at S=4); or comma-separated DDIM indices from --steps down to 0.")
@click.option("--history", type=click.Choice(HISTORY_KINDS), default="state", show_default=True,
              help="What the interior slots hold: the ODE states (paper) or the teacher's x0 predictions (public code).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Teacher DDIM steps. Default: the teacher's (25).")
@click.option("--cfg-scale", type=float, default=None, help="Teacher CFG scale. Default: the teacher's (1.5).")
@click.option("--cfg-channels", default="default", show_default=True,
              help="Channels CFG guides: default (the teacher's: DiT-XL's 3 of 4), all, or a number.")
@click.option("--shard-size", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Trajectories per shard file (the unit of resume and of the rank split).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Trajectories per teacher batch.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the per-sample noise and labels.")
@click.option("--labels", type=click.Choice(LABEL_MODES), default="balanced", show_default=True,
              help="balanced: each class once per block of num_classes indices; uniform: i.i.d. classes.")
@click.option("--device", default=None, callback=device_option_check, help="cpu, cuda, cuda:1 ... Default: cuda when available.")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
@diffusion_teacher_options
def build_dataset_cmd(out, num_samples, num_steps, kept, history, steps, cfg_scale, cfg_channels, shard_size,
                      batch_size, seed, labels, device, no_progress, teacher_spec):
    """Run the teacher's DDIM ODE from per-sample noise and keep S+1 states of each trajectory.

    Resumable (re-run the same command; the result is byte-identical), extendable (a larger
    --num-samples), and multi-process under `torchrun --nproc_per_node=K -m distilled_decoding -- ard
    build-dataset ...`.
    """
    from .trajectories import build_trajectories, parse_kept
    if teacher_spec.checkpoint is None and teacher_spec.teacher not in _zoo_names():
        # unseeded random weights would differ between the runs of one resumed build
        raise click.BadParameter(f"--teacher {teacher_spec.teacher} needs --checkpoint (trajectories of random "
                                 "weights could not be resumed)", param_hint="'--checkpoint'")
    try:
        rule = parse_kept(kept)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--kept'") from e
    if not isinstance(rule, str):
        if num_steps is not None and num_steps != len(rule) - 1:
            raise click.BadParameter(f"--kept lists {len(rule)} indices (S = {len(rule) - 1}) but --num-steps is "
                                     f"{num_steps}", param_hint="'--num-steps'")
        num_steps = len(rule) - 1
    channels = _cfg_channels(cfg_channels)
    _, _, device, own_pg = init_distributed(device)
    try:
        teacher = teacher_spec.load(device, diffusion=True)
        build_trajectories(out, teacher, teacher_spec, num_samples=num_samples, steps=steps, cfg_scale=cfg_scale,
                           cfg_channels=channels, num_steps=num_steps or 4, kept=rule, history=history, seed=seed,
                           labels=labels, shard_size=shard_size, batch_size=batch_size,
                           show_progress=not no_progress, log=click.echo if dist_info()[0] == 0 else (lambda s: None))
    except (StoreError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        finish_distributed(own_pg)


@ard_group.command("verify")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--recompute", default=0, show_default=True, type=click.IntRange(min=0),
              help="Re-run this many random trajectories with the teacher and compare the states.")
@click.option("--atol", default=1e-4, show_default=True, type=click.FloatRange(min=0), help="--recompute tolerance.")
@click.option("--device", default=None, callback=device_option_check, help="Device for --recompute. Default: cuda when available.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
def verify_cmd(root, recompute, atol, device, batch_size):
    """Check a trajectory set: sizes, sha256, labels and noise of (seed, index); optionally recompute."""
    from .trajectories import verify_trajectories
    try:
        problems = verify_trajectories(root, recompute, device=device or default_device(), batch_size=batch_size,
                                       atol=atol, log=click.echo)
    except (StoreError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    report_problems(problems)


@ard_group.command("info")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON.")
def info_cmd(root, as_json):
    """Summarise a trajectory set: teacher, sampler, kept states, size, completeness."""
    from .trajectories import trajectory_info
    try:
        info = trajectory_info(root)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    echo_info(info, as_json)


@ard_group.command("sample")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--run", type=click.Path(exists=True, file_okay=False), default=None,
              help="An ARD run directory (`dd ard train`): the student and, through it, the teacher.")
@click.option("--baseline", default=None, metavar="ddim-N|teacher",
              help="The teacher instead of the student: DDIM with N steps (teacher = the data set's steps, 25).")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="A trajectory set: the teacher and CFG of --baseline when no --run is given.")
@click.option("--cfg-scale", type=float, default=None, help="--baseline CFG scale. Default: the data set's (1.5).")
@click.option("--num-samples", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-sample noise and labels.")
@click.option("--labels", default="balanced", show_default=True,
              help="balanced | uniform (as build-dataset) | comma-separated class ids (cycled).")
@click.option("--device", default=None, callback=device_option_check, help="cpu, cuda, cuda:1 ... Default: cuda when available.")
@click.option("--png", is_flag=True, default=False, help="Also write one PNG per sample into OUT/png.")
@click.option("--grid-max", type=click.IntRange(min=1), default=64, show_default=True, help="Images in grid.png.")
@click.option("--warmup", is_flag=True, default=False, help="Run one untimed batch first (timing only).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Samples per shard file (the unit of resume and of the rank split).")
@click.option("--verify", is_flag=True, default=False, help="Only check OUT: shards, labels, samples.npz against the shards.")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def sample_cmd(out, run, baseline, data, cfg_scale, num_samples, batch_size, seed, labels, device, png, grid_max,
               warmup, shard_size, verify, no_progress):
    """Sample with an ARD student (S steps) or the teacher's DDIM; write samples.npz (ADM), grid.png, timing.

    \b
      dd ard sample --run RUN --out OUT                          # the student's S steps
      dd ard sample --run RUN --out OUT --baseline ddim-4        # the teacher, DDIM-4, same noise
      dd ard sample --data TRAJ --out OUT --baseline teacher     # the teacher, DDIM-25 (the data's)
      dd ard sample --out OUT --verify

    OUT keeps the samples as shards: re-running the command resumes a killed run; a directory holding
    samples of other settings is refused, never overwritten.
    """
    from .sample_store import build_samples, verify_samples
    if verify:
        try:
            problems = verify_samples(out, log=click.echo)
        except (StoreError, ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
        report_problems(problems)
        return
    if run is None and (baseline is None or data is None):
        raise click.UsageError("give --run (the student, or the teacher of --baseline) or --baseline with --data")
    if baseline is None and (data is not None or cfg_scale is not None):
        raise click.UsageError("--data and --cfg-scale apply to --baseline only")
    _, _, device, own_pg = init_distributed(device)
    try:
        from .seeding import check_label_spec
        from .ard_sampling import make_plan
        plan = make_plan(run, baseline, data, cfg_scale, device)
        check_label_spec(labels, plan.teacher.num_classes)
        from .ard_sampling import sample_settings
        settings = sample_settings(plan, seed=seed, labels=labels, shard_size=shard_size, run=run)
        build_samples(out, plan, settings, num_samples=num_samples, batch_size=batch_size, device=device,
                      warmup=warmup, png=png, grid_max=grid_max, show_progress=not no_progress,
                      log=click.echo if dist_info()[0] == 0 else (lambda s: None))
    except (StoreError, ValueError, KeyError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        finish_distributed(own_pg)



from .ard_train import train as _train_cmd  # noqa: E402  (defined beside its loop)
ard_group.add_command(_train_cmd)


@ard_group.command("demo")
@click.option("--out", default=os.path.join("demo_out", "ard"), show_default=True, type=click.Path(file_okay=False),
              help="Output directory (finished trajectories and runs in it are re-used).")
@click.option("--size", "size_name", type=click.Choice(["default", "long", "tiny"]), default="default",
              show_default=True, help="Work budget: default fits 10 minutes on 2 CPU cores; long trains 3x longer "
              "(the measured table); tiny runs every stage in seconds.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", callback=device_option_check, show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="torch CPU threads (of each rank; on a busy 2-core machine two threads run slower than one).")
@procs_option
def demo_cmd(out, size_name, seed, device, threads, procs):
    """Build trajectories -> train KD, step distillation and ARD -> sample -> eval on digits-dit; print a Table 1."""
    import torch

    from .ard_demo import SIZES, run_ard_demo
    procs = resolve_procs(procs, device)
    torch.set_num_threads(threads)
    info = run_ard_demo(out, SIZES[size_name], dict(ard_group.commands), seed=seed, device=device, procs=procs)
    s = info["seconds"]
    click.echo(f"\n{info['table']}\n")
    click.echo(f"build-dataset {s['build_dataset']:.0f}s, train {s['train']:.0f}s, sample + eval "
               f"{s['sample_and_eval']:.0f}s, total {s['total']:.0f}s. Grid (rows: the samplers, columns: the "
               f"classes, same noise): {info['compare']}")
    click.echo(f"Table: {os.path.join(out, 'table.md')}, all numbers: {os.path.join(out, 'results.json')}")
