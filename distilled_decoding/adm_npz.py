"""ADM-format `.npz` image files (OpenAI guided-diffusion's evaluator layout): read and write.

`arr_0`: uint8 images [N, H, W, 3] (grey [N, H, W] / [N, H, W, 1] also read), `arr_1`: int64 class
labels [N] (optional). Both directions stream: a writer takes images batch by batch into an
uncompressed ZIP64 member (so files may exceed 4 GiB and are never held whole in memory), a reader
yields batches straight from the zip member. Written files carry a fixed member timestamp, so the
same images always give the same bytes.
"""
from __future__ import annotations

import os
import zipfile
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .fileio import fsync_dir, remove_stale_tmp, tmp_path

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)   # member timestamp of every file we write (byte-identical outputs)


class InputFileError(ValueError):
    """An input file is not what a verb expects; the message names it."""


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    return info


# ---- writing ------------------------------------------------------------------------------------
class NpyStream:
    """Write one .npy array of known shape batch by batch into a zip member (the ADM .npz layout,
    stored uncompressed as numpy.savez does, ZIP64 so it may exceed 4 GiB)."""

    def __init__(self, zf: zipfile.ZipFile, name: str, shape: tuple, dtype):
        from numpy.lib import format as npf
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.left = int(np.prod(shape)) * self.dtype.itemsize
        self.f = zf.open(_member(name + ".npy"), "w", force_zip64=True)
        npf.write_array_header_1_0(self.f, {"descr": npf.dtype_to_descr(self.dtype), "fortran_order": False,
                                            "shape": self.shape})

    def write(self, a: np.ndarray) -> None:
        b = np.ascontiguousarray(a, dtype=self.dtype).tobytes()
        if len(b) > self.left:
            raise ValueError("more data than the declared shape")
        self.f.write(b)
        self.left -= len(b)

    def close(self) -> None:
        self.f.close()
        if self.left:
            raise ValueError(f"{self.left} bytes short of the declared shape")


def write_adm_npz(path: str, num: int, image_shape: tuple, image_batches: Iterable[np.ndarray],
                  labels: Optional[np.ndarray] = None) -> None:
    """Write `path` atomically: arr_0 = the `num` images of `image_batches` (uint8 [b, *image_shape]
    each, in order), arr_1 = labels (int64 [num]) when given."""
    remove_stale_tmp(path)
    tmp = tmp_path(path)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            stream = NpyStream(zf, "arr_0", (num,) + tuple(image_shape), np.uint8)
            try:
                for batch in image_batches:
                    stream.write(batch)
            except BaseException:
                stream.f.close()   # else closing the zip raises over the error that stopped the images
                raise
            stream.close()
            if labels is not None:
                with zf.open(_member("arr_1.npy"), "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(labels, np.int64), allow_pickle=False)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# ---- reading ------------------------------------------------------------------------------------
def npz_members(path: str) -> List[str]:
    """The array names of an .npz ("arr_0", "mu", ...)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError) as e:
        raise InputFileError(f"{path}: not a readable .npz file ({e})") from e


def read_npy_header(f, path: str) -> Tuple[tuple, np.dtype]:
    """Read the .npy header of an open zip member, leaving `f` at the start of the data."""
    from numpy.lib import format as npf
    try:
        version = npf.read_magic(f)
        read = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except ValueError as e:
        raise InputFileError(f"{path}: 'arr_0' is not a readable .npy array ({e})") from e
    if fortran:
        raise InputFileError(f"{path}: 'arr_0' is stored in Fortran order; expected a C-order uint8 array")
    return shape, dtype


class AdmNpzReader:
    """`arr_0` of an ADM-format .npz: checked on opening, then streamed in batches of raw uint8
    [b, H, W(, 1|3)] straight from the zip member (never loaded whole)."""

    def __init__(self, path: str):
        self.path = path
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            shape, dtype = read_npy_header(f, path)
        if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
            raise InputFileError(f"{path}: 'arr_0' is {dtype} {shape}; expected uint8 images [N, H, W, 3] "
                                 "(ADM .npz format; [N, H, W] or [N, H, W, 1] grey also accepted)")
        self.shape = tuple(shape)

    def batches(self, batch_size: int, num: Optional[int] = None) -> Iterator[np.ndarray]:
        num = self.shape[0] if num is None else num
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            read_npy_header(f, self.path)
            for start in range(0, num, batch_size):
                batch = np.empty((min(batch_size, num - start),) + self.shape[1:], np.uint8)
                if f.readinto(memoryview(batch).cast("B")) != batch.nbytes:
                    raise InputFileError(f"{self.path}: 'arr_0' is truncated at image {start}")
                yield batch
