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


class CheckpointFileError(RuntimeError):
    """A checkpoint file that cannot be read at all (truncated, empty, text, not a dict of tensors);
    the message names the file."""


def _torch_load(path: str, weights_only: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError:
        # mmap needs the zipfile format; legacy files fall back to a plain read.
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def load_safetensors(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> dict:
    """safetensors' load_file, whose errors (truncated, empty, not safetensors) name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = os.fspath(path)
    try:
        return load_file(path, device=str(device))
    except SafetensorError as e:
        raise CheckpointFileError(f"{path}: not a readable safetensors file ({e})") from e


def read_state_dict(source: StateSource, nesting: Sequence[str] = ("model", "module", "state_dict"),
                    weights_only: bool = True, unsafe_hint: Optional[str] = "--unsafe-load") -> dict:
    """Return a flat {key: tensor} from a checkpoint file or dict.

    nesting: keys tried in order to find the inner dict (e.g. ("ema",) for EMA weights, or dotted
    paths like "trainer.ema_parameters"); a dict without any of them is taken as bare.
    weights_only: safe unpickling (default). Pass False only for trusted legacy files whose pickle
    holds other objects (e.g. an argparse.Namespace under "args").
    unsafe_hint: the CLI option that passes weights_only=False, named in the error when a file does
    not unpickle safely; None where no such option exists (the file is then just unreadable).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if os.path.getsize(path) == 0:
            raise CheckpointFileError(f"{path}: empty file, not a checkpoint")
        if path.endswith(".safetensors"):
            obj = load_safetensors(path)
        else:
            try:
                obj = _torch_load(path, weights_only)
            except Exception as e:  # noqa: BLE001 - re-raised naming the file (and the way out)
                first = (str(e).splitlines() or [""])[0]
                why = f"{path}: not a readable checkpoint ({e.__class__.__name__}: {first})"
                if weights_only and unsafe_hint and "weights_only" in str(e):
                    why += (f"; if you trust this file, load it with weights_only=False ({unsafe_hint})")
                raise CheckpointFileError(why) from e
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise CheckpointFileError(f"{source if isinstance(source, (str, os.PathLike)) else 'checkpoint'} holds a "
                                  f"{type(obj).__name__}, expected a dict of tensors")
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
            f"no tensors found in {source if isinstance(source, (str, os.PathLike)) else 'checkpoint'} (top-level keys: {sorted(obj)[:10]}; tried nesting {list(nesting)})")
    return out


def _short(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointFileError naming the tensors of `state` that hold NaN or inf (a diverged run's
    weights would otherwise fail much later, e.g. as all-zero probabilities or black images)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointFileError(f"{where}: {len(bad)} tensor(s) hold NaN/inf: {_short(bad, 4)}")


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
                weights_only: bool = True, what: str = "model",
                unsafe_hint: Optional[str] = "--unsafe-load") -> nn.Module:
    """Build a model and load `source` strictly into it.

    build: zero-arg constructor. With `source=None` the model is built on `device` with its own
    random initialisation (tests, benchmarks). Otherwise it is built on the meta device and the
    checkpoint tensors are assigned (cast to `dtype` if floating), so a model loads in about its own
    size. Non-persistent buffers (RoPE tables, masks) are then rebuilt by each module's
    `reset_buffers()` (a method every model with derived buffers defines).
    what: the config description used in error messages; unsafe_hint: see `read_state_dict`.
    """
    device = torch.device(device)
    if source is None:
        with device:
            model = build()
        return model.to(dtype=dtype) if dtype is not None else model
    state = read_state_dict(source, nesting=nesting, weights_only=weights_only, unsafe_hint=unsafe_hint)
    with torch.device("meta"):
        model = build()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    try:
        state = check_keys(expected, state, ignore=ignore, what=what)
    except CheckpointMismatchError as e:
        if isinstance(source, (str, os.PathLike)):
            raise CheckpointMismatchError(f"{os.fspath(source)}: {e}") from None
        raise
    check_finite(state, os.fspath(source) if isinstance(source, (str, os.PathLike)) else what)
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
