"""The tiny digits teachers shipped with the repo (trained by tools/train_digits_zoo.py).

ZOO maps a name to (family, weights file stem). Weights and configs live beside this file as
`<stem>.safetensors` + `<stem>.json`.
"""
from __future__ import annotations

ZOO: dict = {}


def load(name, device="cpu", dtype=None, **options):
    raise FileNotFoundError(f"zoo teacher {name!r} is not shipped yet (run tools/train_digits_zoo.py)")
