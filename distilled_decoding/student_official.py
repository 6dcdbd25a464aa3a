"""The released DD checkpoints (microsoft/distilled_decoding) loaded strictly as `DDStudent`s: the
one place that meets the authors' files (their key nesting and the paper's default schedules)."""
from __future__ import annotations

from typing import Optional, Sequence

from .schedule import default_schedule
from .student import DDStudent, StudentConfig, build_backbone_loaded
from .student_backbones import backbone_class


def load_official(path, teacher, *, ema: bool = True, timesteps: Optional[Sequence[int]] = None,
                  split: Optional[int] = None, weights_only: bool = True, **opts) -> DDStudent:
    """A released DD checkpoint (microsoft/distilled_decoding) -> DDStudent, strictly.

    LlamaGen-DD (`llamagen-B.pt`, `llamagen-L.pt`): weights under "ema" (ema=False: "model").
    VAR-DD (`var-d16.pth` ...): under trainer.ema_parameters (ema=False: trainer.var_wo_ddp).
    Every key and shape must match the student built from `teacher`'s config; only derived buffers
    (RoPE tables, KV caches, VAR's level ids / masks / zero k-biases) are ignored and rebuilt.
    timesteps / split: None = the paper's settings for that model (docs/train.md: LlamaGen-B split 80, -L 130,
    VAR-d16 {1, 6} / 5, d20/d24 {1, 5} / 4). opts: backbone options (VAR: layerwise_n_d_embed).
    """
    cls = backbone_class(teacher.family)
    model = cls.config_from_teacher(teacher)
    d_ts, d_split = default_schedule(teacher.family, model, teacher.num_steps)
    codebook = teacher.codebook.float()
    config = StudentConfig(family=teacher.family, model=model, codebook_dim=codebook.shape[1],
                           vocab_size=codebook.shape[0],
                           timesteps=d_ts if timesteps is None else tuple(timesteps),
                           split=d_split if split is None else split,
                           options=cls.default_options(**opts))
    nesting = cls.OFFICIAL_NESTING if ema else cls.OFFICIAL_NESTING_RAW
    backbone = build_backbone_loaded(config, path, nesting=nesting, ignore=cls.OFFICIAL_IGNORE,
                                      device=codebook.device, weights_only=weights_only,
                                      what=f"released {teacher.family} DD student ({'ema' if ema else 'raw'})")
    return DDStudent(config, backbone, codebook).eval()
