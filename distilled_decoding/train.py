"""`dd train`: distil a teacher into a DD student from a (noise, tokens) pair data set.

    dd train --data pairs/ --out runs/llamagen-b-dd [--timesteps 1,81] [--batch-size 64] ...
    torchrun --nproc_per_node=8 -m distilled_decoding train --data pairs/ --out runs/x ...

One step: each sample of the global batch gets a training timestep t (uniform over `--timesteps`);
X_t = make_xt(codebook[tokens], noise, t) (the first t − 1 AR steps data, the rest the pair's noise);
the loss on the noise positions is λ_ce·CE(logits, tokens) + λ_emb·d(emb, codebook[tokens]) with d
the MSE in embedding space (`--emb-loss mse`) or LPIPS between images decoded by the teacher's VQ
decoder (`--emb-loss lpips`: the sequence with the student's embeddings on the noise positions vs the
target sequence). Per-sample means, then the batch mean.

Determinism. The data order is `DistributedSampler(shuffle, seed, drop_last)` per epoch, and the
timestep of a sample depends only on (seed, epoch, dataset position). Global batch j of an epoch is
the same set of pairs for any number of ranks and any accumulation (`--grad-accum`), so runs on 1
and K ranks see the same batches and timesteps; and `--resume` restarts the stream at the exact
micro-batch, so the next losses are the ones an uninterrupted run would have logged.

Run directory (`--out`):

    config.json, student.safetensors, student_raw.safetensors, codebook.safetensors   (student.save_run)
    checkpoints/step-XXXXXXXX/{model,ema}.safetensors, optimizer.pt, state.json    (every --ckpt-every)
    metrics.jsonl                                                                  (every --log-every)
    curves.png     loss terms vs step (plots.update_curves: every 10 log lines, at checkpoints)

student.safetensors / student_raw.safetensors are hard links to the latest checkpoint's ema / model
files (copies where links are impossible).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import hashlib
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import click
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import plots
from .dataset import PairDataset
from .student import (DDStudent, build_student, dd_loss, link_or_copy, mse_emb_loss, save_state_dict,
                      write_run_config, CODEBOOK_FILE, RAW_WEIGHTS_FILE, WEIGHTS_FILE)

CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
# Arguments that define the stream of batches, timesteps and updates: a resume must keep them.
STREAM_ARGS = ("batch_size", "grad_accum", "seed", "timesteps", "lambda_ce", "lambda_emb", "emb_loss",
               "lpips_net", "lr", "weight_decay", "ema_decay", "grad_clip", "precision")


@dataclass
class TrainArgs:
    """`dd train` options (see the CLI help). timesteps / split None = the family's paper defaults
    scaled to the teacher (`student.default_schedule`); precision None = bf16 on CUDA with bf16
    support, else fp32; device None = cuda when available."""

    data: str
    out: str
    timesteps: Optional[tuple] = None
    split: Optional[int] = None
    lambda_ce: float = 0.1
    lambda_emb: float = 1.0
    emb_loss: str = "mse"
    lpips_net: str = "vgg"
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
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
    progress: bool = True
    checkpoint: Optional[str] = None             # teacher transformer checkpoint override
    tokenizer_checkpoint: Optional[str] = None   # teacher tokenizer checkpoint override
    student_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["timesteps"] is not None:
            d["timesteps"] = list(d["timesteps"])
        return d


# ---- distributed ------------------------------------------------------------------------------
def init_distributed(device: Optional[str]) -> tuple:
    """-> (rank, world, device, initialised_here). Joins the torchrun group when WORLD_SIZE > 1:
    nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    own = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        own = True
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device, own


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= world
    return values


# ---- the batch stream -------------------------------------------------------------------------
def _mix64(x: int) -> int:
    """splitmix64 finaliser."""
    x &= (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return x ^ (x >> 31)


def sample_timestep(timesteps: Sequence[int], seed: int, epoch: int, position: int) -> int:
    """The training timestep of dataset item `position` in `epoch` (uniform over `timesteps`)."""
    h = _mix64(_mix64(_mix64(seed + 0x9E3779B97F4A7C15) + epoch) + position)
    return int(timesteps[h % len(timesteps)])


class WithTimesteps(Dataset):
    """Items keyed by (epoch, position): the PairDataset item plus its timestep "t"."""

    def __init__(self, pairs: Dataset, timesteps: Sequence[int], seed: int):
        self.pairs, self.timesteps, self.seed = pairs, tuple(timesteps), seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> dict:
        epoch, i = key
        item = dict(self.pairs[i])
        item["t"] = torch.tensor(sample_timestep(self.timesteps, self.seed, epoch, i), dtype=torch.long)
        return item


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
            raise ValueError(f"{num_items} pairs are fewer than one batch ({micro_batch} per rank x {world} ranks)")

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


# ---- embedding losses -------------------------------------------------------------------------
class LPIPSEmbLoss:
    """d(pred, target) = LPIPS between the images the teacher's VQ decoder makes of the full sequence
    (the student's embeddings on the noise positions, the target rows elsewhere) and of the target."""

    def __init__(self, teacher, net: str = "vgg"):
        try:
            import lpips  # noqa: PLC0415 - optional dependency
        except ImportError as e:
            raise click.ClickException(
                "--emb-loss lpips needs the `lpips` package, which needs torchvision: "
                "pip install -e '.[lpips]' (or use --emb-loss mse)") from e
        self.teacher = teacher
        self.fn = lpips.LPIPS(net=net, verbose=False).to(teacher.device).eval().requires_grad_(False)
        self.name = f"lpips ({net}) on images decoded by the teacher's VQ decoder"

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        full = torch.where(mask[..., None], pred, target)                       # [B, n, C]
        img = self.teacher.decode_differentiable(full)                          # [B, 3, H, W] in [-1, 1]
        with torch.no_grad():
            ref = self.teacher.decode_differentiable(target)
        return self.fn(img, ref).reshape(-1)                                    # [B]


def make_emb_loss(kind: str, teacher, net: str = "vgg"):
    """-> (callable(pred, target, mask) -> [B], description)."""
    if kind == "mse":
        return mse_emb_loss, "mse in embedding space"
    if kind == "lpips":
        f = LPIPSEmbLoss(teacher, net)
        return f, f.name
    raise ValueError(f"unknown --emb-loss {kind!r} (mse | lpips)")


# ---- EMA, checkpoints -------------------------------------------------------------------------
@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay·ema + (1 − decay)·model over parameters (DiT's update_ema); buffers are copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def _ckpt_dirs(out: str) -> list:
    """Complete checkpoint directories (state.json written last), oldest first."""
    dirs = [d for d in glob.glob(os.path.join(out, CKPT_DIR, "step-*"))
            if os.path.exists(os.path.join(d, "state.json"))]
    return sorted(dirs)


def latest_checkpoint(out: str) -> Optional[str]:
    dirs = _ckpt_dirs(out)
    return dirs[-1] if dirs else None


def save_checkpoint(out: str, step: int, student: DDStudent, ema: DDStudent, opt: torch.optim.Optimizer,
                    state: dict, keep: int) -> str:
    """Write checkpoints/step-XXXXXXXX atomically (a temporary directory renamed into place)."""
    root = os.path.join(out, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_state_dict(os.path.join(tmp, "model.safetensors"), student.backbone.state_dict(), {"weights": "raw"})
    save_state_dict(os.path.join(tmp, "ema.safetensors"), ema.backbone.state_dict(), {"weights": "ema"})
    torch.save({"optimizer": opt.state_dict()}, os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(dict(state, step=step), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _ckpt_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, student: DDStudent, ema: DDStudent, opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file
    dev = student.codebook.device
    student.backbone.load_state_dict(load_file(os.path.join(path, "model.safetensors"), device=str(dev)), strict=True)
    ema.backbone.load_state_dict(load_file(os.path.join(path, "ema.safetensors"), device=str(dev)), strict=True)
    opt.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=dev, weights_only=True)["optimizer"])
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- training ---------------------------------------------------------------------------------
def resolve_precision(precision: Optional[str], device: str) -> str:
    if precision is None:
        return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return precision


def train(args: TrainArgs, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) a DD student; collective under torchrun. Returns the last metrics record."""
    rank, world, device, own_pg = init_distributed(args.device)
    try:
        last = _train(args, rank, world, device, log if rank == 0 else (lambda s: None))
        _barrier(world)
        return last
    finally:
        if own_pg:
            torch.distributed.destroy_process_group()


def _train(args: TrainArgs, rank: int, world: int, device: str, log: Callable[[str], None]) -> dict:
    if args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by ranks x grad-accum "
                         f"= {world} x {args.grad_accum}")
    micro = args.batch_size // (world * args.grad_accum)
    precision = resolve_precision(args.precision, device)
    dev_type = torch.device(device).type
    out = args.out
    torch.manual_seed(args.seed * world + rank)

    # -- data and teacher --
    pairs = PairDataset(args.data)
    spec = pairs.teacher_spec
    overrides = {k: os.path.abspath(v) for k, v in (("checkpoint", args.checkpoint),
                                                    ("tokenizer_checkpoint", args.tokenizer_checkpoint)) if v}
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    teacher = spec.load(device)
    if (pairs.num_tokens, pairs.embed_dim) != (teacher.num_tokens, teacher.embed_dim):
        raise ValueError(f"data set pairs are [{pairs.num_tokens}, {pairs.embed_dim}], the teacher makes "
                         f"[{teacher.num_tokens}, {teacher.embed_dim}]")

    # -- student, EMA, optimizer --
    student = build_student(teacher, args.timesteps, args.split, seed=args.seed, **args.student_options)
    cfg = student.config
    student.train()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    update_ema(ema, student, 0.0)                                   # synced at decay 0 (DiT)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)

    # -- resume --
    manifest_sha = _sha256_file(os.path.join(args.data, "manifest.json"))
    step = 0
    ckpt = latest_checkpoint(out)
    if args.resume:
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(out, CKPT_DIR)}")
        state = load_checkpoint(ckpt, student, ema, opt)
        old = state.get("train", {})
        now = dict(args.to_dict(), timesteps=list(cfg.timesteps), precision=precision)
        diffs = [(k, old.get(k), now[k]) for k in STREAM_ARGS if old.get(k) != now[k]]
        if state.get("data_manifest_sha256") != manifest_sha:
            diffs.append(("data (manifest.json sha256)", state.get("data_manifest_sha256"), manifest_sha))
        if diffs:
            raise ValueError("--resume with other settings than the run's: "
                             + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs))
        step = int(state["step"])
        log(f"resumed from {ckpt} at step {step}")
    elif ckpt is not None:
        raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue it, or use another --out")

    if getattr(student.backbone, "init_notes", None) and not args.resume:
        log(f"init: {student.backbone.init_notes}")
    emb_loss, emb_desc = make_emb_loss(args.emb_loss, teacher, args.lpips_net)
    del teacher                     # only the LPIPS loss keeps it (for its VQ decoder)
    run_info = {
        "teacher": spec.to_dict(), "split": cfg.split, "timesteps": list(cfg.timesteps),
        "data": {"dir": os.path.abspath(args.data), "manifest_sha256": manifest_sha,
                 "num_samples": len(pairs), "settings": pairs.settings},
        "train": dict(args.to_dict(), timesteps=list(cfg.timesteps), split=cfg.split, precision=precision,
                      world_size=world, micro_batch=micro, emb_loss_desc=emb_desc),
    }
    log(f"student: {cfg.family}, {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params; "
        f"timesteps {cfg.timesteps}, split {cfg.split}; {len(pairs)} pairs; batch {args.batch_size} "
        f"= {world} rank(s) x {args.grad_accum} accum x {micro}; precision {precision}; embedding loss: {emb_desc}")

    # -- loader --
    batches = MicroBatches(len(pairs), world, rank, micro, args.seed, start=step * args.grad_accum)
    loader = DataLoader(WithTimesteps(pairs, cfg.timesteps, args.seed), batch_sampler=batches,
                        num_workers=args.num_workers, pin_memory=dev_type == "cuda",
                        persistent_workers=args.num_workers > 0)
    model = student
    if world > 1:
        # buffers (codebook, RoPE table, masks) never change: no per-forward broadcast
        ddp = torch.nn.parallel.DistributedDataParallel
        no_sync_kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
        model = ddp(student, device_ids=[torch.device(device).index] if dev_type == "cuda" else None, **no_sync_kw)
    codebook = student.codebook
    offsets = student.step_offsets
    autocast = (lambda: torch.autocast(device_type=dev_type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext

    metrics_path = os.path.join(out, METRICS_FILE)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        _truncate_metrics(metrics_path, step)
    bar = None
    if rank == 0 and args.progress and step < args.max_steps:
        from tqdm.auto import tqdm
        bar = tqdm(total=args.max_steps, initial=step, desc="dd train", dynamic_ncols=True)

    it = iter(loader)
    last = {}
    t_log, n_log = time.perf_counter(), 0
    sums = torch.zeros(3, device=device, dtype=torch.float64)      # loss, ce, emb over the log window
    try:
        while step < args.max_steps:
            step_sums = torch.zeros(3, device=device, dtype=torch.float64)
            for k in range(args.grad_accum):
                batch = next(it)
                noise = batch["noise"].to(device, non_blocking=True).float()
                tokens = batch["tokens"].to(device, non_blocking=True).long()
                labels = batch["label"].to(device, non_blocking=True).long()
                t = batch["t"].to(device, non_blocking=True).long()
                sync = k == args.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
                    loss, parts = dd_loss(model, noise, tokens, labels, t, codebook=codebook, step_offsets=offsets,
                                          lambda_ce=args.lambda_ce, lambda_emb=args.lambda_emb, emb_loss=emb_loss)
                (loss / args.grad_accum).backward()
                step_sums += torch.stack([loss.detach().double(), parts["ce"].mean().double(),
                                          parts["emb"].mean().double()]) / args.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, student, args.ema_decay)
            step += 1
            step_sums = _mean_over_ranks(step_sums, world)
            sums += step_sums
            n_log += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_sums[0].item():.4f}")
            if step % args.log_every == 0 or step == args.max_steps:
                now = time.perf_counter()
                avg = (sums / n_log).tolist()
                last = {"step": step, "loss": avg[0], "ce": avg[1], "emb": avg[2],
                        "grad_norm": float(grad_norm), "lr": args.lr,
                        "it_per_s": n_log / max(now - t_log, 1e-9),
                        "samples_per_s": n_log * args.batch_size / max(now - t_log, 1e-9)}
                if rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    plots.update_curves(out, metrics_path, step, args.log_every, args.ckpt_every, args.max_steps, log)
                sums.zero_()
                t_log, n_log = now, 0
            if step % args.ckpt_every == 0 or step == args.max_steps:
                if rank == 0:
                    path = save_checkpoint(out, step, student, ema, opt,
                                           {"train": run_info["train"], "metrics": last,
                                            "data_manifest_sha256": manifest_sha}, args.keep_checkpoints)
                    _publish(out, path, student, cfg, dict(run_info, step=step))
                _barrier(world)
    finally:
        if bar is not None:
            bar.close()
    log(f"done: {step} steps; student in {out}")
    return last


def _publish(out: str, ckpt: str, student: DDStudent, cfg, info: dict) -> None:
    """Point the run directory's student files at checkpoint `ckpt` (EMA as student.safetensors)."""
    link_or_copy(os.path.join(ckpt, "ema.safetensors"), os.path.join(out, WEIGHTS_FILE))
    link_or_copy(os.path.join(ckpt, "model.safetensors"), os.path.join(out, RAW_WEIGHTS_FILE))
    if not os.path.exists(os.path.join(out, CODEBOOK_FILE)):
        save_state_dict(os.path.join(out, CODEBOOK_FILE), {"codebook": student.codebook.float()})
    write_run_config(out, cfg, dict(info, weights="ema"))


def _truncate_metrics(path: str, step: int) -> None:
    """Drop records after `step` (a resumed run rewrites them)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


# ---- CLI --------------------------------------------------------------------------------------
def _parse_timesteps(ctx, param, value):
    if value is None:
        return None
    try:
        ts = tuple(sorted({int(v) for v in value.replace(" ", "").split(",") if v}))
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from e
    if not ts or ts[0] < 1:
        raise click.BadParameter("timesteps are 1-indexed AR steps (1 = pure noise)")
    return ts


@click.command("train")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Pair data set (dd build-dataset).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--timesteps", default=None, callback=_parse_timesteps,
              help="Training timesteps, paper notation (1 = pure noise), e.g. 1,81. "
                   "Default: LlamaGen 1,81; VAR 1,6 (d20/d24 1,5); scaled for teachers with other step counts.")
@click.option("--split", type=int, default=None,
              help="AR steps < split use the logits head when sampling (recorded in the run). "
                   "Default: LlamaGen-B 80, -L 130; VAR 5 (d20/d24 4); scaled likewise.")
@click.option("--lambda-ce", default=0.1, show_default=True, type=float, help="Weight of the cross-entropy loss.")
@click.option("--lambda-emb", default=1.0, show_default=True, type=float, help="Weight of the embedding loss.")
@click.option("--emb-loss", type=click.Choice(["mse", "lpips"]), default="mse", show_default=True,
              help="mse: in embedding space; lpips: on images decoded by the teacher's VQ decoder (needs lpips).")
@click.option("--lpips-net", type=click.Choice(["vgg", "alex", "squeeze"]), default="vgg", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Global batch size.")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1), help="Gradient accumulation steps.")
@click.option("--lr", default=1e-4, show_default=True, type=float)
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--ema-decay", default=0.9999, show_default=True, type=float)
@click.option("--grad-clip", default=1.0, show_default=True, type=float)
@click.option("--max-steps", default=100_000, show_default=True, type=click.IntRange(min=1))
@click.option("--ckpt-every", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--keep-checkpoints", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--num-workers", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="bf16 autocast or fp32. Default: bf16 on CUDA with bf16 support, else fp32.")
@click.option("--device", default=None, help="cpu, cuda ... Default: cuda when available.")
@click.option("--resume", is_flag=True, default=False, help="Continue from the latest checkpoint in --out.")
@click.option("--checkpoint", "teacher_checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher transformer checkpoint, if not where the data set's manifest says.")
@click.option("--tokenizer-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher tokenizer checkpoint, if not where the data set's manifest says.")
@click.option("--no-progress", is_flag=True, default=False)
def train_command(data, out, timesteps, split, lambda_ce, lambda_emb, emb_loss, lpips_net, batch_size, grad_accum,
                  lr, weight_decay, ema_decay, grad_clip, max_steps, ckpt_every, keep_checkpoints, log_every,
                  num_workers, seed, precision, device, resume, teacher_checkpoint, tokenizer_checkpoint, no_progress):
    """Train a DD student on a pair data set (multi-process under torchrun)."""
    args = TrainArgs(data=data, out=out, timesteps=timesteps, split=split, lambda_ce=lambda_ce,
                     lambda_emb=lambda_emb, emb_loss=emb_loss, lpips_net=lpips_net, batch_size=batch_size,
                     grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, ema_decay=ema_decay,
                     grad_clip=grad_clip, max_steps=max_steps, ckpt_every=ckpt_every,
                     keep_checkpoints=keep_checkpoints, log_every=log_every, num_workers=num_workers, seed=seed,
                     precision=precision, device=device, resume=resume, progress=not no_progress,
                     checkpoint=teacher_checkpoint, tokenizer_checkpoint=tokenizer_checkpoint)
    try:
        train(args, log=click.echo)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e
