"""Crash-safe file writes and checksums: a file is either absent/old or complete, never half written.

Every writer here goes through a temporary file in the same directory, fsyncs it, renames it into
place and fsyncs the directory, so a kill at any moment leaves only stale `*.tmp.<pid>` files behind.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import Optional

from teachers.checkpoint import file_sha256  # noqa: F401  (the one file hash, re-exported for the stages)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path(path: str) -> str:
    """The temporary name `path` is written under before its rename."""
    return f"{path}.tmp.{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(path: str) -> None:
    """Remove `path.tmp.<pid>` files or folders left by killed writers (a pid that is no longer
    running; a live writer's temporary is left alone)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        pid = tmp.rsplit(".", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete (tmp, fsync, rename);
    stale temporaries of `path` from killed writers go first."""
    remove_stale_tmp(path)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def json_bytes(obj, sort_keys: bool = False, newline: bool = True) -> bytes:
    """The one JSON layout of our files (indent 1)."""
    return (json.dumps(obj, indent=1, sort_keys=sort_keys) + ("\n" if newline else "")).encode()


def atomic_json(path: str, obj, sort_keys: bool = True) -> None:
    atomic_write(path, json_bytes(obj, sort_keys=sort_keys, newline=False))


def normalise_json(obj):
    """JSON round trip, so tuples and lists (and int keys) compare equal."""
    return json.loads(json.dumps(obj))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_state_dict(path: str, state: dict, metadata: Optional[dict] = None) -> None:
    """Atomic safetensors write of {key: tensor} (contiguous CPU copies)."""
    from safetensors.torch import save_file
    remove_stale_tmp(path)
    tmp = tmp_path(path)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def link_or_copy(src: str, dst: str) -> None:
    """Make dst the same bytes as src: a hard link when possible (no extra disk), else a copy;
    atomic either way."""
    remove_stale_tmp(dst)
    tmp = tmp_path(dst)
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished folder `tmp` to `path` whole, replacing any folder there: a reader sees the
    old folder or the new one, never a half-written one (the old one is renamed aside, then removed)."""
    old = None
    if os.path.lexists(path):
        old = tmp_path(path + ".old")
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_outputs(outputs: dict, inputs: dict, overwrite: bool) -> None:
    """Refuse (DDError naming the option) an output path that is one of the inputs, or that exists
    unless `overwrite`. outputs / inputs: {option name: path or None}."""
    from .errors import DDError
    real = {opt: os.path.realpath(p) for opt, p in inputs.items() if p}
    for opt, p in outputs.items():
        if not p:
            continue
        for iopt, ip in real.items():
            if os.path.realpath(p) == ip:
                raise DDError(f"{opt} {p}: is the {iopt} input; refusing to overwrite it (choose another path)")
        if os.path.lexists(p) and not overwrite:
            raise DDError(f"{opt} {p}: exists; refusing to overwrite it (pass --overwrite, or choose another path)")
