"""A DD student's run directory (written by `save_run` and by `dd train`, read by `load_run`;
`dd sample` needs nothing else), on the generic layout of `run_dir.py`:

    config.json            {"format": "dd-student", "student": StudentConfig, "teacher": TeacherSpec, ...}
    student.safetensors    backbone weights (EMA by default) in the released key layout
    student_raw.safetensors  the non-EMA weights (when an EMA exists)
    codebook.safetensors   {"codebook": [V, C] fp32} the teacher's codebook (l2-normalised for LlamaGen)
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

from .run_dir import (CONFIG_FILE, RAW_WEIGHTS_FILE, WEIGHTS_FILE, publish, read_run_config as _read_config,
                      write_run_config as _write_config)
from .fileio import save_state_dict
from .student import DDStudent, StudentConfig, build_backbone_loaded

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "RAW_WEIGHTS_FILE", "CODEBOOK_FILE", "save_run", "load_run",
           "write_run_config", "read_run_config"]

RUN_FORMAT = "dd-student"
RUN_FORMAT_VERSION = 1
CODEBOOK_FILE = "codebook.safetensors"


def save_run(run_dir: str, student: DDStudent, ema_state: Optional[dict], config: StudentConfig,
             extra: dict) -> None:
    """Write a self-contained run directory (see the module docstring).

    ema_state: the EMA backbone state dict (`ema.backbone.state_dict()`), saved as student.safetensors
    with the raw weights in student_raw.safetensors; None = the student's weights as student.safetensors.
    extra: JSON-able run information merged into config.json; "teacher" should be the TeacherSpec dict.
    """
    os.makedirs(run_dir, exist_ok=True)
    raw = student.backbone.state_dict()
    if ema_state is not None:
        save_state_dict(os.path.join(run_dir, WEIGHTS_FILE), ema_state, {"weights": "ema"})
        save_state_dict(os.path.join(run_dir, RAW_WEIGHTS_FILE), raw, {"weights": "raw"})
    else:
        save_state_dict(os.path.join(run_dir, WEIGHTS_FILE), raw, {"weights": "raw"})
    save_state_dict(os.path.join(run_dir, CODEBOOK_FILE), {"codebook": student.codebook.float()})
    write_run_config(run_dir, config, dict(extra, weights="ema" if ema_state is not None else "raw"))


def write_run_config(run_dir: str, config: StudentConfig, extra: dict) -> None:
    _write_config(run_dir, RUN_FORMAT, RUN_FORMAT_VERSION, dict(extra, student=config.to_dict()))


def student_checkpoint_weights(model: DDStudent, ema: DDStudent) -> dict:
    """What a student-format trainer checkpoints, {file stem: (state dict, metadata)}: the backbone's raw
    weights as model.safetensors and its EMA as ema.safetensors (the files `publish_checkpoint` links)."""
    return {"model": (model.backbone.state_dict(), {"weights": "raw"}),
            "ema": (ema.backbone.state_dict(), {"weights": "ema"})}


def publish_checkpoint(run_dir: str, ckpt: str, config: StudentConfig, codebook: torch.Tensor, info: dict) -> None:
    """Point a training run's student files at checkpoint `ckpt` (EMA as student.safetensors), write the
    codebook [V, C] once and config.json: what makes every trainer's run directory a `load_run` run."""
    publish(run_dir, ckpt)
    if not os.path.exists(os.path.join(run_dir, CODEBOOK_FILE)):
        save_state_dict(os.path.join(run_dir, CODEBOOK_FILE), {"codebook": codebook.float()})
    write_run_config(run_dir, config, dict(info, weights="ema"))


def read_run_config(run_dir: str) -> dict:
    return _read_config(run_dir, RUN_FORMAT, what="DD run")


def load_run(run_dir: str, device: Union[str, torch.device] = "cpu", ema: bool = True
             ) -> Tuple[DDStudent, dict]:
    """Rebuild the student of a run directory -> (student in eval mode, run_info).

    ema: the EMA weights (student.safetensors); False = the raw weights (student_raw.safetensors,
    or student.safetensors when the run has no EMA). run_info is config.json: "student" (the
    StudentConfig dict), "teacher" (the TeacherSpec dict), "split", "timesteps", "data", "train", ...
    """
    from teachers.checkpoint import load_safetensors as load_file
    info = read_run_config(run_dir)
    config = StudentConfig.from_dict(info["student"])
    name = WEIGHTS_FILE
    if not ema and os.path.exists(os.path.join(run_dir, RAW_WEIGHTS_FILE)):
        name = RAW_WEIGHTS_FILE
    # cloned: safetensors hands out views into one buffer at arbitrary alignment, and misaligned
    # weights take other SIMD paths (last-bit differences from the in-memory model)
    state = {k: v.clone() for k, v in load_file(os.path.join(run_dir, name)).items()}
    backbone = build_backbone_loaded(config, state, device=device, what=f"DD student of {run_dir}/{name}")
    codebook = load_file(os.path.join(run_dir, CODEBOOK_FILE))["codebook"].to(device)
    student = DDStudent(config, backbone, codebook).eval()
    return student, info
