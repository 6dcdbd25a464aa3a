"""A training run's directory on disk: its config.json, published weight files, checkpoints and
metrics, for any method (what the files hold is the method's business).

    config.json                                     write_run_config / read_run_config (format-tagged)
    student.safetensors, student_raw.safetensors    the latest checkpoint's EMA and raw weights (publish)
    checkpoints/step-XXXXXXXX/<name>.safetensors, optimizer.pt, state.json   save_checkpoint
    metrics.jsonl                                   one JSON record per logged step

A checkpoint directory is written under a temporary name and renamed into place, with state.json
written last, so only complete checkpoints are ever listed.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Dict, Optional, Tuple

import torch

from .errors import DDError
from .fileio import atomic_json, link_or_copy, pid_alive, save_state_dict

CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
WEIGHTS_FILE = "student.safetensors"          # the EMA weights, what sampling loads
RAW_WEIGHTS_FILE = "student_raw.safetensors"


# ---- config.json -------------------------------------------------------------------------------
def write_run_config(run_dir: str, fmt: str, version: int, info: dict) -> None:
    """config.json = info + {"format": fmt, "format_version": version} (atomic)."""
    info = dict(info)
    info.update({"format": fmt, "format_version": version})
    atomic_json(os.path.join(run_dir, CONFIG_FILE), info)


def read_run_config(run_dir: str, fmt: str, what: str = "run") -> dict:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a {what} directory (no {CONFIG_FILE})")
    with open(path) as f:
        info = json.load(f)
    if info.get("format") != fmt:
        raise ValueError(f"{path}: format {info.get('format')!r}, expected {fmt!r}")
    return info


def claim_run_dir(out: str, *, resume: bool, overwrite: bool, remove: bool = True) -> None:
    """A fresh run never writes into a directory that holds anything (DDError naming --out), unless
    `resume` (continue it) or `overwrite` (replace it: only a run directory - config.json,
    checkpoints/ or metrics.jsonl - is removed, with everything in it, when `remove`, i.e. on rank 0)."""
    if resume or not os.path.isdir(out) or not os.listdir(out):
        return
    if not overwrite:
        raise DDError(f"--out {out}: exists and is not empty (an earlier run?); pass --resume to continue it, "
                      "--overwrite to replace it, or use another --out")
    if not set(os.listdir(out)) & {CONFIG_FILE, CKPT_DIR, METRICS_FILE}:
        raise DDError(f"--out {out}: is not a run directory (no {CONFIG_FILE}, {CKPT_DIR}/ or {METRICS_FILE}); "
                      "--overwrite only replaces runs")
    if remove:
        shutil.rmtree(out)


# ---- checkpoints -------------------------------------------------------------------------------
def checkpoint_dirs(out: str) -> list:
    """Complete checkpoint directories (state.json written last), oldest first."""
    dirs = [d for d in glob.glob(os.path.join(out, CKPT_DIR, "step-*"))
            if os.path.exists(os.path.join(d, STATE_FILE))]
    return sorted(dirs)


def latest_checkpoint(out: str) -> Optional[str]:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def save_checkpoint(out: str, step: int, weights: Dict[str, Tuple[dict, dict]], optimizer_state: dict,
                    state: dict, keep: int, other_optimizers: Optional[Dict[str, dict]] = None) -> str:
    """Write checkpoints/step-XXXXXXXX atomically (a temporary directory renamed into place) and keep
    the newest `keep`. weights: {file stem: (state dict, safetensors metadata)}; other_optimizers:
    {name: state dict} of a second model's optimizers (a discriminator's), kept in optimizer.pt beside
    the main one (under "optimizer")."""
    root = os.path.join(out, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in glob.glob(os.path.join(root, ".tmp-step-*-*")):     # left by killed runs
        pid = stale.rsplit("-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)
    for stem, (sd, meta) in weights.items():
        save_state_dict(os.path.join(tmp, f"{stem}.safetensors"), sd, meta)
    if "optimizer" in (other_optimizers or {}):
        raise ValueError("other_optimizers: the name 'optimizer' is the main optimizer's")
    torch.save({"optimizer": optimizer_state, **(other_optimizers or {})}, os.path.join(tmp, OPTIMIZER_FILE))
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(dict(state, step=step), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, stems, device) -> Tuple[Dict[str, dict], dict, dict]:
    """-> ({stem: state dict on `device`}, {name: optimizer state dict} ("optimizer" the main one,
    then save_checkpoint's other_optimizers), state.json). A file that does not read back whole
    (truncated, corrupt) raises CheckpointFileError naming it."""
    from teachers.checkpoint import CheckpointFileError, check_finite, load_safetensors
    weights = {}
    for s in stems:
        file = os.path.join(path, f"{s}.safetensors")
        weights[s] = load_safetensors(file, device)
        check_finite(weights[s], file)

    def read(file, reader):
        try:
            return reader(file)
        except Exception as e:  # noqa: BLE001 - any unreadable file of the checkpoint is named
            raise CheckpointFileError(f"{file}: not readable ({e.__class__.__name__}: "
                                      f"{(str(e).splitlines() or [''])[0]})") from e

    def optimizers(file):
        states = dict(torch.load(file, map_location=device, weights_only=True))
        states["optimizer"]         # noqa: B018 - a file without the main state is damaged
        return states

    opt = read(os.path.join(path, OPTIMIZER_FILE), optimizers)
    state = read(os.path.join(path, STATE_FILE), lambda f: json.loads(open(f).read()))
    return weights, opt, state


def publish(out: str, ckpt: str) -> None:
    """Point the run directory's weight files at checkpoint `ckpt`'s (saved under the stems "ema" and
    "model", as every method's train_loop checkpoint is)."""
    for src, dst in (("ema.safetensors", WEIGHTS_FILE), ("model.safetensors", RAW_WEIGHTS_FILE)):
        link_or_copy(os.path.join(ckpt, src), os.path.join(out, dst))


# ---- metrics.jsonl ------------------------------------------------------------------------------
def append_metrics(out: str, record: dict) -> None:
    with open(os.path.join(out, METRICS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out: str, step: int) -> None:
    """Drop records after `step` (a resumed run rewrites them)."""
    path = os.path.join(out, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)
