"""Strict loading of official (and our own) checkpoints into our re-implementations.

Shared by every family and by the student loader:
- `read_state_dict` opens a file (or takes an in-memory dict), picks the inner dict by a list of
  nesting keys, and strips wrapper prefixes (`_orig_mod.`, `module.`).
- `load_strict` builds the model on the meta device (no init, no double memory), checks key names and
  shapes against the file, ignoring only an explicit list of stale keys, and assigns the tensors.
  A mismatch raises one `CheckpointMismatchError` naming missing/unexpected/mis-shaped keys and the
  config that was tried; nothing is left uninitialised.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

StateSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not match the model built from the given config."""


def _torch_load(path: str, weights_only: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError:
        # mmap needs the zipfile format; legacy files fall back to a plain read.
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def read_state_dict(source: StateSource, nesting: Sequence[str] = ("model", "module", "state_dict"),
                    weights_only: bool = True) -> dict:
    """Return a flat {key: tensor} from a checkpoint file or dict.

    nesting: keys tried in order to find the inner dict (e.g. ("ema",) for EMA weights, or dotted
    paths like "trainer.ema_parameters"); a dict without any of them is taken as bare.
    weights_only: safe unpickling (default). Pass False only for trusted legacy files whose pickle
    holds other objects (e.g. an argparse.Namespace under "args").
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj = load_file(path)
        else:
            try:
                obj = _torch_load(path, weights_only)
            except Exception as e:  # noqa: BLE001 - re-raised with the way out spelled out
                if weights_only:
                    raise RuntimeError(
                        f"could not load {path} with weights_only=True ({e.__class__.__name__}: {e}). "
                        "If you trust this file, load it with weights_only=False "
                        "(CLI: --unsafe-load).") from e
                raise
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint is a {type(obj).__name__}, expected a dict of tensors")
    inner = obj
    for key in nesting:
        node, ok = obj, True
        for part in key.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                ok = False
                break
        if ok and isinstance(node, Mapping):
            inner = node
            break
    out = {}
    for k, v in inner.items():
        if not isinstance(v, torch.Tensor):
            continue
        stripped = True
        while stripped:  # wrappers nest in any order (DDP around a compiled model, or the reverse)
            stripped = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p):], True
        out[k] = v
    if not out:
        raise CheckpointMismatchError(
            f"no tensors found in checkpoint (top-level keys: {sorted(obj)[:10]}; tried nesting {list(nesting)})")
    return out


def _short(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_keys(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor],
               ignore: Sequence[str] = (), what: str = "model") -> dict:
    """Drop ignorable keys from `state` and raise CheckpointMismatchError on any difference.

    expected: {key: shape} of the model; ignore: fnmatch patterns of stale keys to drop.
    Returns the filtered state.
    """
    state = {k: v for k, v in state.items() if not any(fnmatch.fnmatchcase(k, p) for p in ignore)}
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
              for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        lines = [f"checkpoint does not match {what}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:5])
                         + (f" ... (+{len(shapes) - 5} more)" if len(shapes) > 5 else ""))
        raise CheckpointMismatchError("\n".join(lines))
    return state


def load_strict(build: Callable[[], nn.Module], source: Optional[StateSource], *,
                ignore: Sequence[str] = (), nesting: Sequence[str] = ("model", "module", "state_dict"),
                device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                weights_only: bool = True, what: str = "model") -> nn.Module:
    """Build a model and load `source` strictly into it.

    build: zero-arg constructor. With `source=None` the model is built on `device` with its own
    random initialisation (tests, benchmarks). Otherwise it is built on the meta device and the
    checkpoint tensors are assigned (cast to `dtype` if floating), so a model loads in about its own
    size. Non-persistent buffers (RoPE tables, masks) are then rebuilt by each module's
    `reset_buffers()` (a method every model with derived buffers defines).
    what: the config description used in error messages.
    """
    device = torch.device(device)
    if source is None:
        with device:
            model = build()
        return model.to(dtype=dtype) if dtype is not None else model
    state = read_state_dict(source, nesting=nesting, weights_only=weights_only)
    with torch.device("meta"):
        model = build()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = check_keys(expected, state, ignore=ignore, what=what)
    model_sd = model.state_dict()
    cast = {}
    for k, v in state.items():
        target_dtype = dtype if (dtype is not None and v.is_floating_point()) else model_sd[k].dtype
        cast[k] = v.to(device=device, dtype=target_dtype)
    model.load_state_dict(cast, strict=True, assign=True)
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointMismatchError(f"{what}: tensors left uninitialised after loading: {_short(left)}")
    return model


def file_sha256(path: Union[str, os.PathLike], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def source_id(source: Optional[StateSource]) -> Optional[str]:
    """A short identity for manifests: the file's sha256 (first 16 hex), 'in-memory', or None."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        return file_sha256(source)[:16]
    return "in-memory"
