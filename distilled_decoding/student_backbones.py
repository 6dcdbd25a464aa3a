"""The DD student backbones: the contract every family's backbone meets (`StudentBackbone`) and the
registry that picks one by the teacher's family.

Family differences live in one backbone class per family, each one readable file whose state dict is
exactly the released layout:

    distilled_decoding/student_llamagen.py  LlamaGenDD  (LlamaGen-DD-B / -L, "ema" in the release)
    distilled_decoding/student_var.py       VARDD       (VAR-DD-d16/20/24, "trainer.ema_parameters")

A new family adds its class to `BACKBONES` (its `family` attribute is the key).
"""
from __future__ import annotations

from typing import ClassVar, Dict, Protocol, Tuple, Type, runtime_checkable

import torch

from .student_llamagen import LlamaGenDD
from .student_var import VARDD


@runtime_checkable
class StudentBackbone(Protocol):
    """What `DDStudent` needs of a family's backbone (an nn.Module)."""

    family: ClassVar[str]
    OFFICIAL_NESTING: ClassVar[tuple]       # where a released checkpoint keeps the EMA weights
    OFFICIAL_NESTING_RAW: ClassVar[tuple]   # ... and the raw ones
    OFFICIAL_IGNORE: ClassVar[tuple]        # derived buffers a released file may hold

    @property
    def step_sizes(self) -> tuple:
        """Tokens per AR step (the teacher's)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, n, C]; labels: [B]; is_data: [B, n] bool -> (logits [B, n, V], emb [B, n, C])."""

    def options(self) -> dict:
        """The family options it was built with (saved in the StudentConfig)."""

    @classmethod
    def from_teacher(cls, teacher, **opts) -> "StudentBackbone":
        """Initialised from the teacher, on the teacher's device."""

    @staticmethod
    def config_from_teacher(teacher) -> dict:
        """The teacher transformer's config dict (official names)."""

    @classmethod
    def build(cls, model: dict, codebook_dim: int, **opts) -> "StudentBackbone":
        """Randomly initialised from a config dict (weights are loaded next)."""

    @staticmethod
    def default_options(**opts) -> dict:
        """The full option dict for the given options (a ValueError for unknown ones)."""

    @staticmethod
    def paper_defaults(model: dict) -> Tuple[int, tuple, int]:
        """(paper AR steps, timesteps, split) of the released model with this config."""


BACKBONES: Dict[str, Type[StudentBackbone]] = {cls.family: cls for cls in (LlamaGenDD, VARDD)}


def backbone_class(family: str) -> Type[StudentBackbone]:
    if family not in BACKBONES:
        raise ValueError(f"no DD student for teacher family {family!r}; families: {sorted(BACKBONES)}")
    return BACKBONES[family]
