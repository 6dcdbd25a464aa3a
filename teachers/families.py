"""The teacher families: name -> module. A leaf of `teachers/` so that both the package's
`load_teacher` and the zoo (whose teachers are built by their family's `load`) use it without
importing each other.

FAMILIES are the AR families (`teachers.base.Teacher`, what DD distils); DIFFUSION_FAMILIES the
diffusion teachers (`teachers.diffusion_base.DiffusionTeacher`, what ARD distils). `load_teacher`
and `family_module` take either.

Each family module exposes `PRESETS` (named configs, the CLI's choices), an AR family `as_config(config)` (a preset
name or dict -> the transformer's config; ValueError naming an unknown preset or key) and
`load(config, checkpoint, tokenizer_config, tokenizer_checkpoint, device, dtype, **options)`.
"""
from __future__ import annotations

import importlib

# imported on first use: `import teachers` stays light
FAMILIES = {"llamagen": "teachers.llamagen", "var": "teachers.var"}
DIFFUSION_FAMILIES = {"dit": "teachers.dit"}


def family_module(family: str):
    known = {**FAMILIES, **DIFFUSION_FAMILIES}
    if family not in known:
        raise ValueError(f"unknown teacher family {family!r}; choose from {sorted(known)}")
    return importlib.import_module(known[family])
