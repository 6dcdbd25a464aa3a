"""Crash-safe file writes and checksums: a file is either absent/old or complete, never half written.

Every writer here goes through a temporary file in the same directory, fsyncs it, renames it into
place and fsyncs the directory, so a kill at any moment leaves only stale `*.tmp.<pid>` files behind.
"""
from __future__ import annotations

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


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete (tmp, fsync, rename)."""
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
    tmp = tmp_path(path)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def link_or_copy(src: str, dst: str) -> None:
    """Make dst the same bytes as src: a hard link when possible (no extra disk), else a copy;
    atomic either way."""
    tmp = tmp_path(dst)
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)
