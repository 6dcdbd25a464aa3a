"""`dd train`: distil a teacher into a DD student from a (noise, tokens) pair data set.

    dd train --data pairs/ --out runs/llamagen-b-dd [--timesteps 1,81] [--batch-size 64] ...
    torchrun --nproc_per_node=8 -m distilled_decoding train --data pairs/ --out runs/x ...

One step: each sample of the global batch gets a training timestep t (uniform over `--timesteps`);
X_t = make_xt(codebook[tokens], noise, t) (the first t − 1 AR steps data, the rest the pair's noise);
the loss on the noise positions is λ_ce·CE(logits, tokens) + λ_emb·d(emb, codebook[tokens]) with d
the MSE in embedding space (`--emb-loss mse`), or a distance between images decoded by the teacher's VQ
decoder (the sequence with the student's embeddings on the noise positions vs the target sequence;
perceptual.py): digits-classifier features, LPIPS-style (`--emb-loss perceptual`, the digits teachers)
or LPIPS (`--emb-loss lpips`). Per-sample means, then the batch mean.

The loop itself (micro-batching, DDP, EMA, checkpoints, resume, metrics) is `trainer.train_loop`;
this file brings the DD student, the pair data set and `dd_loss`. Determinism: the data order is the
loop's (`trainer.MicroBatches`), and the timestep of a sample depends only on (seed, epoch, dataset
position) (`seeding.sample_timestep`), so runs on 1 and K ranks, with any `--grad-accum`, and
resumed runs see the same batches and timesteps.

Run directory (`--out`):

    config.json, student.safetensors, student_raw.safetensors, codebook.safetensors   (student_run.py)
    checkpoints/step-XXXXXXXX/{model,ema}.safetensors, optimizer.pt, state.json    (every --ckpt-every)
    metrics.jsonl                                                                  (every --log-every)
    curves.png     loss terms vs step (plots.update_curves: every 10 log lines, at checkpoints)

student.safetensors / student_raw.safetensors are hard links to the latest checkpoint's ema / model
files (copies where links are impossible).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import click
import torch
from torch.utils.data import Dataset

from .dataset import PairDataset
from .dd_loss import EMB_LOSSES, dd_h_loss, dd_loss, make_emb_loss
from .distributed import barrier
from .fileio import file_sha256
from .errors import DDError
from .pairs import teacher_differences
from .run_dir import claim_run_dir
from .seeding import sample_timestep
from .student import build_student
from .student_run import CONFIG_FILE, publish_checkpoint, read_run_config, student_checkpoint_weights
from .trainer import (LoopArgs, describe_recipe, loop_options, micro_batch_size, on_ranks, resolve_precision,
                      resolve_recipe, resume_or_refuse, run_training, update_ema)

# Arguments that define the stream of batches, timesteps and updates: a resume must keep them.
STREAM_ARGS = ("batch_size", "grad_accum", "seed", "timesteps", "timestep_weights", "split", "lambda_ce",
               "lambda_emb", "emb_loss", "lpips_net", "lr", "warmup_steps", "lr_schedule", "weight_decay",
               "ema_decay", "grad_clip", "precision", "history", "lower_layers")


@dataclass
class TrainArgs(LoopArgs):
    """`dd train` options (see the CLI help). timesteps / split None = the family's paper defaults
    scaled to the teacher (`student.default_schedule`); precision None = bf16 on CUDA with bf16
    support, else fp32; device None = cuda when available."""

    data: str
    out: str
    timesteps: Optional[tuple] = None
    timestep_weights: Optional[tuple] = None     # relative integer weights of the timesteps (None: uniform)
    split: Optional[int] = None
    lambda_ce: float = 0.1
    lambda_emb: float = 1.0
    emb_loss: str = "mse"
    lpips_net: str = "vgg"
    checkpoint: Optional[str] = None             # teacher transformer checkpoint override
    tokenizer_checkpoint: Optional[str] = None   # teacher tokenizer checkpoint override
    student_options: dict = field(default_factory=dict)
    history: Optional[str] = None                # DD-H (student_history.py): none | noise | all; None = plain DD
    lower_layers: Optional[int] = None           # DD-H: layers that attend to the history (None = all)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("timesteps", "timestep_weights"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d


class WithTimesteps(Dataset):
    """Items keyed by (epoch, position): the PairDataset item plus its timestep "t" (drawn with
    `weights`, None = uniform)."""

    def __init__(self, pairs: Dataset, timesteps: Sequence[int], seed: int, weights: Optional[Sequence[int]] = None):
        self.pairs, self.timesteps, self.seed = pairs, tuple(timesteps), seed
        self.weights = None if weights is None else tuple(weights)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> dict:
        epoch, i = key
        item = dict(self.pairs[i])
        item["t"] = torch.tensor(sample_timestep(self.timesteps, self.seed, epoch, i, self.weights),
                                 dtype=torch.long)
        return item


def train(args: TrainArgs, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) a DD student; collective under torchrun. Returns the last metrics record."""
    return on_ranks(_train, args, log)


def _train(args: TrainArgs, rank: int, world: int, device: str, log: Callable[[str], None]) -> dict:
    micro = micro_batch_size(args.batch_size, world, args.grad_accum)
    precision = resolve_precision(args.precision, device)
    out = args.out
    torch.manual_seed(args.seed * world + rank)

    claim_run_dir(out, resume=args.resume, overwrite=args.overwrite, remove=rank == 0)
    barrier(world)

    # -- data and teacher --
    pairs = PairDataset(args.data, verify=True)     # every shard's sha256, once per run, before any step
    spec = pairs.teacher_spec
    overrides = {k: os.path.abspath(v) for k, v in (("checkpoint", args.checkpoint),
                                                    ("tokenizer_checkpoint", args.tokenizer_checkpoint)) if v}
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    teacher = spec.load(device)
    wrong = teacher_differences(pairs.settings, teacher)
    if wrong:
        what = f"--checkpoint {args.checkpoint}" if args.checkpoint else f"the teacher of {args.data}"
        raise DDError(f"{what}: not the teacher that built the data set {args.data} ({'; '.join(wrong)})")
    if (pairs.num_tokens, pairs.embed_dim) != (teacher.num_tokens, teacher.embed_dim):
        raise ValueError(f"data set pairs are [{pairs.num_tokens}, {pairs.embed_dim}], the teacher makes "
                         f"[{teacher.num_tokens}, {teacher.embed_dim}]")
    args = resolve_recipe(args, len(pairs))             # effective lr and max_steps (--lr-per-256, --epochs)
    emb_loss, emb_desc = make_emb_loss(args.emb_loss, teacher, args.lpips_net)    # refuses before any work

    # -- student, EMA, optimizer --
    if args.resume and os.path.exists(os.path.join(out, CONFIG_FILE)):
        # a resume keeps the run's schedule unless one is given (then it must match: resume_or_refuse)
        saved = read_run_config(out)
        w = saved.get("train", {}).get("timestep_weights")
        args = dataclasses.replace(args, timesteps=args.timesteps or tuple(saved["timesteps"]),
                                   split=saved["split"] if args.split is None else args.split,
                                   timestep_weights=args.timestep_weights or (tuple(w) if w else None))
    if args.resume and os.path.exists(os.path.join(out, CONFIG_FILE)) and args.history is None:
        saved_opts = read_run_config(out)["student"].get("options", {})
        args = dataclasses.replace(args, history=saved_opts.get("history"), lower_layers=saved_opts.get("lower_layers"))
    ddh = {} if args.history is None else {"history": args.history, "lower_layers": args.lower_layers}
    if args.history is None and args.lower_layers is not None:
        raise ValueError("--lower-layers needs --history none|noise|all")
    student = build_student(teacher, args.timesteps, args.split, seed=args.seed, **args.student_options, **ddh)
    cfg = student.config
    check_timestep_weights(args.timestep_weights, cfg.timesteps, args.history)
    student.train()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    update_ema(ema, student, 0.0)                                   # synced at decay 0 (DiT)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)

    # -- resume --
    manifest_sha = file_sha256(os.path.join(args.data, "manifest.json"))
    now = dict(args.to_dict(), timesteps=list(cfg.timesteps), split=cfg.split, precision=precision,
               lower_layers=cfg.options.get("lower_layers"))
    step = resume_or_refuse(out, args.resume, {"model": student.backbone, "ema": ema.backbone}, opt,
                            student.codebook.device, now, STREAM_ARGS, manifest_sha, log)

    if getattr(student.backbone, "init_notes", None) and not args.resume:
        log(f"init: {student.backbone.init_notes}")
    del teacher                     # only the image losses keep it (for its VQ decoder)
    recipe = describe_recipe(args)
    run_info = {
        "teacher": spec.to_dict(), "split": cfg.split, "timesteps": list(cfg.timesteps),
        "data": {"dir": os.path.abspath(args.data), "manifest_sha256": manifest_sha,
                 "num_samples": len(pairs), "settings": pairs.settings},
        "train": dict(args.to_dict(), timesteps=list(cfg.timesteps), split=cfg.split, precision=precision,
                      lower_layers=cfg.options.get("lower_layers"),
                      world_size=world, micro_batch=micro, emb_loss_desc=emb_desc, recipe=recipe),
    }
    log(f"student: {cfg.family}, {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params; "
        f"timesteps {cfg.timesteps}"
        + (f" drawn {':'.join(map(str, args.timestep_weights))}" if args.timestep_weights else "")
        + f", split {cfg.split}; "
        + (f"DD-H history {args.history}, lower layers {cfg.options['lower_layers']}; " if args.history else "")
        + f"{len(pairs)} pairs; batch {args.batch_size} "
        f"= {world} rank(s) x {args.grad_accum} accum x {micro}; precision {precision}; embedding loss: {emb_desc}; "
        f"{recipe}")

    codebook = student.codebook
    offsets = student.step_offsets
    captions = pairs.captions

    def loss_fn(model: torch.nn.Module, batch: dict):
        noise = batch["noise"].to(device, non_blocking=True).float()
        tokens = batch["tokens"].to(device, non_blocking=True).long()
        labels = batch["label"].to(device, non_blocking=True).long()
        if captions is not None:           # text-to-image: the pair's caption index -> its Caption
            labels = captions.caption(labels).to(device)
        if args.history is not None:       # every timestep of the trajectory, teacher-forced
            return dd_h_loss(model, noise, tokens, labels, cfg.timesteps, codebook=codebook, step_offsets=offsets,
                             lambda_ce=args.lambda_ce, lambda_emb=args.lambda_emb, emb_loss=emb_loss)
        t = batch["t"].to(device, non_blocking=True).long()
        return dd_loss(model, noise, tokens, labels, t, codebook=codebook, step_offsets=offsets,
                       lambda_ce=args.lambda_ce, lambda_emb=args.lambda_emb, emb_loss=emb_loss)

    def on_checkpoint(path: str, at: int) -> None:
        publish_checkpoint(out, path, cfg, student.codebook, dict(run_info, step=at))

    if rank == 0:
        os.makedirs(out, exist_ok=True)
    return run_training(
        args, precision, out=out, step=step, log=log, desc="dd train",
        model=student, ema=ema, opt=opt, loss_fn=loss_fn,
        dataset=WithTimesteps(pairs, cfg.timesteps, args.seed, args.timestep_weights),
        part_names=("ce", "emb"), rank=rank, world=world, device=device,
        checkpoint_weights=lambda: student_checkpoint_weights(student, ema),
        checkpoint_state={"train": run_info["train"], "data_manifest_sha256": manifest_sha},
        on_checkpoint=on_checkpoint)


def check_timestep_weights(weights: Optional[Sequence[int]], timesteps: Sequence[int], history: Optional[str]) -> None:
    """ValueError unless `weights` (None = uniform) give each of `timesteps` one positive integer."""
    if weights is None:
        return
    if history is not None:
        raise ValueError("--timestep-weights: DD-H (--history) trains every timestep of the trajectory in each step")
    if len(weights) != len(timesteps) or min(weights) < 1:
        raise ValueError(f"--timestep-weights {','.join(map(str, weights))}: need one positive integer per "
                         f"training timestep {','.join(map(str, timesteps))} (in that order)")


# ---- CLI --------------------------------------------------------------------------------------
def _comma_ints(value: str, what: str) -> tuple:
    """"3, 1" -> (3, 1); click.BadParameter naming `what` when an item is not an integer."""
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated {what}, got {value!r}") from e


def _parse_timesteps(ctx, param, value):
    if value is None:
        return None
    ts = tuple(sorted(set(_comma_ints(value, "integers"))))
    if not ts or ts[0] < 1:
        raise click.BadParameter("timesteps are 1-indexed AR steps (1 = pure noise)")
    return ts


def _parse_weights(ctx, param, value):
    if value is None:
        return None
    w = _comma_ints(value, "positive integers")
    if not w or min(w) < 1:
        raise click.BadParameter(f"expected comma-separated positive integers, got {value!r}")
    return w


@click.command("train")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Pair data set (dd build-dataset).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--timesteps", default=None, callback=_parse_timesteps,
              help="Training timesteps, paper notation (1 = pure noise), e.g. 1,81. "
                   "Default: LlamaGen 1,81; VAR 1,6 (d20/d24 1,5); scaled for teachers with other step counts.")
@click.option("--timestep-weights", default=None, callback=_parse_weights,
              help="Relative integer weights of the training timesteps (sorted ascending), e.g. 3,1: a sample "
                   "draws t = 1 three times as often as t = 81. Default: uniform.")
@click.option("--split", type=click.IntRange(min=1), default=None,
              help="AR steps < split use the logits head when sampling (recorded in the run). "
                   "Default: LlamaGen-B 80, -L 130; VAR 5 (d20/d24 4); scaled likewise.")
@click.option("--history", type=click.Choice(["none", "noise", "all"]), default=None,
              help="DD-H (docs/ddh.md): the lower layers of step k also attend to the earlier steps' inputs "
                   "(noise: X_{t_1} only; all: every earlier one; none: no history, teacher-forced K-block "
                   "training only). Default: plain DD.")
@click.option("--lower-layers", type=click.IntRange(min=0), default=None,
              help="DD-H: how many lower layers attend to the history. Default: all layers.")
@click.option("--lambda-ce", default=0.1, show_default=True, type=float, help="Weight of the cross-entropy loss.")
@click.option("--lambda-emb", default=1.0, show_default=True, type=float, help="Weight of the embedding loss.")
@click.option("--emb-loss", type=click.Choice(list(EMB_LOSSES)), default="mse", show_default=True,
              help="mse: in embedding space; on images decoded by the teacher's VQ decoder: perceptual "
                   "(digits-classifier features, LPIPS-style; 16x16 digits teachers only) or lpips (needs lpips).")
@click.option("--lpips-net", type=click.Choice(["vgg", "alex", "squeeze"]), default="vgg", show_default=True)
@click.option("--checkpoint", "teacher_checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher transformer checkpoint, if not where the data set's manifest says.")
@click.option("--tokenizer-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher tokenizer checkpoint, if not where the data set's manifest says.")
@loop_options(max_steps=100_000)
def train_command(data, out, timesteps, timestep_weights, split, history, lower_layers, lambda_ce, lambda_emb, emb_loss, lpips_net,
                  teacher_checkpoint, tokenizer_checkpoint, no_progress, **loop):
    """Train a DD student on a pair data set (multi-process under torchrun)."""
    args = TrainArgs(data=data, out=out, timesteps=timesteps, timestep_weights=timestep_weights, split=split, lambda_ce=lambda_ce,
                     lambda_emb=lambda_emb, emb_loss=emb_loss, lpips_net=lpips_net, progress=not no_progress,
                     checkpoint=teacher_checkpoint, tokenizer_checkpoint=tokenizer_checkpoint,
                     history=history, lower_layers=lower_layers, **loop)
    try:
        train(args, log=click.echo)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e
