"""`dd csd train`: DD2's one-step generator by conditional score distillation (docs/dd2.md).

    dd csd train --teacher digits-llamagen --out runs/csd [--init-run runs/dd1] [--guidance-steps 5] ...

No data set: every step draws its own noise and labels. One generator update (the loop's step):
K = --guidance-steps updates of the guidance network by flow matching on fresh, detached generator
samples (`csd.guidance_loss`), then the CSD surrogate (`csd.generator_loss`) on a fresh batch: the
teacher's conditional score at x_τ given the generated prefix with stop-gradient (`csd.teacher_score`
over `csd_nets.teacher_logp`) against the guidance network's (`csd_nets.GuidanceNet`). Before step 1,
--guidance-warmup updates fit the guidance network to the initial generator. The generator is a DD
student at t = 1: a trained DD-1 student (--init-run, as it is: its embedding head is the sample) or a
fresh one from the teacher with DD2's velocity parameterisation x = ε − v (App. E.1).

The loop is `trainer.train_loop` (resume, EMA of the generator, metrics, checkpoints); its optimizer is
`PairedOptimizer`, the generator's AdamW (whose lr the loop schedules) with the guidance network's
beside it, both in optimizer.pt. Randomness of a step depends only on (--seed, the step's item
indices), so a resumed run repeats an uninterrupted one's losses, and K torchrun ranks (each its share of
the batch; both networks' gradients averaged over the ranks) train as one process does. No --grad-accum:
the guidance updates run inside the step.

Run directory (`--out`): a DD student run (`student_run.py`: config.json, student.safetensors =
the generator's EMA, student_raw.safetensors, codebook.safetensors; split 0 = the embedding head at
every position, timesteps (1,)), so `dd sample --run OUT --steps 1 [--snap]` samples it; checkpoints
also hold guidance.safetensors (strict-loaded on resume). metrics.jsonl columns: loss (the
surrogate, whose value is not a distance), guidance (flow-matching loss), gap (mean over positions of
‖(1 − τ)(D_fake − D_real)‖², the two scores' difference in data units, what ω = "denoiser" feeds back).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import click
import torch
from torch.utils.data import Dataset

from .csd import CSDConfig, tau_options, diffuse, generator_loss, guidance_loss, sample_tau, score_from_velocity, teacher_score
from .csd_nets import GuidanceNet, generate, teacher_logp
from .distributed import average_gradients, mean_over_ranks
from .errors import DDError
from .run_dir import claim_run_dir
from .seeding import sample_generators, sample_labels
from .student import build_student
from .student_run import load_run, publish_checkpoint, read_run_config, student_checkpoint_weights
from .teacher_spec import TeacherSpec, resolve_sampling, teacher_options
from .trainer import (LoopArgs, describe_recipe, loop_options, micro_batch_size, on_ranks, resolve_precision,
                      resume_or_refuse, run_training, update_ema)

STREAM_ARGS = ("batch_size", "seed", "lr", "guidance_lr", "guidance_steps", "guidance_warmup", "tau_dist",
               "tau_min", "tau_max", "logit_mean", "logit_std", "weight", "head_width", "init_run", "guidance_init", "output",
               "warmup_steps", "lr_schedule", "weight_decay", "ema_decay", "grad_clip", "precision", "sampling",
               "noise_draw")
ITEMS = 1 << 20          # the virtual data set: item i of epoch e is index e·ITEMS + i (its label, its noise)


@dataclass
class CSDTrainArgs(LoopArgs):
    """`dd csd train` options (see the CLI help); CSD's τ draw and weight are `csd.CSDConfig`'s."""

    out: str
    teacher: dict = dataclasses.field(default_factory=dict)     # TeacherSpec dict
    sampling: dict = dataclasses.field(default_factory=dict)    # overrides of the teacher's default sampling
    init_run: Optional[str] = None
    guidance_init: Optional[str] = None   # a `dd csd init` run starting the guidance network only
    output: Optional[str] = None      # generator parameterisation; None: embedding with --init-run, else velocity
    guidance_lr: float = 1e-4
    guidance_steps: int = 5
    guidance_warmup: int = 100
    head_width: int = 256
    tau_dist: str = "logit_normal"
    tau_min: float = 0.02
    tau_max: float = 0.98
    logit_mean: float = -1.0
    logit_std: float = 1.5
    weight: str = "denoiser"

    def csd_config(self) -> CSDConfig:
        return CSDConfig(tau_dist=self.tau_dist, tau_min=self.tau_min, tau_max=self.tau_max,
                         logit_mean=self.logit_mean, logit_std=self.logit_std, weight=self.weight,
                         guidance_steps=self.guidance_steps)


class LabelStream(Dataset):
    """Items keyed by (epoch, position): {"index": e·ITEMS + i, "label": balanced label of that index}."""

    def __init__(self, num_classes: int, seed: int):
        self.num_classes, self.seed = num_classes, seed

    def __len__(self) -> int:
        return ITEMS

    def __getitem__(self, key) -> dict:
        epoch, i = key
        index = epoch * ITEMS + i
        return {"index": torch.tensor(index), "label": sample_labels(self.seed, [index], self.num_classes, True)[0]}


class PairedOptimizer:
    """The loop's optimizer: the generator's (`param_groups`, `step`, `zero_grad`: the loop schedules
    and steps it) with the guidance network's beside it; state_dict / load_state_dict carry both."""

    def __init__(self, generator: torch.optim.Optimizer, guidance: torch.optim.Optimizer):
        self.generator, self.guidance = generator, guidance

    @property
    def param_groups(self):
        return self.generator.param_groups

    def step(self):
        self.generator.step()

    def zero_grad(self, set_to_none: bool = True):
        self.generator.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "guidance": self.guidance.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"generator", "guidance"}:
            raise ValueError("optimizer.pt is not a CSD run's (want generator and guidance states)")
        self.generator.load_state_dict(state["generator"])
        self.guidance.load_state_dict(state["guidance"])


def train_csd(args: CSDTrainArgs, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) a CSD generator. Returns the last metrics record."""
    return on_ranks(_train, args, log)


def _check_same_teacher(flag: str, run: str, info: dict, teacher, spec: TeacherSpec, device) -> None:
    """DDError unless the run `run` (its config.json `info`) was trained on the same teacher as --teacher."""
    if TeacherSpec.from_dict(info["teacher"]).load(device).describe() != teacher.describe():
        raise DDError(f"{flag} {run}: trained on another teacher than --teacher {spec.teacher}")


def _train(args: CSDTrainArgs, rank: int, world: int, device: str, log: Callable[[str], None]) -> dict:
    if args.grad_accum != 1:
        raise DDError("dd csd train runs without --grad-accum (its guidance updates run inside a step)")
    micro_batch_size(args.batch_size, world, 1)         # refuses a batch the ranks cannot share, before any work
    csd = args.csd_config()           # refuses a bad τ draw or weight before any work
    precision = resolve_precision(args.precision, device)
    out = args.out
    claim_run_dir(out, resume=args.resume, overwrite=args.overwrite)

    spec = TeacherSpec.from_dict(args.teacher)
    teacher = spec.load(device).eval().requires_grad_(False)
    if getattr(teacher, "text_conditional", False):
        raise DDError(f"--teacher {spec.teacher}: `dd csd train` supports class-conditional teachers only (text-to-image is not built)")
    sampling = resolve_sampling(teacher, args.sampling)
    # --init-run kinds: "gts" (`dd csd init`: the AR-diffusion model starts both networks, DD2 §3.3), "csd" (a CSD
    # run: its EMA generator and its guidance network; with --guidance-warmup that is DD2's performance
    # alignment, App. C.3), "dd1" (a DD-1 student: the generator only)
    kind, init_info = None, {}
    if args.init_run:
        init_info = read_run_config(args.init_run)
        kind = {"gts": "gts", "csd": "csd"}.get(init_info.get("method"), "dd1")
    init_output = init_info.get("student", {}).get("output")
    output = args.output or (init_output if kind in ("gts", "csd") else "embedding" if kind else "velocity")
    if kind == "gts" and output != "ar_diffusion":
        raise DDError(f"--init-run {args.init_run}: an AR-diffusion init (`dd csd init`) starts an ar_diffusion "
                      f"generator, not --output {output}")
    head_width = {"gts": init_info.get("student", {}).get("head_width"),
                  "csd": init_info.get("train", {}).get("head_width")}.get(kind) or args.head_width
    if args.guidance_init:
        g_info = read_run_config(args.guidance_init)
        if g_info.get("method") != "gts":
            raise DDError(f"--guidance-init {args.guidance_init}: not a `dd csd init` run")
        if kind in ("gts", "csd"):
            raise DDError(f"--guidance-init: --init-run {args.init_run} already starts the guidance network")
        head_width = g_info["student"]["head_width"]
    args = dataclasses.replace(args, output=output, init_run=os.path.abspath(args.init_run) if args.init_run else None,
                               guidance_init=os.path.abspath(args.guidance_init) if args.guidance_init else None,
                               head_width=head_width)

    # -- generator (a DD student at t = 1), its EMA, the guidance network --
    torch.manual_seed(args.seed)
    gen = build_student(teacher, timesteps=(1,), split=0, seed=args.seed, output=output,
                        **({"head_width": args.head_width} if output == "ar_diffusion" else {}))
    if args.init_run:
        init, info = load_run(args.init_run, device, ema=True)
        _check_same_teacher("--init-run", args.init_run, info, teacher, spec, device)
        if init.config.output != output or init.config.options != gen.config.options:
            raise DDError(f"--init-run {args.init_run}: its student (output {init.config.output!r}, options "
                          f"{init.config.options}) is not a generator with --output {output}")
        gen.backbone.load_state_dict(init.backbone.state_dict(), strict=True)
        init_state = init.backbone.state_dict()
        del init
    gen.train()
    ema = copy.deepcopy(gen).eval().requires_grad_(False)
    update_ema(ema, gen, 0.0)
    guide = GuidanceNet(build_student(teacher, timesteps=(1,), split=0, seed=args.seed + 1).backbone,
                        teacher.step_sizes, teacher.embed_dim, args.head_width).to(device).train()
    if kind == "gts":
        guide.load_state_dict(init_state, strict=True)
    elif args.guidance_init:
        g_init, g_info = load_run(args.guidance_init, device, ema=True)
        _check_same_teacher("--guidance-init", args.guidance_init, g_info, teacher, spec, device)
        guide.load_state_dict(g_init.backbone.state_dict(), strict=True)
        del g_init
    elif kind == "csd":
        from teachers.checkpoint import load_safetensors
        from .run_dir import latest_checkpoint
        guide.load_state_dict(load_safetensors(os.path.join(latest_checkpoint(args.init_run), "guidance.safetensors")),
                              strict=True)
    opt = PairedOptimizer(
        torch.optim.AdamW(gen.parameters(), lr=args.lr, betas=(0.0, 0.99), weight_decay=args.weight_decay),
        torch.optim.AdamW(guide.parameters(), lr=args.guidance_lr, betas=(0.0, 0.99), weight_decay=0.0))

    now = dict(args.to_dict(), precision=precision, noise_draw="item")
    step = resume_or_refuse(out, args.resume, {"model": gen.backbone, "ema": ema.backbone, "guidance": guide}, opt,
                            device, now, STREAM_ARGS, "none", log)
    codebook = gen.codebook
    n, C = teacher.num_tokens, teacher.embed_dim

    def draws(indices, stream: str):
        """(z [B, n, C], τ [B, n], ε [B, n, C]): item i's from (--seed, its index, stream) alone, so a
        batch draws the same on any number of ranks."""
        zs, taus, epss = [], [], []
        for g in sample_generators(args.seed, indices, stream):
            zs.append(torch.randn(n, C, generator=g))
            taus.append(sample_tau((n,), csd, generator=g))
            epss.append(torch.randn(n, C, generator=g))
        return tuple(torch.stack(t).to(device) for t in (zs, taus, epss))

    def guidance_update(indices, stream: str, labels: torch.Tensor) -> torch.Tensor:
        z, tau, eps = draws(indices, stream)
        with torch.no_grad():
            x0 = generate(gen, z, labels)
        v = guide(diffuse(x0, tau, eps), tau, x0, labels)
        per = (v - (eps - x0)).pow(2).sum((1, 2))                           # [B]
        loss = guidance_loss(v, x0, eps)
        opt.guidance.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(guide.parameters(), world)
        torch.nn.utils.clip_grad_norm_(guide.parameters(), args.grad_clip)
        opt.guidance.step()
        return per.detach()

    def loss_fn(model, batch: dict):
        labels = batch["label"].to(device).long()
        indices = batch["index"].tolist()
        fit = torch.stack([guidance_update(indices, f"csd-guidance{k}", labels)
                           for k in range(csd.guidance_steps)]).mean(0)
        z, tau, eps = draws(indices, "csd")
        x0 = generate(model, z, labels)
        x_tau = diffuse(x0, tau, eps)
        with torch.no_grad():
            s_fake = score_from_velocity(x_tau, guide(x_tau, tau, x0.detach(), labels), tau)
        s_real = teacher_score(x0, x_tau, tau, lambda x: teacher_logp(teacher, labels, x, sampling), codebook)
        loss = generator_loss(x_tau, s_fake, s_real, tau, csd)
        t2 = tau[..., None] ** 2
        gap = (t2 * (s_fake - s_real)).pow(2).sum(-1).mean(-1)            # ‖(1 − τ)(D_fake − D_real)‖²
        return loss, {"guidance": fit, "gap": gap.detach()}

    warmup_s = 0.0
    if step == 0 and args.guidance_warmup:
        t0 = time.perf_counter()
        stream = LabelStream(teacher.num_classes, args.seed)
        first = float("nan")
        share = args.batch_size // world        # this rank's items of each warm-up batch
        for k in range(args.guidance_warmup):
            items = [stream[(-1, k * args.batch_size + b)] for b in range(rank * share, (rank + 1) * share)]
            labels = torch.stack([it["label"] for it in items]).to(device)
            fit = mean_over_ranks(guidance_update([int(it["index"]) for it in items], "csd-warmup", labels).mean(),
                                  world).item()
            first = fit if k == 0 else first
        warmup_s = time.perf_counter() - t0
        log(f"guidance warm-up: {args.guidance_warmup} updates in {warmup_s:.0f} s, flow-matching loss "
            f"{first:.4f} -> {fit:.4f}")
    elif step:
        warmup_s = read_run_config(out).get("warmup_seconds", float("nan"))

    train_info = dict(now, recipe=describe_recipe(args), world_size=world)
    run_info = {"teacher": spec.to_dict(), "split": 0, "timesteps": [1], "sampling": sampling.to_dict(),
                "method": "csd", "train": train_info, "warmup_seconds": warmup_s}
    n_gen, n_guide = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (gen, guide))
    log(f"csd: {teacher.family} generator {n_gen:.2f}M params (output {output}"
        + (f", from {args.init_run}" if args.init_run else ", from the teacher") + f"), guidance {n_guide:.2f}M"
        + {"gts": " (from the same AR-diffusion init)", "csd": " (the init run's)"}.get(kind, "")
        + (f" (from the AR-diffusion init {args.guidance_init})" if args.guidance_init else "") + "; "
        f"K = {csd.guidance_steps}, tau {csd.tau_dist}, weight {csd.weight}; batch {args.batch_size} on {world} rank(s); "
        f"precision {precision}; {describe_recipe(args)}, guidance lr {args.guidance_lr:g}")

    def on_checkpoint(path: str, at: int) -> None:
        publish_checkpoint(out, path, gen.config, codebook, dict(run_info, step=at))

    os.makedirs(out, exist_ok=True)
    return run_training(
        args, precision, out=out, step=step, log=log, desc="dd csd train",
        model=gen, ema=ema, opt=opt, loss_fn=loss_fn, dataset=LabelStream(teacher.num_classes, args.seed),
        part_names=("guidance", "gap"), rank=rank, world=world, device=device,
        grad_sync="average",            # the logits head gets no gradient: DDP would wait for it
        checkpoint_weights=lambda: dict(student_checkpoint_weights(gen, ema),
                                        guidance=(guide.state_dict(), {"weights": "guidance"})),
        checkpoint_state={"train": train_info, "data_manifest_sha256": "none"},
        on_checkpoint=on_checkpoint)


# ---- CLI --------------------------------------------------------------------------------------
@click.group("csd")
def csd_group() -> None:
    """DD2: one-step generators by conditional score distillation (docs/dd2.md)."""


@csd_group.command("train")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--init-run", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start from this run: a `dd csd init` run (DD2's AR-diffusion init: both the generator, "
                   "x = noise - v(noise, tau = 1, shifted noise), and the guidance network), a `dd csd train` run "
                   "(its EMA generator and its guidance network: with --guidance-warmup, DD2's performance "
                   "alignment) or a DD-1 run (`dd train --timesteps 1`: the generator only, its embedding head). "
                   "Default: a fresh DD student of the teacher with the velocity output.")
@click.option("--guidance-init", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start the guidance network only from this `dd csd init` run (with a DD-1 or no --init-run).")
@click.option("--output", type=click.Choice(["embedding", "velocity"]), default=None,
              help="Generator parameterisation: x = head (embedding) or x = noise - head (velocity, DD2). "
                   "Default: embedding with a DD-1 --init-run, else velocity (an AR-diffusion init: its own).")
@click.option("--guidance-steps", default=5, show_default=True, type=click.IntRange(min=1),
              help="K guidance updates per generator update (DD2: 5).")
@click.option("--guidance-lr", default=1e-4, show_default=True, type=click.FloatRange(min=0.0, min_open=True))
@click.option("--guidance-warmup", default=100, show_default=True, type=click.IntRange(min=0),
              help="Guidance updates on the initial generator before the first generator update.")
@click.option("--head-width", default=256, show_default=True, type=click.IntRange(min=1),
              help="Hidden width of the guidance network's MLP head.")
@tau_options
@click.option("--weight", type=click.Choice(["denoiser", "unit"]), default="denoiser", show_default=True,
              help="ω(τ): denoiser = τ²/(1 − τ), unit = 1.")
@teacher_options
@loop_options(max_steps=2000)
def csd_train_command(out, init_run, guidance_init, output, guidance_steps, guidance_lr, guidance_warmup, head_width,
                      tau_dist, tau_min, tau_max, logit_mean, logit_std, weight, teacher_spec, sampling_overrides, no_progress,
                      **loop):
    """Train a one-step generator by CSD against a teacher (torchrun: several ranks).

    \b
      dd csd train --teacher digits-llamagen --out runs/csd --init-run runs/dd1 --max-steps 200
      dd sample --run runs/csd --out samples/csd --steps 1 [--snap]
    """
    try:
        CSDConfig(tau_dist=tau_dist, tau_min=tau_min, tau_max=tau_max, logit_mean=logit_mean, logit_std=logit_std,
                  weight=weight, guidance_steps=guidance_steps)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    args = CSDTrainArgs(out=out, teacher=teacher_spec.to_dict(), sampling=sampling_overrides, init_run=init_run,
                        guidance_init=guidance_init,
                        output=output, guidance_lr=guidance_lr, guidance_steps=guidance_steps,
                        guidance_warmup=guidance_warmup, head_width=head_width, tau_dist=tau_dist, tau_min=tau_min,
                        tau_max=tau_max, logit_mean=logit_mean, logit_std=logit_std, weight=weight,
                        progress=not no_progress, **loop)
    try:
        train_csd(args, log=click.echo)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e


from .gts_train import csd_init_command  # noqa: E402  (dd csd init: the AR-diffusion initialisation)
csd_group.add_command(csd_init_command)
