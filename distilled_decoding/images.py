"""Images as `dd sample` writes them: uint8 conversion, grids, PNG files, labelled comparison rows."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (rounded, as torchvision's save_image)."""
    x = images.detach().float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def make_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 image [rows*(H+pad)+pad, cols*(W+pad)+pad, 3]."""
    N, H, W, _ = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(N)))
    nrows = max(1, math.ceil(N / ncols))
    out = np.full((nrows * (H + pad) + pad, ncols * (W + pad) + pad, 3), fill, np.uint8)
    for i in range(N):
        r, c = divmod(i, ncols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[y:y + H, x:x + W] = images[i]
    return out


def save_png(array: np.ndarray, path: str, atomic: bool = True) -> None:
    """uint8 [H, W, 3] -> a PNG file, written atomically (a killed run leaves no half image) unless
    `atomic` is False (files of a temporary folder that is moved into place whole)."""
    import io

    from PIL import Image

    from .fileio import atomic_write
    if not atomic:
        Image.fromarray(array).save(path)
        return
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def labelled_rows(rows: Sequence[Tuple[str, np.ndarray]], pad: int = 2) -> np.ndarray:
    """[(name, uint8 [N, H, W, 3])] -> one image: a row per entry with its name in a left margin."""
    from PIL import Image, ImageDraw
    grids = [make_grid(imgs, ncols=imgs.shape[0], pad=pad) for _, imgs in rows]
    margin = 8 + 7 * max(len(name) for name, _ in rows)
    h, w = grids[0].shape[:2]
    canvas = Image.new("RGB", (margin + w, h * len(grids)), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for r, ((name, _), g) in enumerate(zip(rows, grids)):
        canvas.paste(Image.fromarray(g), (margin, r * h))
        d.text((4, r * h + max(0, h // 2 - 6)), name, fill=(0, 0, 0))
    return np.asarray(canvas)
