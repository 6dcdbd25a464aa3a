"""Teacher families behind one interface (`teachers.base.Teacher`) and the loader that picks one.

    from teachers import load_teacher
    t = load_teacher("llamagen", "GPT-L", checkpoint="c2i_L_256.pt", tokenizer_checkpoint="vq_ds16_c2i.pt")
    t = load_teacher("var", "d16", checkpoint="var_d16.pth", tokenizer_checkpoint="vae_ch160v4096z32.pth")
    t = load_teacher("digits-llamagen")          # a shipped tiny teacher (teachers/zoo)
    t = load_teacher("dit", "DiT-XL/2", checkpoint="DiT-XL-2-256x256.pt", vae="sd-vae-ft-ema/")  # diffusion

The families (name -> module) are in `teachers/families.py`.
"""
from __future__ import annotations

from typing import Union

import torch

from .base import DecodeState, SamplingConfig, Teacher  # noqa: F401
from .families import DIFFUSION_FAMILIES, FAMILIES, family_module

__all__ = ["DecodeState", "SamplingConfig", "Teacher", "FAMILIES", "DIFFUSION_FAMILIES", "load_teacher",
           "family_module", "zoo_names"]


def zoo_names() -> list:
    from . import zoo
    return sorted(zoo.ZOO)


def load_teacher(family: str, config: Union[str, dict, None] = None, checkpoint=None, *,
                 tokenizer_config: Union[str, dict, None] = None, tokenizer_checkpoint=None,
                 device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                 **options):
    """Build a teacher of `family` ("llamagen", "var", "dit", or a zoo name such as "digits-llamagen").

    AR families return a `Teacher`; "dit" a `teachers.diffusion_base.DiffusionTeacher` (its options:
    `vae=` a diffusers directory or weights file, `image_size=` 256 | 512, `cfg_channels=`, `ema=`).

    config: a preset name ("GPT-L", "d16", ...) or a dict of the official hyper-parameter names.
    checkpoint / tokenizer_checkpoint: file paths or in-memory state dicts; None = random weights.
    options: family options (e.g. `weights_only=False` for trusted legacy pickles, `ema=True`).
    """
    if family not in FAMILIES and family not in DIFFUSION_FAMILIES:
        from . import zoo
        if family in zoo.ZOO:
            return zoo.load(family, device=device, dtype=dtype, **options)
        raise ValueError(f"unknown teacher {family!r}; families: {sorted({**FAMILIES, **DIFFUSION_FAMILIES})}, zoo: {zoo_names()}")
    mod = family_module(family)
    return mod.load(config, checkpoint, tokenizer_config=tokenizer_config,
                    tokenizer_checkpoint=tokenizer_checkpoint, device=device, dtype=dtype, **options)
