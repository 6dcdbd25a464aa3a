"""`dd csd init`: DD2's AR-diffusion initialisation (§3.3, GTS loss Eq. 6; docs/dd2.md).

    dd csd init --data DS --out runs/gts [--head-width 256] [--freeze-backbone-steps N] ...
    dd csd train --teacher ... --out runs/csd --init-run runs/gts     # both networks start from it

The teacher's classification head gives way to an MLP: the network is `csd_nets.GuidanceNet` (a
teacher-initialised backbone over the one-step-shifted sequence, block-causal, and an MLP head over
(x_τ, τ, logit τ, features)). It is tuned into an AR-diffusion model by regressing the teacher's analytic
conditional velocity (`csd.gts_loss`, target `csd.gts_target` = `dd2_score.conditional_velocity`) on teacher-generated token
sequences: the token sequences of a `dd build-dataset` pair data set (the noise half is not used).
Per batch: the teacher's next-token log-probabilities on the sequence (teacher forcing, the data set's
sampling: CFG, top-k/p), then --draws draws of per-position τ and ε on the same backbone features.
--freeze-backbone-steps: the first N steps train the head only (DD2 does VAR's head first, then all).

What the paper leaves open (dd2-facts.md), chosen here: τ is drawn as CSD draws it (`csd.CSDConfig`,
logit-normal(−1, 1.5) on [0.02, 0.98] by default), and a fraction --tau-one of the positions gets τ = 1,
the generator's time (the generator reads the head at τ = 1, which the CSD draw never reaches).

LlamaGen's extra stage (App. E.4: an MLP fitted to the token embedding table, then AR fine-tuning on
continuous inputs) is not needed here: the DD student backbone already reads continuous codebook vectors
through `tok_embeddings = Linear(C, dim)`, the least-squares fit of the teacher's table on the codebook
(student_llamagen.py), the cheaper alternative that the GTS tuning then adapts.

Run directory (`--out`): a DD student run (`student_run.py`) whose student has output "ar_diffusion"
(`student.DDStudent`: x = ε − v(ε, τ = 1, shifted ε)), so `dd sample --run OUT --steps 1` samples the
generator the init hands to CSD, and `dd csd train --init-run OUT` starts both networks from it.
On the shared loop (`trainer.train_loop`: EMA, metrics.jsonl, checkpoints, --resume bit for bit, torchrun
ranks with the gradients averaged: every sequence's noise comes from its own draw index, so K ranks
train on exactly the batches and noise of one).
metrics.jsonl: loss (GTS, per sequence), one (the part of it at τ = 1 positions, per position).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import click
import torch
from torch.utils.data import Dataset

from .csd import CSDConfig, tau_options, diffuse, gts_loss, gts_target, sample_tau
from .csd_nets import teacher_logp
from .dataset import PairDataset
from .errors import DDError
from .fileio import file_sha256
from .pairs import teacher_differences
from .run_dir import claim_run_dir
from .seeding import sample_generators
from .student import build_student
from .student_run import publish_checkpoint, student_checkpoint_weights
from .trainer import (LoopArgs, describe_recipe, loop_options, on_ranks, resolve_precision, resolve_recipe,
                      resume_or_refuse, run_training, update_ema)

STREAM_ARGS = ("batch_size", "seed", "lr", "head_width", "tau_dist", "tau_min", "tau_max", "logit_mean",
               "logit_std", "tau_one", "draws", "freeze_backbone_steps", "warmup_steps", "lr_schedule",
               "weight_decay", "ema_decay", "grad_clip", "precision", "noise_draw")


@dataclass
class GTSInitArgs(LoopArgs):
    """`dd csd init` options (see the CLI help)."""

    data: str
    out: str
    head_width: int = 256
    tau_dist: str = "logit_normal"
    tau_min: float = 0.02
    tau_max: float = 0.98
    logit_mean: float = -1.0
    logit_std: float = 1.5
    tau_one: float = 0.1
    draws: int = 1
    freeze_backbone_steps: int = 0

    def csd_config(self) -> CSDConfig:
        return CSDConfig(tau_dist=self.tau_dist, tau_min=self.tau_min, tau_max=self.tau_max,
                         logit_mean=self.logit_mean, logit_std=self.logit_std)


class WithDraw(Dataset):
    """Items keyed by (epoch, position): the PairDataset item plus "draw" = epoch·N + i (seeds its noise)."""

    def __init__(self, pairs: Dataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> dict:
        epoch, i = key
        item = dict(self.pairs[i])
        item["draw"] = torch.tensor(epoch * len(self.pairs) + i, dtype=torch.long)
        return item


def gts_draws(item_draws, k: int, n: int, C: int, args: GTSInitArgs, csd: CSDConfig, device):
    """Draw k of a batch: (τ [B, n] with a --tau-one fraction at 1, ε [B, n, C]), each sequence's from
    (--seed, its draw index, k) alone, so a batch draws the same on any number of ranks."""
    taus, epss = [], []
    for g in sample_generators(args.seed, [int(d) * args.draws + k for d in item_draws], "gts"):
        tau = sample_tau((n,), csd, generator=g)
        taus.append(torch.where(torch.rand(n, generator=g) < args.tau_one, torch.ones_like(tau), tau))
        epss.append(torch.randn(n, C, generator=g))
    return torch.stack(taus).to(device), torch.stack(epss).to(device)


def train_gts(args: GTSInitArgs, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) an AR-diffusion initialisation. Returns the last metrics record."""
    return on_ranks(_train, args, log)


def _train(args: GTSInitArgs, rank: int, world: int, device: str, log: Callable[[str], None]) -> dict:
    from teachers.base import SamplingConfig
    from .teacher_spec import resolve_sampling
    if not 0.0 <= args.tau_one <= 1.0 or args.draws < 1 or args.freeze_backbone_steps < 0:
        raise DDError("--tau-one must lie in [0, 1], --draws >= 1, --freeze-backbone-steps >= 0")
    csd = args.csd_config()
    precision = resolve_precision(args.precision, device)
    out = args.out
    claim_run_dir(out, resume=args.resume, overwrite=args.overwrite)

    pairs = PairDataset(args.data, verify=True)
    spec = pairs.teacher_spec
    teacher = spec.load(device).eval().requires_grad_(False)
    if getattr(teacher, "text_conditional", False):
        raise DDError(f"--data {args.data}: `dd csd init` supports class-conditional teachers only")
    wrong = teacher_differences(pairs.settings, teacher)
    if wrong:
        raise DDError(f"the teacher of {args.data} no longer matches the data set ({'; '.join(wrong)})")
    base = pairs.settings.get("sampling") or {}
    sampling = resolve_sampling(teacher, {})
    sampling = SamplingConfig(**{k: base.get(k, v) for k, v in sampling.to_dict().items()})
    args = resolve_recipe(args, len(pairs))

    torch.manual_seed(args.seed)
    model = build_student(teacher, timesteps=(1,), split=0, seed=args.seed, output="ar_diffusion",
                          head_width=args.head_width)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    update_ema(ema, model, 0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    manifest_sha = file_sha256(os.path.join(args.data, "manifest.json"))
    now = dict(args.to_dict(), precision=precision, noise_draw="item")
    step = resume_or_refuse(out, args.resume, {"model": model.backbone, "ema": ema.backbone}, opt, device, now,
                            STREAM_ARGS, manifest_sha, log)
    codebook = model.codebook
    calls = [step * args.grad_accum]          # loss_fn calls so far: the freeze's clock

    def loss_fn(net, batch: dict):
        frozen = calls[0] // args.grad_accum < args.freeze_backbone_steps
        calls[0] += 1
        tokens = batch["tokens"].to(device).long()
        labels = batch["label"].to(device).long()
        guide = net.backbone
        x0 = codebook[tokens]                                               # [B, n, C]
        logp = teacher_logp(teacher, labels, tokens, sampling)              # [B, n, V]
        feats = guide.features(x0, labels, backbone_grad=not frozen)
        loss, one = 0.0, torch.zeros(tokens.shape[0], device=device)
        for k in range(args.draws):
            tau, eps = gts_draws(batch["draw"].tolist(), k, x0.shape[1], x0.shape[2], args, csd, device)
            x_tau = diffuse(x0, tau, eps)
            v = guide.head_velocity(x_tau, tau, feats)
            target = gts_target(x_tau, tau, logp, codebook)
            loss = loss + gts_loss(v, target) / args.draws
            with torch.no_grad():       # the τ = 1 positions' share, per position (what the generator reads)
                err = (v - target).pow(2).sum(-1)
                at1 = (tau == 1).float()
                one += (err * at1).sum(1) / at1.sum(1).clamp(min=1) / args.draws
        return loss, {"one": one}

    train_info = dict(now, recipe=describe_recipe(args), world_size=world)
    run_info = {"teacher": spec.to_dict(), "split": 0, "timesteps": [1], "sampling": sampling.to_dict(),
                "method": "gts", "train": train_info,
                "data": {"dir": os.path.abspath(args.data), "manifest_sha256": manifest_sha,
                         "num_samples": len(pairs), "settings": pairs.settings}}
    log(f"gts init: {teacher.family} AR-diffusion model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"params (head width {args.head_width}); {len(pairs)} teacher sequences; batch {args.batch_size}, "
        f"{args.draws} draw(s); tau {csd.tau_dist} + {args.tau_one:g} at 1; head only for "
        f"{args.freeze_backbone_steps} steps; {world} rank(s); precision {precision}; {describe_recipe(args)}")

    def on_checkpoint(path: str, at: int) -> None:
        publish_checkpoint(out, path, model.config, codebook, dict(run_info, step=at))

    os.makedirs(out, exist_ok=True)
    return run_training(
        args, precision, out=out, step=step, log=log, desc="dd csd init",
        model=model, ema=ema, opt=opt, loss_fn=loss_fn, dataset=WithDraw(pairs), part_names=("one",),
        rank=rank, world=world, device=device, grad_sync="average",      # the loss calls the backbone's methods
        checkpoint_weights=lambda: student_checkpoint_weights(model, ema),
        checkpoint_state={"train": train_info, "data_manifest_sha256": manifest_sha},
        on_checkpoint=on_checkpoint)


# ---- CLI (a command of the `dd csd` group, csd_train.py) -----------------------------------------
@click.command("init")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="A `dd build-dataset` data set of the teacher (its token sequences are the teacher's samples).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--head-width", default=256, show_default=True, type=click.IntRange(min=1),
              help="Hidden width of the MLP head (the guidance network's --head-width).")
@tau_options
@click.option("--tau-one", default=0.1, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Fraction of positions at τ = 1 (the generator's time).")
@click.option("--draws", default=1, show_default=True, type=click.IntRange(min=1),
              help="(τ, ε) draws per sequence on the same backbone features.")
@click.option("--freeze-backbone-steps", default=0, show_default=True, type=click.IntRange(min=0),
              help="Train the head only for the first N steps (DD2's VAR recipe: head first, then all).")
@loop_options(max_steps=2000)
def csd_init_command(data, out, head_width, tau_dist, tau_min, tau_max, logit_mean, logit_std, tau_one, draws,
                     freeze_backbone_steps, no_progress, **loop):
    """DD2's AR-diffusion init: regress the teacher's analytic score on its own sequences (GTS).

    \b
      dd csd init --data ds --out runs/gts --max-steps 500 --freeze-backbone-steps 100
      dd csd train --teacher digits-llamagen --out runs/csd --init-run runs/gts
    """
    try:
        CSDConfig(tau_dist=tau_dist, tau_min=tau_min, tau_max=tau_max, logit_mean=logit_mean, logit_std=logit_std)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    args = GTSInitArgs(data=data, out=out, head_width=head_width, tau_dist=tau_dist, tau_min=tau_min,
                       tau_max=tau_max, logit_mean=logit_mean, logit_std=logit_std, tau_one=tau_one, draws=draws,
                       freeze_backbone_steps=freeze_backbone_steps, progress=not no_progress, **loop)
    try:
        train_gts(args, log=click.echo)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e
