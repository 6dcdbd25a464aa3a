"""How well digits-t2i samples follow their captions, for `dd eval --caption-agreement` and the table
of `dd demo --family t2i` (demo.run_t2i_demo): the digits classifier's digit and the measured
thickness and slant (`teachers.digit_captions.caption_agreement`) against each sample's caption.

In the demo's table the class acc. column becomes the digit accuracy (caption indices mapped to their
caption's digit), and three columns follow: "caption agr." (digit AND every stated attribute match),
"thickness agr." and "slant agr." (each attribute alone). Also the demo's prompt file: the 40 full
captions, balanced.
"""
from __future__ import annotations

import os
from typing import Callable, List

import numpy as np

from .errors import DDError

NAME = "digits-t2i"
PROMPTS_FILE = "prompts.txt"


def write_prompts(out: str) -> str:
    """The demo's prompt file (the 40 full captions, `all_captions()`) in `out`; -> its path."""
    from teachers.digit_captions import all_captions

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, PROMPTS_FILE)
    text = "".join(p + "\n" for p in all_captions())
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != text:
                raise DDError(f"{path} exists with other prompts; use another --out")
    else:
        with open(path, "w") as f:
            f.write(text)
    return path


def agreement_of(prompts: List[str], images: np.ndarray, logits: np.ndarray, thresholds) -> dict:
    """Digit captions [N] (strings), images uint8 [N, H, W, 3], digits-classifier logits [N, 10] ->
    `teachers.digit_captions.caption_agreement` ({"digit", "caption", "thickness", "slant"})."""
    import torch
    from teachers.digit_captions import caption_agreement, parse_caption

    parsed = {p: parse_caption(p) for p in set(prompts)}
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0    # [N, 3, H, W]
    return caption_agreement([parsed[p] for p in prompts], torch.from_numpy(logits).argmax(1), x, thresholds)


def caption_scorer(prompts: List[str], thresholds) -> Callable[[str, np.ndarray, np.ndarray], dict]:
    """quality.score's per_file hook: samples.npz (images arr_0, caption indices arr_1), the classifier
    logits [N, 10] -> {"acc": digit accuracy, "caption": caption agreement, "thickness", "slant"}."""
    def per_file(path: str, logits: np.ndarray, labels: np.ndarray) -> dict:
        with np.load(path) as z:
            a = agreement_of([prompts[int(i)] for i in labels], z["arr_0"], logits, thresholds)
        return {"acc": a["digit"], "caption": a["caption"], "thickness": a["thickness"], "slant": a["slant"]}

    return per_file


def caption_columns():
    """format_table's extra columns: caption agreement (± spread) and the two attribute agreements."""
    def pm(key):
        def cell(r):
            m, s = r["mean"][key], r["spread"][key]
            return f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if len(r["seeds"]) > 1 else "") + "%"
        return cell
    return [("caption agr. ↑", pm("caption")), ("thickness agr.", pm("thickness")), ("slant agr.", pm("slant"))]
