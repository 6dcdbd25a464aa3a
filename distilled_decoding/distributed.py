"""torchrun process groups and the default device, for every stage that runs on several ranks.

Outside torchrun (WORLD_SIZE unset or 1) everything is a no-op with rank 0 of 1.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: Optional[str]) -> Optional[str]:
    """`device` if this machine has it (None / "auto" pass through), else ValueError saying why:
    a name torch does not know, or CUDA / MPS on a build or machine without it."""
    if device in (None, "auto"):
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{device!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{device!r}: no CUDA device here (torch {torch.__version__}, "
                             f"cuda.is_available() is False); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{device!r}: no MPS device here; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"{device!r}: dd runs on cpu, cuda or mps")
    return device


def device_option_check(ctx, param, value):
    """click callback of every --device option: refuse an unusable device before any work."""
    import click
    try:
        return check_device(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def torchrun_argv(nproc: int, args: Sequence) -> List[str]:
    """The command line of `dd ARGS` on `nproc` local ranks: torch's own launcher (what the `torchrun`
    script runs) on a free port (--standalone). `--` keeps the launcher's argparse off our options (it
    would read --run as its --run-path)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "distilled_decoding", "--", *map(str, args)]


def init_distributed(device: Optional[str]) -> tuple:
    """-> (rank, world, device, initialised_here). Joins the torchrun group when WORLD_SIZE > 1:
    nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU. device None = `default_device()`."""
    device = device or default_device()
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


def finish_distributed(initialised_here: bool) -> None:
    if initialised_here:
        torch.distributed.destroy_process_group()


def dist_info() -> tuple:
    """(rank, world) of the current process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def broadcast_object(obj, rank: int, world: int):
    """Rank 0's `obj` on every rank."""
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= world
    return values


def average_gradients(params, world: int) -> None:
    """Replace every existing .grad of `params` by its mean over the ranks (one flat all-reduce).

    What DDP does, for a model whose loss reaches it through methods other than forward or leaves some
    parameters without a gradient (DDP needs both to be otherwise): the DD2 networks. A parameter
    without a gradient is skipped, so every rank must leave the same ones without (a frozen backbone,
    an unused head: the same code path on every rank)."""
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
