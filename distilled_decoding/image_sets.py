"""Image sets and statistics files, as `dd eval` reads and writes them.

Images are ADM-format `.npz` files (`arr_0`: uint8 [N, H, W, 3], streamed, never loaded whole) or
folders of image files. Reference statistics are `.npz` files with `mu`, `sigma` (pytorch-fid's
layout) plus, written by us, `features` (needed for precision/recall), `extractor` and `num_images`.
"""
from __future__ import annotations

import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Union

import numpy as np

from .adm_npz import AdmNpzReader, InputFileError, npz_members
from .fileio import atomic_write


EvalInputError = InputFileError   # an input file or folder is not what `dd eval` expects


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
STATS_KEYS = ("mu", "sigma")


class ImageSet:
    """N images of one size, read lazily in batches of uint8 [B, H, W, 3] (grey is repeated to RGB)."""

    def __init__(self, path: str, num: int, height: int, width: int) -> None:
        self.path, self.num, self.height, self.width = path, num, height, width

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num


def _rgb(batch: np.ndarray) -> np.ndarray:
    """[B, H, W] or [B, H, W, 1|3] uint8 -> [B, H, W, 3]."""
    if batch.ndim == 3:
        batch = batch[..., None]
    return np.repeat(batch, 3, axis=3) if batch.shape[3] == 1 else batch


class NpzImages(ImageSet):
    """`arr_0` of an ADM-format .npz (`adm_npz.AdmNpzReader`), streamed."""

    def __init__(self, path: str, limit: Optional[int] = None) -> None:
        self.reader = AdmNpzReader(path)
        shape = self.reader.shape
        num = shape[0] if limit is None else min(shape[0], limit)
        super().__init__(path, num, shape[1], shape[2])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for batch in self.reader.batches(batch_size, self.num):
            yield _rgb(batch)


class FolderImages(ImageSet):
    """Image files (png/jpg/...) directly inside a folder, in sorted name order, decoded in threads."""

    def __init__(self, path: str, limit: Optional[int] = None, workers: int = 8) -> None:
        files = sorted(e.path for e in os.scandir(path)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
        if not files:
            raise EvalInputError(f"{path}: no image files ({', '.join(IMAGE_EXTS)}) in this folder")
        files = files[:limit] if limit is not None else files
        first = self._load(files[0])
        super().__init__(path, len(files), first.shape[0], first.shape[1])
        self.files, self.workers = files, workers

    @staticmethod
    def _load(file: str) -> np.ndarray:
        from PIL import Image
        try:
            with Image.open(file) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise EvalInputError(f"{file}: cannot read this image ({e})") from e

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, self.num, batch_size):
                names = self.files[start:start + batch_size]
                imgs = list(pool.map(self._load, names))
                for name, im in zip(names, imgs):
                    if im.shape[:2] != (self.height, self.width):
                        raise EvalInputError(f"{name}: image is {im.shape[1]}x{im.shape[0]}, the others in "
                                             f"{self.path} are {self.width}x{self.height}")
                yield np.stack(imgs)


_NPZ_EXPECTED = ("an ADM-format .npz with 'arr_0' (uint8 images [N, H, W, 3]) or reference statistics "
                 "with 'mu' and 'sigma'")


def open_source(path: Union[str, os.PathLike], limit: Optional[int] = None,
                workers: int = 8) -> Union[ImageSet, dict]:
    """An ImageSet (ADM .npz or image folder) or, for a statistics .npz, the dict of `load_stats`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return FolderImages(path, limit=limit, workers=workers)
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: no such file or folder")
    if not path.endswith(".npz"):
        raise EvalInputError(f"{path}: expected {_NPZ_EXPECTED}, or a folder of images")
    members = npz_members(path)
    if "arr_0" in members:
        return NpzImages(path, limit=limit)
    if all(k in members for k in STATS_KEYS):
        return load_stats(path)
    raise EvalInputError(f"{path}: expected {_NPZ_EXPECTED}; it holds {sorted(members)}")


def save_stats(path: Union[str, os.PathLike], mu: np.ndarray, sigma: np.ndarray,
               features: Optional[np.ndarray] = None, extractor: Optional[str] = None) -> None:
    """Write `mu`, `sigma` (float64), optionally `features` (float32 [N, D]) and the extractor tag."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
        arrays["num_images"] = np.int64(len(features))
    if extractor is not None:
        arrays["extractor"] = np.array(extractor)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    buf = io.BytesIO()   # a file object: numpy must not append ".npz" to the name
    np.savez(buf, **arrays)
    atomic_write(os.fspath(path), buf.getvalue())   # a killed run leaves no half-written statistics


def load_stats(path: Union[str, os.PathLike]) -> dict:
    """{'mu', 'sigma', 'features' (or None), 'extractor' (or None), 'path'} from a statistics .npz."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in STATS_KEYS if k not in z.files]
            if missing:
                raise EvalInputError(f"{path}: statistics file without {missing}; expected 'mu' [D] and "
                                     f"'sigma' [D, D] (found {sorted(z.files)})")
            out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64),
                   "features": z["features"] if "features" in z.files else None,
                   "extractor": str(z["extractor"][()]) if "extractor" in z.files else None, "path": path}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, EvalInputError):
            raise
        raise EvalInputError(f"{path}: not a readable statistics .npz ({e})") from e
    d = out["mu"].shape
    if out["mu"].ndim != 1 or out["sigma"].shape != d * 2:
        raise EvalInputError(f"{path}: 'mu' {out['mu'].shape} and 'sigma' {out['sigma'].shape} are not "
                             "[D] and [D, D]")
    if out["features"] is not None and (out["features"].ndim != 2 or out["features"].shape[1] != d[0]):
        raise EvalInputError(f"{path}: 'features' {out['features'].shape} do not match 'mu' {d}")
    bad = [k for k in ("mu", "sigma", "features") if out[k] is not None and not np.isfinite(out[k]).all()]
    if bad:
        raise EvalInputError(f"{path}: {', '.join(repr(k) for k in bad)} hold NaN/inf (a broken statistics file)")
    return out
