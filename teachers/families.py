"""The teacher families: name -> module. A leaf of `teachers/` so that both the package's
`load_teacher` and the zoo (whose teachers are built by their family's `load`) use it without
importing each other.

Each family module exposes `PRESETS` (named configs, the CLI's choices), `as_config(config)` (a preset
name or dict -> the transformer's config; ValueError naming an unknown preset or key) and
`load(config, checkpoint, tokenizer_config, tokenizer_checkpoint, device, dtype, **options)`.
"""
from __future__ import annotations

import importlib

# imported on first use: `import teachers` stays light
FAMILIES = {"llamagen": "teachers.llamagen", "var": "teachers.var"}


def family_module(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown teacher family {family!r}; choose from {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])
