"""`dd ard sample`'s samplers: an ARD student's S-step sampler and the teacher's DDIM-N baseline, as plans
that `sample_store.build_samples` runs on the shard store (resume, torchrun ranks, samples.npz in ADM
format, grid.png, timing.json; the same outputs as `dd sample`).

Noise and labels are those of (seed, global sample index) (`trajectories.trajectory_noise`,
`seeding.make_labels`), so at one seed the student, the teacher's DDIM-25 and its DDIM-S all start
from the same x_T: the table's "MSE to the teacher's endpoint" compares samples index by index.
Diffusion samples have no tokens: the store's `tokens` are [N, 0].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .fileio import file_sha256, normalise_json
from .run_dir import WEIGHTS_FILE
from .trajectories import trajectory_noise

SAMPLERS = ("ard", "ddim")


@dataclass
class DiffusionPlan:
    """What one sample run draws. kind "ard": `student` (an ARDStudent) from the noise in S steps;
    "ddim": the teacher's DDIM (η = 0) with `steps` steps at `cfg_scale` on `cfg_channels`."""

    kind: str
    teacher: object
    student: Optional[torch.nn.Module] = None
    steps: int = 25
    cfg_scale: float = 1.5
    cfg_channels: Optional[int] = None

    def __post_init__(self):
        if self.kind not in SAMPLERS:
            raise ValueError(f"sampler {self.kind!r}: choose from {SAMPLERS}")
        if self.kind == "ard":
            if self.student is None:
                raise ValueError("an ARD plan needs a student")
            self.steps = int(self.student.config.num_steps)

    def describe(self) -> str:
        if self.kind == "ard":
            c = self.student.config
            return f"ARD {c.num_steps}-step ({c.mask}, N={c.lower_layers})"
        return f"teacher DDIM-{self.steps} (cfg {self.cfg_scale:g})"

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """noise x_T [B, C, H, W], labels [B] -> x_0 [B, C, H, W] fp32."""
        if self.kind == "ard":
            from .ard_student import ard_sample
            dtype = next(self.student.parameters()).dtype
            return ard_sample(self.student, noise.to(dtype), labels)[:, -1].float()
        return self.teacher.sample(labels, steps=self.steps, cfg_scale=self.cfg_scale, noise=noise,
                                   cfg_channels=self.cfg_channels)

    def run(self, seed: int, idx, labels: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The `samplers.SamplePlan.run` signature of `build_samples`: -> (x_0, tokens [B, 0])."""
        noise = trajectory_noise(seed, idx, self.teacher.latent_shape).to(device)
        x0 = self.sample(noise, labels.to(device))
        return x0, torch.zeros(len(idx), 0, dtype=torch.int16)


def sample_settings(plan: DiffusionPlan, *, seed: int, labels: str, shard_size: int, run: Optional[str]) -> dict:
    """What decides the samples (the sample store compares them on resume)."""
    t = plan.teacher
    ard = plan.student.config.to_dict() if plan.kind == "ard" else None
    return normalise_json({
        "sampler": plan.kind, "describe": plan.describe(), "teacher": t.describe(),
        "steps": int(plan.steps), "cfg_scale": float(plan.cfg_scale) if plan.kind == "ddim" else None,
        "cfg_channels": plan.cfg_channels if plan.kind == "ddim" else None, "ard": ard,
        "run": os.path.abspath(run) if run else None,
        "student_sha256": file_sha256(os.path.join(run, WEIGHTS_FILE)) if plan.kind == "ard" else None,
        "seed": int(seed), "labels": labels, "num_classes": int(t.num_classes), "shard_size": int(shard_size),
        "image_shape": [int(t.image_size), int(t.image_size), 3], "num_tokens": 0, "token_dtype": "int16",
    })


def run_teacher_spec(run: str) -> Tuple[dict, Optional[dict]]:
    """(TeacherSpec dict, trajectory-set settings or None) of an ARD run directory (`dd ard train`)."""
    from .ard_train import read_ard_run_config
    info = read_ard_run_config(run)
    data = info.get("data") if isinstance(info.get("data"), dict) else {}
    return info["teacher"], data.get("settings")


def make_plan(run, baseline, data, cfg_scale, device):
    """The `DiffusionPlan` of `dd ard sample`'s options (ValueError naming the option at fault)."""
    from .teacher_spec import TeacherSpec
    from .trajectories import read_manifest, resolve_cfg_channels
    settings, student = None, None
    if data is not None:
        m = read_manifest(data)
        spec, settings = m["teacher_spec"], m["settings"]
    else:
        spec, settings = run_teacher_spec(run)
    teacher = TeacherSpec.from_dict(spec).load(device, diffusion=True)
    if baseline is None:
        from .ard_train import load_ard_run
        student = load_ard_run(run, device).eval()
        return DiffusionPlan("ard", teacher, student)
    if baseline == "teacher":
        steps = (settings or {}).get("steps", teacher.default_steps)
    elif baseline.startswith("ddim-") and baseline[5:].isdigit() and int(baseline[5:]) >= 1:
        steps = int(baseline[5:])
    else:
        raise ValueError(f"--baseline {baseline!r}: ddim-N (N >= 1 DDIM steps) or teacher")
    cfg = cfg_scale if cfg_scale is not None else (settings or {}).get("cfg_scale", teacher.default_cfg_scale)
    channels = (settings or {}).get("cfg_channels", resolve_cfg_channels(teacher, "default"))
    return DiffusionPlan("ddim", teacher, steps=steps, cfg_scale=cfg, cfg_channels=channels)
