"""`dd build-dataset` and `dd dataset verify|info`: the command line of the pair data set.

Resumable (re-run the same command), extendable (a larger --num-samples), and multi-process under
`torchrun --nproc_per_node=K -m distilled_decoding build-dataset ...` (see `shard_store.py`).
"""
from __future__ import annotations

import functools

import click

from .captions import CaptionError, captions_for_teacher
from .dataset_check import dataset_info, verify_dataset
from .distributed import default_device, device_option_check, finish_distributed, init_distributed
from .dpm_solver import SPACINGS, VARIANTS
from .flowmap import GRID_SCALES, FlowMapConfig
from .dataset_build import build_dataset
from .pairs import read_manifest
from .seeding import LABEL_MODES
from .shard_store import StoreError
from .store_cli import echo_info, report_problems
from .teacher_spec import TeacherSpec, resolve_sampling, teacher_options

_FM = FlowMapConfig()  # the defaults shown and used by the CLI live on the dataclass
_FLOW_MAP_OPTIONS = [
    click.option("--nfe", type=click.IntRange(min=1), default=_FM.nfe, show_default=True,
                 help="Flow-map solver evaluations per token."),
    click.option("--order", type=click.IntRange(1, 3), default=_FM.order, show_default=True,
                 help="Multistep DPM-Solver++ order."),
    click.option("--spacing", type=click.Choice(SPACINGS), default=_FM.spacing, show_default=True,
                 help="Solver time spacing."),
    click.option("--t-start", "t_start", type=float, default=_FM.t_start, show_default=True,
                 help="Solver start time (noise at t = 0)."),
    click.option("--t-end", "t_end", type=float, default=_FM.t_end, show_default=True,
                 help="Solver end time, then snap to the nearest code (data at t = 1)."),
    click.option("--solver-variant", "variant", type=click.Choice(VARIANTS), default=_FM.variant,
                 show_default=True, help="Order-3 coefficient: exact, or as the official DPM-Solver code."),
    click.option("--lower-order-final/--no-lower-order-final", "lower_order_final", default=_FM.lower_order_final,
                 show_default=True, help="Lower the order over the last two steps (stabilises the long final step)."),
    click.option("--grid-scale", "grid_scale", type=click.Choice(GRID_SCALES), default=_FM.grid_scale,
                 show_default=True, help="codebook: shift the solver's time grid by the codebook's spread; "
                 "unit: as for spread 1 (the map before issue 14)."),
    click.option("--solver-mem-mb", "mem_budget_mb", type=float, default=_FM.mem_budget_mb, show_default=True,
                 help="Working memory of one flow-map call (does not change the data)."),
]
_FLOW_MAP_FIELDS = ("nfe", "order", "spacing", "t_start", "t_end", "variant", "lower_order_final", "grid_scale",
                    "mem_budget_mb")


def flow_map_options(f):
    """Click decorator: adds the flow-map solver options; the command receives `fm_config`."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        given = {k: kwargs.pop(k) for k in _FLOW_MAP_FIELDS}
        try:
            cfg = FlowMapConfig(**given)
        except ValueError as e:
            raise click.BadParameter(str(e)) from e
        return f(*args, fm_config=cfg, **kwargs)

    wrapper.__click_params__ = list(getattr(f, "__click_params__", []))
    for opt in reversed(_FLOW_MAP_OPTIONS):
        wrapper = opt(wrapper)
    return wrapper


@click.command("build-dataset")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--num-samples", required=True, type=click.IntRange(min=1), help="Number of pairs.")
@click.option("--shard-size", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Pairs per shard file (the unit of resume).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Pairs per teacher batch.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the per-sample noise and labels.")
@click.option("--labels", "labels", type=click.Choice(LABEL_MODES), default="balanced", show_default=True,
              help="balanced: each class once per block of num_classes indices; uniform: i.i.d. classes.")
@click.option("--store-noise", is_flag=True, default=False, help="Also store the fp32 noise in the shards.")
@click.option("--device", default=None, callback=device_option_check, help="cpu, cuda, cuda:1 ... Default: cuda when available.")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text-to-image teachers: the prompt file (one prompt a line; pairs cycle over "
              "them as --labels says).")
@click.option("--caption-features", "caption_features", type=click.Path(exists=True, file_okay=False), default=None,
              help="Text-to-image teachers: the official feature files, <DIR>/<prompt file stem>/<line>.npy [1, n, D] "
              "(not needed by a teacher with its own text encoder, e.g. digits-t2i).")
@flow_map_options
@teacher_options
def build_dataset_command(out, num_samples, shard_size, batch_size, seed, labels, store_noise, device,
                          no_progress, prompts, caption_features, fm_config, teacher_spec, sampling_overrides):
    """Generate (noise, tokens) pairs with a teacher and the flow map, into sharded files.

    Resumable (re-run the same command), extendable (a larger --num-samples), and multi-process
    under `torchrun --nproc_per_node=K -m distilled_decoding build-dataset ...`.
    """
    _, _, device, own_pg = init_distributed(device)
    try:
        teacher = teacher_spec.load(device)
        captions = captions_for_teacher(teacher, prompts, caption_features)   # checked before anything is written
        sampling = resolve_sampling(teacher, sampling_overrides)
        build_dataset(out, teacher, teacher_spec, num_samples=num_samples, sampling=sampling, fm_config=fm_config,
                      seed=seed, labels=labels, shard_size=shard_size, batch_size=batch_size,
                      store_noise=store_noise, show_progress=not no_progress, log=click.echo, captions=captions)
    except (StoreError, CaptionError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        finish_distributed(own_pg)


@click.group("dataset")
def dataset_group():
    """Inspect and check data sets made by `dd build-dataset`."""


@dataset_group.command("verify")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--recompute", default=0, show_default=True, type=click.IntRange(min=0),
              help="Regenerate this many random samples with the teacher and compare tokens.")
@click.option("--device", default=None, callback=device_option_check, help="Device for --recompute. Default: cuda when available.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher checkpoint, if it moved since the build (its hash must match).")
@click.option("--tokenizer-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Tokenizer checkpoint, if it moved since the build (its hash must match).")
def verify_command(root, recompute, device, batch_size, checkpoint, tokenizer_checkpoint):
    """Check counts, sizes, hashes and labels of every shard; optionally recompute samples."""
    try:
        spec = None
        if checkpoint or tokenizer_checkpoint:
            d = read_manifest(root)["teacher_spec"]
            d = dict(d, checkpoint=checkpoint or d["checkpoint"],
                     tokenizer_checkpoint=tokenizer_checkpoint or d["tokenizer_checkpoint"])
            spec = TeacherSpec.from_dict(d)
        problems = verify_dataset(root, recompute, device=device or default_device(), batch_size=batch_size,
                                  spec=spec, log=click.echo)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    report_problems(problems)


@dataset_group.command("info")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON.")
def info_command(root, as_json):
    """Summarise a data set: teacher, settings, size, completeness."""
    try:
        info = dataset_info(root)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    echo_info(info, as_json)

