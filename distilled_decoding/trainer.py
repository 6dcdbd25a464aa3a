"""The training loop every distillation method shares, parameterised by a loss function.

A method brings its model, its data set (items keyed by (epoch, position)) and
`loss_fn(model, batch) -> (loss scalar, {name: [B] per-sample parts})`; `train_loop` does the rest:
micro-batching and gradient accumulation, DDP under torchrun, bf16 autocast, gradient clipping, the
EMA copy, metrics.jsonl, the progress bar, checkpoints every `ckpt_every` steps, and `resume`.

Determinism. The data order is `DistributedSampler(shuffle, seed, drop_last)` per epoch
(`MicroBatches`). Global batch j of an epoch is the same set of items for any number of ranks and any
accumulation, so runs on 1 and K ranks see the same batches; and a resume restarts the stream at the
exact micro-batch, so the next losses are the ones an uninterrupted run would have logged. A resume
with settings that change that stream is refused (`resume_or_refuse`).

Learning rate. `lr_at` is a pure function of the step: a linear warm-up over `warmup_steps`
updates, then constant or a cosine decay to 0 at `max_steps`; the loop sets it before every update,
so a resumed run applies exactly the rates of an uninterrupted one. `resolve_recipe` turns the
paper-style options into the loop's: `lr_per_256` (lr = X·batch/256) and `epochs` (max_steps).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from teachers.checkpoint import CheckpointFileError

from .distributed import average_gradients, barrier, finish_distributed, init_distributed, mean_over_ranks
from .errors import DDError
from .run_dir import (CKPT_DIR, METRICS_FILE, append_metrics, checkpoint_dirs, latest_checkpoint, load_checkpoint,
                      save_checkpoint, truncate_metrics)

LossFn = Callable[[torch.nn.Module, dict], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


@dataclass
class LoopConfig:
    """What the loop needs of a method's options. precision: "fp32" | "bf16" (resolved)."""

    batch_size: int
    grad_accum: int
    lr: float
    ema_decay: float
    grad_clip: float
    max_steps: int
    ckpt_every: int
    keep_checkpoints: int
    log_every: int
    num_workers: int
    seed: int
    precision: str
    progress: bool = True
    warmup_steps: int = 0
    lr_schedule: str = "constant"


@dataclass(kw_only=True)
class LoopArgs:
    """The options of `loop_options`, the base of every training verb's arguments (keyword-only, so a
    method's own fields come first). precision None = bf16 on CUDA with bf16 support, else fp32;
    device None = cuda when available; overwrite: replace an existing run in --out. lr_per_256 /
    epochs, when set, replace lr / max_steps (`resolve_recipe`)."""

    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    lr_per_256: Optional[float] = None
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    epochs: Optional[float] = None
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    max_steps: int = 100_000
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 2
    seed: int = 0
    precision: Optional[str] = None
    device: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SecondModel:
    """A second model trained beside the first with its own optimizer, one update after each of the
    first's (a GAN's discriminator). begin(step): before the micro-batches of update `step` (0-based),
    e.g. to switch the adversarial term of the first's loss on; update(step) -> [len(names)] tensor:
    after the first's optimizer step and EMA, its own update from what the loss function kept of this
    step, returning the values to log. Its weights travel with the method's checkpoint_weights and
    resume modules; `optimizer` is saved in optimizer.pt under `name` (resume_or_refuse's other_optimizers).
    A resume re-enters begin/update at the same step, so the next losses are an uninterrupted run's."""

    name: str
    optimizer: torch.optim.Optimizer
    names: Sequence[str]
    begin: Callable[[int], None]
    update: Callable[[int], torch.Tensor]


LR_SCHEDULES = ("constant", "cosine")
# Settings added to the stream after runs were made: a checkpoint that lacks them ran with these.
STREAM_DEFAULTS = {"warmup_steps": 0, "lr_schedule": "constant", "disc_weight": 0.0, "timestep_weights": None,
                   "noise_draw": "batch"}     # DD2 runs once drew a batch's noise from its first index


def lr_at(step: int, lr: float, warmup_steps: int = 0, schedule: str = "constant",
          max_steps: Optional[int] = None) -> float:
    """The learning rate of update `step` (0-based: the update that makes step + 1): lr·(step + 1)/W
    for the first W = warmup_steps updates, then lr ("constant") or lr·½(1 + cos(π·(step − W)/(max_steps − W)))
    ("cosine": lr at the end of the warm-up, → 0 at max_steps)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    raise ValueError(f"unknown lr schedule {schedule!r} ({' | '.join(LR_SCHEDULES)})")


def resolve_recipe(args, num_items: int):
    """`args` (a LoopArgs) with the effective lr and max_steps: lr_per_256 X sets lr = X·batch_size/256
    (the VAR recipe: 1e-4 per 256); epochs E sets max_steps = round(E·⌊num_items / batch_size⌋), at
    least 1 (an epoch is the loop's: the last partial batch is dropped)."""
    if args.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {args.lr_schedule!r} ({' | '.join(LR_SCHEDULES)})")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps {args.warmup_steps}: must be >= 0")
    changes = {}
    if args.lr_per_256 is not None:
        changes["lr"] = args.lr_per_256 * args.batch_size / 256
    if args.epochs is not None:
        per_epoch = num_items // args.batch_size
        if per_epoch < 1 or args.epochs <= 0:
            raise ValueError(f"--epochs {args.epochs}: {num_items} items make {per_epoch} batches of "
                             f"{args.batch_size} per epoch")
        changes["max_steps"] = max(1, round(args.epochs * per_epoch))
    return dataclasses.replace(args, **changes)


def describe_recipe(args) -> str:
    """One log phrase for the optimizer recipe of resolved `args`."""
    text = f"lr {args.lr:g}"
    if args.lr_per_256 is not None:
        text += f" (= {args.lr_per_256:g} per 256 x batch {args.batch_size})"
    if args.warmup_steps:
        text += f", linear warm-up over {args.warmup_steps} steps"
    then = ", then" if args.warmup_steps else ","
    text += f"{then} cosine to 0 at the last step" if args.lr_schedule == "cosine" else f"{then} constant"
    text += f"; weight decay {args.weight_decay:g}; {args.max_steps} steps"
    if args.epochs is not None:
        text += f" (= {args.epochs:g} epochs)"
    return text


def micro_batch_size(batch_size: int, world: int, grad_accum: int) -> int:
    if batch_size % (world * grad_accum):
        raise ValueError(f"--batch-size {batch_size} is not divisible by ranks x grad-accum "
                         f"= {world} x {grad_accum}")
    return batch_size // (world * grad_accum)


def resolve_precision(precision: Optional[str], device: str) -> str:
    if precision is None:
        return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return precision


class MicroBatches(Sampler):
    """Infinite stream of this rank's micro-batches [(epoch, position), ...], from micro-batch `start`.

    Epoch e's order is `DistributedSampler(num_replicas=world, rank, shuffle=True, seed, drop_last=True)`
    after set_epoch(e); micro-batch m is slice m % M of it (M = len(sampler) // micro_batch).
    """

    def __init__(self, num_items: int, world: int, rank: int, micro_batch: int, seed: int, start: int = 0):
        self.sampler = DistributedSampler(range(num_items), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.micro_batch, self.start = micro_batch, start
        self.per_epoch = len(self.sampler) // micro_batch
        if self.per_epoch < 1:
            raise ValueError(f"{num_items} items are fewer than one batch ({micro_batch} per rank x {world} ranks)")

    def __iter__(self):
        m, epoch, order = self.start, None, None
        b = self.micro_batch
        while True:
            e, j = divmod(m, self.per_epoch)
            if e != epoch:
                self.sampler.set_epoch(e)
                epoch, order = e, list(self.sampler)
            yield [(e, i) for i in order[j * b:(j + 1) * b]]
            m += 1


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay·ema + (1 − decay)·model over parameters (DiT's update_ema); buffers are copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


DATA_KEY = "data (manifest.json sha256)"


def resume_or_refuse(out: str, resume: bool, modules: Dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                     device, settings: Dict[str, object], stream_keys: Sequence[str], manifest_sha: str,
                     log: Callable[[str], None], other_optimizers: Optional[Dict[str, torch.optim.Optimizer]] = None
                     ) -> int:
    """The step to start from. resume: load the latest checkpoint of `out` into `modules` ({file stem:
    module}, strictly), `opt` and `other_optimizers` ({name: optimizer}, a second model's: see
    SecondModel), refusing when the run's settings named by `stream_keys` (those that define the
    stream of batches and updates; state.json's "train") or its data set (state.json's
    "data_manifest_sha256") differ from `settings` and `manifest_sha`. Without resume, a run directory
    that already holds checkpoints is refused."""
    ckpt = latest_checkpoint(out)
    if not resume:
        if ckpt is not None:
            raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue it, or use another --out")
        return 0
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(out, CKPT_DIR)}")
    weights, opt_states, state, ckpt = _load_intact(out, list(modules), device)
    for stem, module in modules.items():
        module.load_state_dict(weights[stem], strict=True)
    opt.load_state_dict(opt_states["optimizer"])
    for name, other in (other_optimizers or {}).items():
        if name not in opt_states:
            raise ValueError(f"--resume: {ckpt} holds no optimizer state {name!r} (the run was made without it)")
        other.load_state_dict(opt_states[name])
    if settings.get("lr_schedule", "constant") != "constant":
        stream_keys = (*stream_keys, "max_steps")       # the decay is stretched over the run's length
    stream = dict({k: settings[k] for k in stream_keys}, **{DATA_KEY: manifest_sha})
    train = state.get("train", {})
    old = dict({k: train.get(k, STREAM_DEFAULTS.get(k)) for k in stream_keys},
               **{DATA_KEY: state.get("data_manifest_sha256")})
    diffs = [(k, old.get(k), v) for k, v in stream.items() if old.get(k) != v]
    if diffs:
        raise ValueError("--resume with other settings than the run's: "
                         + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs))
    step = int(state["step"])
    log(f"resumed from {ckpt} at step {step}")
    return step


def _load_intact(out: str, stems, device) -> tuple:
    """The newest checkpoint of `out` that reads back whole -> (weights, optimizer state, state.json,
    its path); a damaged newer one is skipped with one warning line on stderr. None readable: the
    newest one's error."""
    first = None
    for ckpt in reversed(checkpoint_dirs(out)):
        try:
            loaded = load_checkpoint(ckpt, stems, device)
        except CheckpointFileError as e:
            first = first or e
            continue
        if first is not None:
            print(f"warning: {first}; resuming from the older intact checkpoint {ckpt}", file=sys.stderr)
        return (*loaded, ckpt)
    raise first


def _diverged(out: str, step: int, names, values: torch.Tensor, grad_norm: torch.Tensor) -> DDError:
    """Training stops before a non-finite loss or gradient reaches the weights: the error names the
    step, the values and the last checkpoint written (which, like metrics.jsonl, holds no NaN)."""
    vals = ", ".join(f"{n} {v:.4g}" for n, v in zip(names, values.tolist())) + f", grad_norm {float(grad_norm):.4g}"
    ckpt = latest_checkpoint(out)
    keep = f"last good checkpoint: {ckpt}" if ckpt else "no checkpoint was written"
    return DDError(f"step {step}: non-finite loss or gradient ({vals}); training stopped, {keep} "
                   "(lower --lr or --grad-clip, then --resume or start again)")


def wrap_ddp(model: torch.nn.Module, device: str, world: int) -> torch.nn.Module:
    if world == 1:
        return model
    # buffers (codebooks, RoPE tables, masks) never change: no per-forward broadcast
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync_kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                  else {"broadcast_buffers": False})
    dev = torch.device(device)
    return ddp(model, device_ids=[dev.index] if dev.type == "cuda" else None, **no_sync_kw)


def train_loop(*, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn,
               dataset: Dataset, part_names: Sequence[str], cfg: LoopConfig, out: str, rank: int, world: int,
               device: str, step: int, checkpoint_weights: Callable[[], dict], checkpoint_state: dict,
               on_checkpoint: Callable[[str, int], None], log: Callable[[str], None], desc: str = "train",
               on_log: Optional[Callable[[dict], None]] = None, second: Optional[SecondModel] = None,
               grad_sync: str = "ddp") -> dict:
    """Train `model` from `step` to cfg.max_steps; returns the last metrics record.

    dataset: items keyed by (epoch, position); loss_fn(model or its DDP wrapper, batch on the CPU) ->
    (loss, {name in part_names: [B]}); checkpoint_weights() -> save_checkpoint's `weights`;
    checkpoint_state: what state.json holds beside "metrics" and "step"; on_checkpoint(path, step):
    rank 0, after each checkpoint (publish the run's files); on_log(record): rank 0, after each metrics line;
    second: a model updated after each step of `model` (SecondModel), its values logged beside the parts.
    grad_sync (several ranks): "ddp", loss_fn gets the DDP wrapper and must reach every parameter through
    its forward; "average", loss_fn gets `model` itself and the gradients are averaged over the ranks
    after the micro-batches (`average_gradients`: for losses that call other methods or leave parameters
    without a gradient).
    """
    if grad_sync not in ("ddp", "average"):
        raise ValueError(f"grad_sync {grad_sync!r}: ddp | average")
    micro = micro_batch_size(cfg.batch_size, world, cfg.grad_accum)
    dev_type = torch.device(device).type
    batches = MicroBatches(len(dataset), world, rank, micro, cfg.seed, start=step * cfg.grad_accum)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                        pin_memory=dev_type == "cuda", persistent_workers=cfg.num_workers > 0)
    net = wrap_ddp(model, device, world) if grad_sync == "ddp" else model
    autocast = (lambda: torch.autocast(device_type=dev_type, dtype=torch.bfloat16)) if cfg.precision == "bf16" \
        else contextlib.nullcontext

    if rank == 0:
        truncate_metrics(out, step)
    bar = None
    if rank == 0 and cfg.progress and step < cfg.max_steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, dynamic_ncols=True)

    it = iter(loader)
    last = {}
    t_log, n_log = time.perf_counter(), 0
    second_names = list(second.names) if second is not None else []
    n_parts = 1 + len(part_names) + len(second_names)
    sums = torch.zeros(n_parts, device=device, dtype=torch.float64)      # loss and parts over the log window
    deterministic = torch.are_deterministic_algorithms_enabled()
    if dev_type == "cpu":
        # The CPU embedding backward accumulates rows across threads in a racy order: with more than
        # one thread two identical runs differ by ~1e-7 from the first update. Its deterministic
        # kernel makes CPU runs bit-identical for a given thread count (docs/train.md).
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        while step < cfg.max_steps:
            step_sums = torch.zeros(n_parts, device=device, dtype=torch.float64)
            if second is not None:
                second.begin(step)
            for k in range(cfg.grad_accum):
                batch = next(it)
                sync = k == cfg.grad_accum - 1 or world == 1 or grad_sync == "average"
                with (contextlib.nullcontext() if sync else net.no_sync()), autocast():
                    loss, parts = loss_fn(net, batch)
                (loss / cfg.grad_accum).backward()
                step_sums[:n_parts - len(second_names)] += torch.stack(
                    [loss.detach().double()] + [parts[name].mean().double() for name in part_names]) / cfg.grad_accum
            step_sums = mean_over_ranks(step_sums, world)       # every rank sees the same NaN
            if grad_sync == "average":
                average_gradients(model.parameters(), world)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not (bool(torch.isfinite(step_sums).all()) and bool(torch.isfinite(grad_norm))):
                raise _diverged(out, step + 1, ["loss", *part_names], step_sums, grad_norm)
            lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, cfg.ema_decay)
            if second is not None:
                values = mean_over_ranks(second.update(step).detach().double().to(device), world)
                if not bool(torch.isfinite(values).all()):
                    raise _diverged(out, step + 1, second_names, values, torch.tensor(0.0))
                step_sums[n_parts - len(second_names):] = values
            step += 1
            sums += step_sums
            n_log += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_sums[0].item():.4f}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                avg = (sums / n_log).tolist()
                last = {"step": step, "loss": avg[0], **dict(zip([*part_names, *second_names], avg[1:])),
                        "grad_norm": float(grad_norm), "lr": lr,
                        "it_per_s": n_log / max(now - t_log, 1e-9),
                        "samples_per_s": n_log * cfg.batch_size / max(now - t_log, 1e-9)}
                if rank == 0:
                    append_metrics(out, last)
                    if on_log is not None:
                        on_log(last)
                sums.zero_()
                t_log, n_log = now, 0
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                bad = [n for n, p in list(model.named_parameters()) + list(ema.named_parameters())
                       if not bool(torch.isfinite(p).all())]
                if bad:     # a finite loss, yet an update overflowed: never checkpoint it
                    raise DDError(f"step {step}: weights hold NaN/inf ({', '.join(bad[:3])}); training stopped, "
                                  f"last good checkpoint: {latest_checkpoint(out)} (lower --lr)")
                if rank == 0:
                    path = save_checkpoint(out, step, checkpoint_weights(), opt.state_dict(),
                                           dict(checkpoint_state, metrics=last), cfg.keep_checkpoints,
                                           {second.name: second.optimizer.state_dict()} if second is not None else None)
                    on_checkpoint(path, step)
                barrier(world)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if bar is not None:
            bar.close()
    return last


def loop_config(args, precision: str) -> LoopConfig:
    """The LoopConfig of a method's options dataclass (its fields of the same names)."""
    names = [f.name for f in dataclasses.fields(LoopConfig) if f.name != "precision"]
    return LoopConfig(precision=precision, **{n: getattr(args, n) for n in names})


def run_training(args, precision: str, *, out: str, step: int, log: Callable[[str], None], desc: str,
                 **loop) -> dict:
    """`train_loop` with the LoopConfig of `args`, the loss curves redrawn at every metrics line
    (plots.update_curves) and the closing line; `loop`: train_loop's other keyword arguments."""
    from . import plots
    last = train_loop(cfg=loop_config(args, precision), out=out, step=step, log=log, desc=desc,
                      on_log=lambda rec: plots.update_curves(out, os.path.join(out, METRICS_FILE), rec["step"],
                                                             args.log_every, args.ckpt_every, args.max_steps, log),
                      **loop)
    log(f"done: {max(step, args.max_steps)} steps; student in {out}")
    return last


def on_ranks(body: Callable[..., dict], args, log: Callable[[str], None]) -> dict:
    """body(args, rank, world, device, log) on every rank (collective under torchrun; `args.device`
    None = cuda when available), logging on rank 0 only. Returns body's result."""
    rank, world, device, own_pg = init_distributed(args.device)
    try:
        last = body(args, rank, world, device, log if rank == 0 else (lambda s: None))
        barrier(world)
        return last
    finally:
        finish_distributed(own_pg)


def loop_options(max_steps: int) -> Callable:
    """The click options of the loop's settings, shared by every training verb (the paper's defaults;
    `max_steps` the method's): batch size ... device, --resume/--overwrite, --no-progress. The command
    receives them as keyword arguments named like LoopArgs' fields (no_progress for progress); --lr and
    --max-steps only when given (else the dataclass defaults apply), and --lr-per-256 / --epochs
    exclude them."""
    import functools

    import click
    from .distributed import device_option_check
    options = [
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Global batch size."),
        click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Gradient accumulation steps."),
        click.option("--lr", default=None, type=float, help="Peak learning rate.  [default: 1e-4]"),
        click.option("--lr-per-256", default=None, type=click.FloatRange(min=0.0, min_open=True),
                     help="Learning rate per 256 samples of batch: lr = X * batch / 256 (the VAR recipe: 1e-4). "
                          "Instead of --lr."),
        click.option("--warmup-steps", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Linear warm-up: update k (0-based) of the first W uses lr * (k + 1) / W."),
        click.option("--lr-schedule", type=click.Choice(list(LR_SCHEDULES)), default="constant", show_default=True,
                     help="After the warm-up: constant, or a cosine decay to 0 at the last step."),
        click.option("--weight-decay", default=0.0, show_default=True, type=float, help="AdamW weight decay."),
        click.option("--ema-decay", default=0.9999, show_default=True, type=click.FloatRange(0.0, 1.0)),
        click.option("--grad-clip", default=1.0, show_default=True, type=float),
        click.option("--max-steps", default=None, type=click.IntRange(min=1),
                     help=f"Optimizer steps.  [default: {max_steps}]"),
        click.option("--epochs", default=None, type=click.FloatRange(min=0.0, min_open=True),
                     help="Training length in passes over the data set: round(E * floor(N / batch)) steps. "
                          "Instead of --max-steps."),
        click.option("--ckpt-every", default=1000, show_default=True, type=click.IntRange(min=1)),
        click.option("--keep-checkpoints", default=2, show_default=True, type=click.IntRange(min=1)),
        click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1)),
        click.option("--num-workers", default=2, show_default=True, type=click.IntRange(min=0)),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
                     help="bf16 autocast or fp32. Default: bf16 on CUDA with bf16 support, else fp32."),
        click.option("--device", default=None, callback=device_option_check,
                     help="cpu, cuda ... Default: cuda when available."),
        click.option("--resume", is_flag=True, default=False, help="Continue from the latest checkpoint in --out."),
        click.option("--overwrite", is_flag=True, default=False,
                     help="Replace the run already in --out (without it, a non-empty --out is refused)."),
        click.option("--no-progress", is_flag=True, default=False),
    ]

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def command(**kw):
            for a, b in (("lr", "lr_per_256"), ("max_steps", "epochs")):
                if kw.get(a) is not None and kw.get(b) is not None:
                    raise click.UsageError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} exclude each other")
                if kw.get(a) is None:
                    kw.pop(a, None)
            return f(**kw)

        for option in reversed(options):
            command = option(command)
        return command
    return decorate
