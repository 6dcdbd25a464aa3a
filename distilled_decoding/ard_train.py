"""`dd ard train`: distil a DiT teacher into an ARD student (`ard_student.py`) on its trajectories.

    dd ard train --data traj/ --out runs/ard-dit [--steps 4] [--mask M4] [--lower-layers 6] ...
    torchrun --nproc_per_node=8 -m distilled_decoding ard train --data traj/ --out runs/x ...

One step: a batch of teacher trajectories states [B, S+1, C, H, W] (`trajectories.TrajectoryDataset`,
slot 0 the noise, slot S the teacher's x_0), one teacher-forced forward of the student on inputs
0..S-1, and the loss Σ_k mean‖out[:, k] − states[:, k+1]‖² (the paper's regression loss: the mean
over a state's elements, summed over the S steps; logged per step as step0..step{S-1}).

--disc-weight λ > 0 adds the paper's second stage (R + D, `ard_discriminator.py`): a discriminator of
light heads on the frozen teacher trunk, trained with its own AdamW on --real-data after every update
(hinge loss), and the student's adversarial term λ·w·L_G with the adaptive weight w (0 before
--disc-start-step); logged as gan_g, d_weight, d_loss, d_real, d_fake. The paper runs it as a fine-tune
of the regression student: --init RUN starts a new run from another run's weights (raw and EMA).

Defaults are the paper's (public code): AdamW lr 1e-4, weight decay 0, clip 1.0, EMA 0.9999, 300k
steps, mask M4. N (--lower-layers) defaults to the paper's 6 of 28 blocks scaled to the teacher's
depth, at least 1 (`default_lower_layers`: DiT-XL/2 6, a depth-12 DiT 3, the 4-block digits-dit 1).
--steps S' < the data set's S trains on the nested sub-trajectory (e.g. S = 2 or 1 from an S = 4 set).

The loop (micro-batching, DDP, bf16, EMA, checkpoints, exact resume, metrics) is `trainer.train_loop`.
Run directory (`--out`), read by `load_ard_run`:

    config.json                 {"format": "ard-student", "student": ARDConfig, "teacher": TeacherSpec, ...}
    student.safetensors         EMA weights in the ARD key layout (hard link to the latest checkpoint's)
    student_raw.safetensors     the raw weights
    checkpoints/step-XXXXXXXX/{model,ema[,disc]}.safetensors, optimizer.pt (+ the heads' under "disc"), state.json
    metrics.jsonl, curves.png
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import click
import torch
from torch.utils.data import Dataset

from teachers.checkpoint import load_safetensors

from .ard_discriminator import DiscriminatorStage, DiscSettings, load_real_data
from .ard_student import ARDConfig, ARDStudent, build_ard_student, load_ard_student
from .distributed import barrier
from .errors import DDError
from .fileio import file_sha256
from .history_mask import MASKS, canonical
from .run_dir import (CONFIG_FILE, RAW_WEIGHTS_FILE, WEIGHTS_FILE, claim_run_dir, latest_checkpoint, publish,
                      read_run_config as _read_config, write_run_config as _write_config)
from .teacher_spec import TeacherSpec
from .trainer import (LoopArgs, describe_recipe, loop_options, micro_batch_size, on_ranks, resolve_precision,
                      resolve_recipe, resume_or_refuse, run_training, update_ema)
from .trajectories import TrajectoryDataset, teacher_differences

RUN_FORMAT = "ard-student"
RUN_FORMAT_VERSION = 1
PAPER_LOWER_LAYERS, PAPER_DEPTH = 6, 28

# Arguments that define the stream of batches and updates: a resume must keep them.
STREAM_ARGS = ("batch_size", "grad_accum", "seed", "num_steps", "lower_layers", "mask", "lr", "warmup_steps",
               "lr_schedule", "weight_decay", "ema_decay", "grad_clip", "precision", "disc_weight")
# ... and with the discriminator stage on
DISC_STREAM_ARGS = ("disc_start_step", "disc_lr", "disc_timestep", "real_data")


def default_lower_layers(depth: int) -> int:
    """The paper's N = 6 of 28 blocks scaled to `depth`, at least 1 (28 -> 6, 12 -> 3, 4 -> 1)."""
    return min(depth, max(1, round(depth * PAPER_LOWER_LAYERS / PAPER_DEPTH)))


@dataclass
class ARDTrainArgs(LoopArgs):
    """`dd ard train` options (see the CLI help). teacher None = the data set's; num_steps None = the
    data set's S; lower_layers None = default_lower_layers(depth); mask None = M4 (a resume keeps the
    run's unless given); precision None = bf16 on CUDA with bf16 support; threads None = torch's.
    disc_weight > 0: the discriminator stage (DiscSettings' weight, start_step, lr, timestep) on
    real_data ("digits" or an .npz, `load_real_data`); init: a run directory whose weights start this one."""

    data: str
    out: str
    teacher: Optional[str] = None
    num_steps: Optional[int] = None
    lower_layers: Optional[int] = None
    mask: Optional[str] = None
    threads: Optional[int] = None
    disc_weight: float = 0.0
    disc_start_step: int = DiscSettings.start_step
    disc_lr: float = DiscSettings.lr
    disc_timestep: int = DiscSettings.timestep
    real_data: Optional[str] = None
    init: Optional[str] = None
    max_steps: int = field(default=300_000, kw_only=True)


class ByPosition(Dataset):
    """Items keyed by (epoch, position), as train_loop asks: the trajectory at `position`."""

    def __init__(self, items: Dataset):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        _, i = key
        item = self.items[i]
        return {"states": item["states"], "labels": item["labels"]}


def ard_loss(model: Union[ARDStudent, torch.nn.Module], states: torch.Tensor, labels: torch.Tensor,
             return_outputs: bool = False):
    """states [B, S+1, C, H, W], labels [B] -> (Σ_k mean over (batch, elements) of (out[:, k] −
    states[:, k+1])², {"step{k}": [B] per-sample mean squared error of step k}) [, out [B, S, C, H, W]]."""
    out = model(states[:, :-1], labels)                                      # [B, S, C, H, W]
    per = (out.float() - states[:, 1:].float()).pow(2).flatten(2).mean(-1)   # [B, S]
    loss, parts = per.mean(0).sum(), {f"step{k}": per[:, k] for k in range(per.shape[1])}
    return (loss, parts, out) if return_outputs else (loss, parts)


def resolve_teacher(data_spec: TeacherSpec, teacher: Optional[str]) -> TeacherSpec:
    """--teacher: None = the data set's teacher; a checkpoint file = the data set's teacher with
    those weights; otherwise a zoo name."""
    from teachers import zoo_names
    if teacher is None:
        return data_spec
    if os.path.isfile(teacher):
        if data_spec.teacher in zoo_names():
            raise DDError(f"--teacher {teacher}: the data set's teacher is the zoo's {data_spec.teacher}, which has "
                          "its own weights; drop --teacher")
        return dataclasses.replace(data_spec, checkpoint=os.path.abspath(teacher))
    if teacher not in zoo_names():
        raise DDError(f"--teacher {teacher}: neither a checkpoint file nor a zoo teacher ({', '.join(zoo_names())})")
    return TeacherSpec(teacher)


def train_ard(args: ARDTrainArgs, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) an ARD student; collective under torchrun. Returns the last metrics record."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return on_ranks(_train, args, log)


def _train(args: ARDTrainArgs, rank: int, world: int, device: str, log: Callable[[str], None]) -> dict:
    micro = micro_batch_size(args.batch_size, world, args.grad_accum)
    precision = resolve_precision(args.precision, device)
    out = args.out
    torch.manual_seed(args.seed * world + rank)

    claim_run_dir(out, resume=args.resume, overwrite=args.overwrite, remove=rank == 0)
    barrier(world)

    if args.resume and os.path.exists(os.path.join(out, CONFIG_FILE)):
        # a resume keeps the run's student unless given (then it must match: resume_or_refuse)
        saved = ARDConfig.from_dict(read_ard_run_config(out)["student"])
        args = dataclasses.replace(args, num_steps=args.num_steps or saved.num_steps, mask=args.mask or saved.mask,
                                   lower_layers=saved.lower_layers if args.lower_layers is None else args.lower_layers)

    # -- data and teacher --
    data = TrajectoryDataset(args.data, num_steps=args.num_steps, verify=True)   # every shard's sha256, once
    spec = resolve_teacher(data.teacher_spec, args.teacher)
    teacher = spec.load(device, diffusion=True)
    wrong = teacher_differences(data.settings, teacher)
    if wrong:
        raise DDError(f"--teacher {args.teacher or spec.teacher}: not the teacher that built {args.data} "
                      f"({'; '.join(wrong)})")
    dit = teacher.model.cfg
    lower = default_lower_layers(dit.depth) if args.lower_layers is None else args.lower_layers
    config = ARDConfig(dit.to_dict(), data.num_steps, lower, canonical(args.mask or "M4"), data.timesteps)
    args = dataclasses.replace(args, num_steps=config.num_steps, lower_layers=config.lower_layers, mask=config.mask)
    args = resolve_recipe(args, len(data))              # effective lr and max_steps (--lr-per-256, --epochs)
    disc_on = args.disc_weight > 0
    if disc_on and not args.real_data:
        raise DDError("--disc-weight needs --real-data (digits, or an .npz of images with labels in arr_1)")
    if args.init:
        args = dataclasses.replace(args, init=os.path.abspath(args.init))

    # -- student, EMA, optimizer (and the discriminator stage) --
    student = build_ard_student(teacher.model, config).float().train()
    stage = None
    if disc_on:
        real_x, real_y = load_real_data(args.real_data, teacher)
        stage = DiscriminatorStage(teacher.model.float(), real_x, real_y,
                                   DiscSettings(args.disc_weight, args.disc_start_step, args.disc_lr, args.disc_timestep),
                                   seed=args.seed, rank=rank, world=world, device=device)
    del teacher
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    update_ema(ema, student, 0.0)                                   # synced at decay 0 (DiT)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=args.weight_decay)

    manifest_sha = file_sha256(os.path.join(args.data, "manifest.json"))
    modules = {"model": student, "ema": ema}
    if stage is not None:
        modules["disc"] = stage.heads
        ckpt = latest_checkpoint(out) if args.resume else None
        if ckpt is not None and not os.path.exists(os.path.join(ckpt, "disc.safetensors")):
            raise DDError(f"--resume --disc-weight: {ckpt} holds no discriminator (the run was made without it); "
                          "start a new run from it with --init")
    step = resume_or_refuse(out, args.resume, modules, opt, device, dict(args.to_dict(), precision=precision),
                            STREAM_ARGS + (DISC_STREAM_ARGS if disc_on else ()), manifest_sha, log,
                            other_optimizers={"disc": stage.optimizer} if stage is not None else None)
    if step == 0 and args.init:
        init_from_run(args.init, config, student, ema, device)
        log(f"initialised from {args.init} (raw and EMA weights; a fresh optimizer)")

    run_info = {
        "teacher": spec.to_dict(),
        "data": {"dir": os.path.abspath(args.data), "manifest_sha256": manifest_sha, "num_samples": len(data),
                 "kept": list(data.kept), "history": data.history, "settings": data.settings},
        "train": dict(args.to_dict(), precision=precision, world_size=world, micro_batch=micro,
                      recipe=describe_recipe(args)),
    }
    n_params = sum(p.numel() for p in student.parameters()) / 1e6
    log(f"ARD student: {n_params:.2f}M params; S = {config.num_steps}, N = {config.lower_layers} of {dit.depth} "
        f"blocks, mask {config.mask}, time labels {list(config.timesteps)}; {len(data)} trajectories "
        f"(history {data.history}); batch {args.batch_size} = {world} rank(s) x {args.grad_accum} accum x {micro}; "
        f"precision {precision}; {describe_recipe(args)}")

    part_names = tuple(f"step{k}" for k in range(config.num_steps)) + (("gan_g", "d_weight") if disc_on else ())

    def loss_fn(model: torch.nn.Module, batch: dict):
        states = batch["states"].to(device, non_blocking=True).float()
        labels = batch["labels"].to(device, non_blocking=True).long()
        if stage is None:
            return ard_loss(model, states, labels)
        loss, parts, out = ard_loss(model, states, labels, return_outputs=True)
        loss, adv = stage.generator_loss(model, out[:, -1], loss, labels)
        return loss, {**parts, **adv}

    def on_checkpoint(path: str, at: int) -> None:
        publish(out, path)
        write_ard_run_config(out, config, dict(run_info, step=at, weights="ema"))

    if rank == 0:
        os.makedirs(out, exist_ok=True)
    return run_training(
        args, precision, out=out, step=step, log=log, desc="dd ard train",
        model=student, ema=ema, opt=opt, loss_fn=loss_fn, dataset=ByPosition(data), part_names=part_names,
        rank=rank, world=world, device=device,
        checkpoint_weights=lambda: {"model": (student.state_dict(), {"weights": "raw"}),
                                    "ema": (ema.state_dict(), {"weights": "ema"}),
                                    **({"disc": (stage.heads.state_dict(), {"weights": "discriminator heads"})}
                                       if stage is not None else {})},
        checkpoint_state={"train": run_info["train"], "data_manifest_sha256": manifest_sha},
        on_checkpoint=on_checkpoint, second=stage.second_model() if stage is not None else None)


def init_from_run(run_dir: str, config: ARDConfig, student: ARDStudent, ema: torch.nn.Module, device) -> None:
    """--init: copy a finished run's raw and EMA weights (strictly) into `student` and `ema`; its
    student must be this run's (the same ARDConfig)."""
    theirs = ARDConfig.from_dict(read_ard_run_config(run_dir)["student"])
    if theirs != config:
        diff = [k for k in config.to_dict() if config.to_dict()[k] != theirs.to_dict()[k]]
        raise DDError(f"--init {run_dir}: its student differs from this run's ({', '.join(diff)})")
    for module, ema_weights in ((student, False), (ema, True)):
        loaded = load_ard_run(run_dir, device, ema=ema_weights)
        module.load_state_dict(loaded.state_dict(), strict=True)


# ---- the run directory -----------------------------------------------------------------------------
def write_ard_run_config(run_dir: str, config: ARDConfig, extra: dict) -> None:
    _write_config(run_dir, RUN_FORMAT, RUN_FORMAT_VERSION, dict(extra, student=config.to_dict()))


def read_ard_run_config(run_dir: str) -> dict:
    """config.json of an ARD run: "student" (ARDConfig dict), "teacher" (TeacherSpec dict), "data", "train"."""
    return _read_config(run_dir, RUN_FORMAT, what="ARD run")


def load_ard_run(run_dir: str, device: Union[str, torch.device] = "cpu", ema: bool = True) -> ARDStudent:
    """The student of a run directory, in eval mode: the EMA weights (student.safetensors), or with
    ema=False the raw ones (student_raw.safetensors). Loaded strictly (ard_student.load_ard_student)."""
    info = read_ard_run_config(run_dir)
    config = ARDConfig.from_dict(info["student"])
    path = os.path.join(run_dir, WEIGHTS_FILE if ema else RAW_WEIGHTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no {os.path.basename(path)} (no checkpoint written yet?)")
    # cloned: safetensors hands out views at arbitrary alignment (other SIMD paths, last-bit differences)
    state = {k: v.clone() for k, v in load_safetensors(path).items()}
    return load_ard_student(config, state, device=device, where=path).eval()


# ---- CLI ---------------------------------------------------------------------------------------------
@click.command("train")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Trajectory data set (dd ard build-dataset).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--teacher", default=None,
              help="The teacher, if not where the data set's manifest says: its checkpoint file (the same "
                   "weights, moved) or a zoo name. It must be the teacher that built the data set.")
@click.option("--steps", "num_steps", type=click.IntRange(min=1), default=None,
              help="Student steps S (heads); fewer than the data set's take its nested sub-trajectory. "
                   "Default: the data set's S.")
@click.option("--mask", type=click.Choice(list(MASKS) + ["current", "window", "noise", "causal"]), default=None,
              help="History mask of the lower blocks: M1 current only (step distillation), M2 window of 2, "
                   "M3 noise + current, M4 block-causal.  [default: M4]")
@click.option("--lower-layers", type=click.IntRange(min=0), default=None,
              help="N, the lower blocks that see the history. Default: the paper's 6 of 28 scaled to the "
                   "teacher's depth, at least 1 (DiT-XL/2 6, digits-dit 1).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads. Default: torch's.")
@click.option("--disc-weight", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="λ of the discriminator stage (R + D): the adversarial term's scale on the adaptive weight "
                   "(the public ARD code: 10). 0 = regression only.")
@click.option("--disc-start-step", type=click.IntRange(min=0), default=DiscSettings.start_step, show_default=True,
              help="Updates before the student's adversarial term switches on (the heads learn from step 0).")
@click.option("--disc-lr", type=click.FloatRange(min=0.0, min_open=True), default=DiscSettings.lr, show_default=True,
              help="The discriminator heads' AdamW learning rate.")
@click.option("--disc-timestep", type=click.IntRange(0, 999), default=DiscSettings.timestep, show_default=True,
              help="The frozen teacher trunk's time label for the clean samples it scores.")
@click.option("--real-data", default=None,
              help="Real data of the discriminator stage: 'digits' (the zoo's training digits) or an ADM-style "
                   ".npz of images (arr_0) with labels (arr_1), encoded by the teacher.")
@click.option("--init", "init", default=None, type=click.Path(exists=True, file_okay=False),
              help="Start from this ARD run's weights (raw and EMA; same student config), a fresh optimizer and "
                   "step 0: the paper's discriminator fine-tune of a regression student.")
@loop_options(max_steps=300_000)
def train(data, out, teacher, num_steps, mask, lower_layers, threads, disc_weight, disc_start_step, disc_lr,
          disc_timestep, real_data, init, no_progress, **loop):
    """Train an ARD student on a DiT teacher's trajectories (multi-process under torchrun)."""
    args = ARDTrainArgs(data=data, out=out, teacher=teacher, num_steps=num_steps, lower_layers=lower_layers,
                        mask=mask, threads=threads, disc_weight=disc_weight, disc_start_step=disc_start_step,
                        disc_lr=disc_lr, disc_timestep=disc_timestep, real_data=real_data, init=init,
                        progress=not no_progress, **loop)
    try:
        train_ard(args, log=click.echo)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e
