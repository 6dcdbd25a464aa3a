"""Sampling with a DD student, the teacher-mixed sampler, the paper's baselines, and `dd sample`.

Small pure functions over tensors (k-diffusion style); the CLI at the bottom drives them.

Timesteps are the paper's 1-indexed t over AR steps (see `student.py`): at t the first t-1 steps are
data, the rest noise; t = 1 is pure noise.

**Algorithm 3 (DD 1/2-step), `dd_sample`.** X₁ = noise [B, n, C]; for t in timesteps:
X ← F_θ(make_xt(X, X₁, t), t) (`student.dd_step`), always with the SAME initial noise X₁. Between steps
nothing is snapped (as the release does): positions below the split come from the logits head and are
codebook rows anyway; `snap=True` snaps the embedding-head outputs too.

**Algorithm 4 (teacher-mixed), `regen_sample`, paper notation pre-trained-a-b (`--regen a:b`).**
One DD step at t = 1, snapped to the codebook; the tokens of its first a-1 steps are kept; the teacher
re-generates steps a-1 .. b-2 (0-indexed) with its KV-cached multinomial sampler after prefilling the
kept tokens with its own causal / block-causal mask (`Teacher.start(prefix=...)`; the release fed VAR
the prefix without the block-causal mask); then the DD step at t = b on
concat(codebook[tokens of steps < b-1], X₁[rest]). b must be a trained timestep. a = 1 skips the first DD
step (nothing is kept: the release's `teacher_start_t 0`); a = b skips the teacher and equals the
2-step sample whenever the first b-1 steps sit below the split (all paper settings).
Model calls: 1 + (b - a) + 1 (e.g. LlamaGen 41:81 = 42 steps, VAR 4:6 = 4 steps).

**Baselines (DD paper, Sec. 5, Table 1).**
- `skip_sample` (`--baseline skip-N`): the teacher with its last N AR steps skipped. It runs the
  first S-N steps (S-N model calls, multinomial draws as `Teacher.sample`); the tokens of the N
  skipped steps are then drawn in one shot, independently per position, from the prediction of the
  last computed step (step S-N-1). That prediction is one distribution per position of step S-N-1's
  token grid; a skipped step with another grid size takes it by nearest-neighbour resampling of the
  row-major square grid (`resample_probs`): for LlamaGen (1-token steps) every skipped position draws
  from the single distribution of token S-N-1; for VAR each position of a finer scale draws from the
  distribution of the position of scale S-N-1 it falls into. `fill="drop"` instead decodes only the
  computed steps (defined for families whose `decode` accepts a step prefix, i.e. VAR: the coarser
  partial f_hat). N = 0 is plain teacher sampling, draw for draw.
- `TokenMarginals` (`--baseline onestep`): every position drawn independently from its marginal,
  the optimum of independent one-step generation (paper Prop. 3.1), estimated by the token
  frequencies of a `dd build-dataset` data set: position i of a sample with label c takes position
  i of a uniformly drawn pair of class c (`conditional=True`, the optimum for a class-conditional
  generator) or of any class (`conditional=False`). Exactly the empirical marginal; no [n, V] table.

**Randomness.** Noise and labels are `dataset.sample_noise` / `sample_labels` of (seed, global sample
index), so `--seed s` gives the same noise and labels as a data set built with seed s. Multinomial
draws take one generator per sample (seeded from (seed, index, stream)), so a sample never depends on
the batch it ran in. The functions also accept a single `torch.Generator` (one stream for the batch,
as `Teacher.sample`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zipfile
from typing import Callable, List, Optional, Sequence, Tuple, Union

import click
import numpy as np
import torch

from teachers.base import SamplingConfig, Teacher

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]

LABEL_MODES = ("balanced", "uniform")
SKIP_FILLS = ("draw", "drop")


# ---- parsing and checks -------------------------------------------------------------------------
def parse_timesteps(text: str) -> Tuple[int, ...]:
    """"1,81" -> (1, 81)."""
    try:
        out = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise ValueError(f"timesteps {text!r}: expected comma-separated integers such as 1,81") from None
    if not out:
        raise ValueError("timesteps: empty list")
    return out


def check_timesteps(timesteps: Sequence[int], num_steps: int) -> Tuple[int, ...]:
    ts = tuple(int(t) for t in timesteps)
    if ts[0] != 1:
        raise ValueError(f"timesteps {list(ts)}: the first must be 1 (sampling starts from pure noise)")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps {list(ts)}: must be strictly increasing")
    if ts[-1] > num_steps:
        raise ValueError(f"timesteps {list(ts)}: at most {num_steps} (the number of AR steps)")
    return ts


def parse_regen(text: str) -> Tuple[int, int]:
    """"41:81" -> (41, 81) (paper notation pre-trained-41-81)."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--regen {text!r}: expected START:END such as 41:81") from None
    return a, b


def check_regen(a: int, b: int, trained: Sequence[int], num_steps: int) -> None:
    """Raise a one-line ValueError unless 1 <= a <= b, b is a trained timestep and b <= num_steps."""
    trained = tuple(int(t) for t in trained)
    names = ", ".join(map(str, trained))
    if b not in trained:
        raise ValueError(f"--regen {a}:{b}: the end {b} is not a trained timestep of this run (trained: {names})")
    if not 1 <= a <= b:
        raise ValueError(f"--regen {a}:{b}: need 1 <= START <= END (START-1 steps are kept from the first DD step)")
    if b > num_steps:
        raise ValueError(f"--regen {a}:{b}: the end is beyond the {num_steps} AR steps")


def default_regen(trained: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The --compare default: a = t2 // 2 + 1, b = t2 (LlamaGen 41:81, VAR 4:6, both release settings);
    None when the run has a single timestep."""
    if len(trained) < 2:
        return None
    b = int(trained[1])
    return b // 2 + 1, b


# ---- randomness ---------------------------------------------------------------------------------
def sample_generators(seed: int, indices, stream: str, device: Union[str, torch.device] = "cpu"
                      ) -> List[torch.Generator]:
    """One generator per global sample index, seeded from (seed, index, stream)."""
    from .dataset import sample_seed
    dev = torch.device(device)
    idx = indices.reshape(-1).tolist() if isinstance(indices, torch.Tensor) else [int(i) for i in indices]
    return [torch.Generator(device=dev).manual_seed(sample_seed(seed, i, stream)) for i in idx]


def draw(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Multinomial draw: probs [B, k, V] -> idx [B, k] int64.

    generator: None / one torch.Generator (the batch as one stream, exactly as `Teacher.sample`
    draws), or a sequence of B generators (row b draws its k tokens from generator b only)."""
    B, k, V = probs.shape
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs.reshape(B * k, V), 1, generator=generator).view(B, k)
    if len(generator) != B:
        raise ValueError(f"{len(generator)} generators for a batch of {B}")
    return torch.stack([torch.multinomial(probs[b], 1, generator=g).view(k) for b, g in enumerate(generator)])


# ---- Algorithm 3: DD 1/2-step --------------------------------------------------------------------
def _t(batch: int, t: int, device) -> torch.Tensor:
    return torch.full((batch,), int(t), dtype=torch.long, device=device)


@torch.no_grad()
def dd_sample(student, noise: torch.Tensor, labels: torch.Tensor, timesteps: Sequence[int], *,
              split: Optional[int] = None, snap: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """noise X₁ [B, n, C], labels [B] -> (x [B, n, C] final continuous output, idx [B, n] nearest codes).

    X ← F_θ(make_xt(X, X₁, t), t) for t in timesteps (e.g. (1,) or (1, 81))."""
    from .student import dd_step, make_xt
    x, idx = noise, None
    for t in timesteps:
        tt = _t(noise.shape[0], t, noise.device)
        x, idx = dd_step(student, make_xt(x, noise, tt, student.step_offsets), labels, tt, split=split, snap=snap)
    return x, idx


@torch.no_grad()
def regen_sample(student, teacher: Teacher, noise: torch.Tensor, labels: torch.Tensor, regen: Tuple[int, int],
                 sampling: SamplingConfig, generator: Generators = None, *, split: Optional[int] = None,
                 snap: bool = False, progress: Optional[Callable[[int], None]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 4, paper pre-trained-a-b: (x [B, n, C], idx [B, n]); see the module docstring."""
    from .student import dd_step, make_xt
    a, b = regen
    check_regen(a, b, student.config.timesteps, len(student.step_sizes))
    offs = student.step_offsets
    B = noise.shape[0]
    if a > 1:                                      # first DD step at t = 1, snapped
        t1 = _t(B, 1, noise.device)
        _, idx = dd_step(student, make_xt(noise, noise, t1, offs), labels, t1, split=split, snap=True)
        kept = idx[:, :offs[a - 1]]
    else:
        kept = torch.zeros(B, 0, dtype=torch.long, device=noise.device)
    if b > a:                                      # the teacher re-generates steps a-1 .. b-2
        def choose(_s: int, probs: torch.Tensor) -> torch.Tensor:
            return draw(probs, generator)
        tokens = teacher.generate(labels, sampling, choose, prefix=kept, stop_step=b - 1, progress=progress)
        tokens = tokens.to(noise.device)
    else:
        tokens = kept
    data = noise.clone()
    data[:, :tokens.shape[1]] = student.codebook.to(noise.device, noise.dtype)[tokens]
    tb = _t(B, b, noise.device)
    return dd_step(student, make_xt(data, noise, tb, offs), labels, tb, split=split, snap=snap)


# ---- baselines ----------------------------------------------------------------------------------
def resample_probs(probs: torch.Tensor, k_to: int) -> torch.Tensor:
    """Per-position distributions of one step [B, k, V] -> those of a step of k_to positions, by
    nearest-neighbour resampling of the row-major square grid (k = 1: the one distribution everywhere)."""
    B, k, V = probs.shape
    if k == k_to:
        return probs
    if k == 1:
        return probs.expand(B, k_to, V)
    r, r2 = math.isqrt(k), math.isqrt(k_to)
    if r * r != k or r2 * r2 != k_to:
        raise ValueError(f"cannot map a step of {k} positions onto one of {k_to}: not square grids")
    src = torch.div(torch.arange(r2, device=probs.device) * r, r2, rounding_mode="floor")   # 'nearest'
    flat = (src[:, None] * r + src[None, :]).reshape(-1)
    return probs[:, flat]


@torch.no_grad()
def skip_sample(teacher: Teacher, labels: torch.Tensor, sampling: SamplingConfig, n_skip: int,
                generator: Generators = None, fill: str = "draw",
                progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """The teacher with its last `n_skip` AR steps skipped -> tokens [B, n] int64 (fill="drop":
    [B, offsets[S - n_skip]], only the computed steps). See the module docstring."""
    S = teacher.num_steps
    if not 0 <= n_skip < S:
        raise ValueError(f"skip-{n_skip}: N must be in [0, {S - 1}] for a teacher of {S} steps")
    if fill not in SKIP_FILLS:
        raise ValueError(f"fill {fill!r}: choose from {SKIP_FILLS}")
    stop = S - n_skip
    last = {}

    def choose(_s: int, probs: torch.Tensor) -> torch.Tensor:
        last["probs"] = probs
        return draw(probs, generator)

    tokens = teacher.generate(labels, sampling, choose, stop_step=stop, progress=progress)
    if n_skip == 0 or fill == "drop":
        return tokens
    p = last["probs"]
    fills = [draw(resample_probs(p, teacher.step_sizes[s]), generator) for s in range(stop, S)]
    return torch.cat([tokens] + fills, dim=1)


class TokenMarginals:
    """Per-position token marginals of a pair data set, sampled exactly (see the module docstring).

    tokens [N, n] int, labels [N] int (CPU). conditional: the marginal given the class label."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, num_classes: int, conditional: bool = True):
        tokens, labels = tokens.long().cpu(), labels.long().cpu()
        order = torch.argsort(labels, stable=True)
        self.tokens = tokens[order]
        self.labels = labels[order]
        counts = torch.bincount(self.labels, minlength=num_classes)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.num_classes = int(num_classes)
        self.conditional = bool(conditional)

    @classmethod
    def from_dataset(cls, root: str, conditional: bool = True, max_pairs: Optional[int] = None) -> "TokenMarginals":
        from safetensors import safe_open
        from .dataset import read_manifest
        m = read_manifest(root)
        toks, labs, have = [], [], 0
        for e in m["shards"]:
            if max_pairs is not None and have >= max_pairs:
                break
            with safe_open(os.path.join(root, e["file"]), framework="pt") as f:
                take = e["count"] if max_pairs is None else min(e["count"], max_pairs - have)
                toks.append(f.get_slice("tokens")[:take])
                labs.append(f.get_slice("labels")[:take])
            have += take
        if not have:
            raise ValueError(f"{root}: the data set holds no pairs")
        return cls(torch.cat(toks), torch.cat(labs), m["settings"]["num_classes"], conditional)

    def pool(self, label: Optional[int] = None) -> torch.Tensor:
        """The pairs' tokens [m, n] a sample of `label` draws from."""
        if not self.conditional or label is None:
            return self.tokens
        return self.tokens[self.starts[label]:self.starts[label + 1]]

    def frequencies(self, vocab_size: int, label: Optional[int] = None) -> torch.Tensor:
        """[n, V] fp64 token frequencies per position of the pool of `label`."""
        pool = self.pool(label)
        n = pool.shape[1]
        out = torch.zeros(n, vocab_size, dtype=torch.float64)
        out.scatter_add_(1, pool.t(), torch.ones(n, pool.shape[0], dtype=torch.float64))
        return out / max(pool.shape[0], 1)

    def sample(self, labels: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """labels [B] -> tokens [B, n] int64 (CPU): each position from its own uniformly drawn pair."""
        labels = labels.long().cpu().reshape(-1)
        B, n = labels.shape[0], self.tokens.shape[1]
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * B
        if len(gens) != B:
            raise ValueError(f"{len(gens)} generators for a batch of {B}")
        out = torch.empty(B, n, dtype=torch.long)
        cols = torch.arange(n)
        for b in range(B):
            lab = int(labels[b])
            pool = self.pool(lab)
            if pool.shape[0] == 0:
                raise ValueError(f"class {lab} has no pairs in the data set (use the unconditional marginal)")
            g = gens[b]
            if g is not None and g.device.type != "cpu":
                raise ValueError("TokenMarginals draws on the CPU: pass CPU generators")
            j = torch.randint(pool.shape[0], (n,), generator=g)
            out[b] = pool[j, cols]
        return out


# ---- images and files ---------------------------------------------------------------------------
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


def save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image
    Image.fromarray(array).save(path)


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


class NpyStream:
    """Write one .npy array of known shape batch by batch into a zip member (the ADM .npz layout,
    stored uncompressed as numpy.savez does, ZIP64 so it may exceed 4 GiB)."""

    def __init__(self, zf: zipfile.ZipFile, name: str, shape: tuple, dtype):
        from numpy.lib import format as npf
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.left = int(np.prod(shape)) * self.dtype.itemsize
        self.f = zf.open(name + ".npy", "w", force_zip64=True)
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


class SampleWriter:
    """The outputs of `dd sample` in --out: samples.npz (arr_0: uint8 NHWC images, arr_1: int64 labels),
    tokens.npy, png/<index>.png (optional) and grid.png (the first `grid_max` images)."""

    def __init__(self, out: str, num: int, image_shape: tuple, num_tokens: int, vocab_size: int,
                 png: bool = False, grid_max: int = 64):
        os.makedirs(out, exist_ok=True)
        self.out, self.num, self.png, self.grid_max = out, num, png, grid_max
        self._tmp = os.path.join(out, f"samples.npz.tmp.{os.getpid()}")
        self.zf = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.images = NpyStream(self.zf, "arr_0", (num,) + tuple(image_shape), np.uint8)
        self.labels = []
        tdtype = np.int16 if vocab_size <= 2 ** 15 else np.int32
        self._tok_tmp = os.path.join(out, f"tokens.npy.tmp.{os.getpid()}.npy")
        self.tokens = np.lib.format.open_memmap(self._tok_tmp, mode="w+", dtype=tdtype, shape=(num, num_tokens))
        self.grid = []
        self.pos = 0
        if png:
            os.makedirs(os.path.join(out, "png"), exist_ok=True)

    def add(self, indices: Sequence[int], images: np.ndarray, labels: torch.Tensor, tokens: torch.Tensor) -> None:
        m = images.shape[0]
        self.images.write(images)
        self.labels.append(labels.long().cpu().numpy())
        self.tokens[self.pos:self.pos + m] = tokens.cpu().numpy()
        self.pos += m
        if len(self.grid) < self.grid_max:
            self.grid.extend(images[:self.grid_max - len(self.grid)])
        if self.png:
            for i, im in zip(indices, images):
                save_png(im, os.path.join(self.out, "png", f"{int(i):06d}.png"))

    def close(self) -> None:
        self.images.close()
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        with self.zf.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, labels.astype(np.int64), allow_pickle=False)
        self.zf.close()
        os.replace(self._tmp, os.path.join(self.out, "samples.npz"))
        self.tokens.flush()
        del self.tokens
        os.replace(self._tok_tmp, os.path.join(self.out, "tokens.npy"))
        if self.grid:
            save_png(make_grid(np.stack(self.grid)), os.path.join(self.out, "grid.png"))


# ---- timing -------------------------------------------------------------------------------------
class Stopwatch:
    """Accumulates wall time of `with sw:` blocks, synchronising CUDA before reading the clock."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __enter__(self):
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds += time.perf_counter() - self._t0
        return False


def timing_record(num: int, model_s: float, decode_s: float, total_s: float, **extra) -> dict:
    return {"num_samples": int(num), "model_seconds": model_s, "decode_seconds": decode_s,
            "total_seconds": total_s,
            "images_per_second": num / model_s if model_s > 0 else float("inf"),
            "seconds_per_image": model_s / max(num, 1),
            "images_per_second_with_decode": num / (model_s + decode_s) if model_s + decode_s > 0 else float("inf"),
            **extra}


def timing_line(r: dict) -> str:
    return (f"timing: {r['num_samples']} images, model {r['model_seconds']:.3f}s -> "
            f"{r['images_per_second']:.2f} images/s, {r['seconds_per_image'] * 1e3:.2f} ms/image "
            f"(+ decode {r['decode_seconds']:.3f}s; total {r['total_seconds']:.2f}s; "
            f"{r['mode']}, batch {r['batch_size']}, {r['device']})")


# ---- the samplers the CLI runs ------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """What `dd sample` runs. mode: "dd" | "regen" | "skip" | "onestep"."""

    mode: str
    teacher: Teacher
    student: object = None
    timesteps: Tuple[int, ...] = ()
    split: Optional[int] = None
    snap: bool = False
    regen: Optional[Tuple[int, int]] = None
    sampling: Optional[SamplingConfig] = None
    n_skip: int = 0
    skip_fill: str = "draw"
    marginals: Optional[TokenMarginals] = None

    def describe(self) -> str:
        if self.mode == "dd":
            return f"DD {len(self.timesteps)}-step (t = {','.join(map(str, self.timesteps))})"
        if self.mode == "regen":
            return f"teacher-mixed pre-trained-{self.regen[0]}-{self.regen[1]}"
        if self.mode == "skip":
            return f"teacher skip-{self.n_skip}" + (f" ({self.skip_fill})" if self.n_skip else "")
        return "onestep (token marginals)"

    def run(self, seed: int, indices: List[int], labels: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (decoder input: embeddings [B, n, C] or tokens [B, m], tokens [B, m] int64)."""
        t = self.teacher
        if self.mode in ("dd", "regen"):
            from .dataset import sample_noise
            noise = sample_noise(seed, indices, t.num_tokens, t.embed_dim).to(device)
            if self.mode == "dd":
                x, idx = dd_sample(self.student, noise, labels, self.timesteps, split=self.split, snap=self.snap)
            else:
                gens = sample_generators(seed, indices, "draw", device)
                x, idx = regen_sample(self.student, t, noise, labels, self.regen, self.sampling, gens,
                                      split=self.split, snap=self.snap)
            return x, idx
        if self.mode == "skip":
            gens = sample_generators(seed, indices, "draw", device)
            tok = skip_sample(t, labels, self.sampling, self.n_skip, gens, fill=self.skip_fill)
            return tok, tok
        gens = sample_generators(seed, indices, "onestep", "cpu")
        tok = self.marginals.sample(labels, gens).to(device)
        return tok, tok


def make_labels(seed: int, indices: List[int], num_classes: int, labels: str) -> torch.Tensor:
    """--labels balanced | uniform (as the data set) | comma-separated class ids (cycled)."""
    from .dataset import sample_labels
    if labels in LABEL_MODES:
        return sample_labels(seed, indices, num_classes, labels == "balanced")
    ids = [int(s) for s in labels.split(",") if s.strip()]
    return torch.tensor([ids[i % len(ids)] for i in indices], dtype=torch.long)


def _check_labels(labels: str, num_classes: int) -> None:
    if labels in LABEL_MODES:
        return
    try:
        ids = [int(s) for s in labels.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--labels {labels!r}: balanced, uniform or comma-separated class ids") from None
    if not ids or any(not 0 <= i < num_classes for i in ids):
        raise ValueError(f"--labels {labels!r}: class ids must lie in [0, {num_classes})")


# ---- CLI ----------------------------------------------------------------------------------------
def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sampling(teacher: Teacher, base: Optional[dict], overrides: dict) -> SamplingConfig:
    from .teacher_spec import resolve_sampling
    s = resolve_sampling(teacher, {})
    if base:
        s = SamplingConfig(**{k: base[k] for k in s.to_dict() if k in base})
    return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


def _load_run(run: str, device: str, ema: bool):
    from .student import load_run
    from .teacher_spec import TeacherSpec
    student, info = load_run(run, device, ema=ema)
    student.eval()
    teacher = TeacherSpec.from_dict(info["teacher"]).load(device)
    return student, info, teacher


def _run_data_settings(info: dict) -> dict:
    """The settings of the data set the run was trained on, when the run names one that still exists
    (run_info["data"]: a data set path, or a dict holding "settings" / "sampling" / "flow_map")."""
    d = info.get("data")
    if isinstance(d, dict):
        if isinstance(d.get("settings"), dict):
            return d["settings"]
        d = d.get("root") or d.get("path") or d.get("dir") or \
            ({k: d[k] for k in ("sampling", "flow_map") if k in d} or None)
        if isinstance(d, dict):
            return d
    if isinstance(d, str) and os.path.exists(os.path.join(d, "manifest.json")):
        from .dataset import read_manifest
        try:
            return read_manifest(d)["settings"]
        except Exception:  # noqa: BLE001 - an unreadable data set only loses the defaults
            return {}
    return {}


def _run_sampling_base(info: dict) -> Optional[dict]:
    """The teacher sampling of the run's data set (the DD setting it was distilled at), if known."""
    if isinstance(info.get("sampling"), dict):
        return info["sampling"]
    s = _run_data_settings(info).get("sampling")
    return s if isinstance(s, dict) else None


def _run_flow_map(info: dict):
    """The flow map of the run's data set (default FlowMapConfig when unknown)."""
    from .flowmap import FlowMapConfig
    d = info.get("flow_map") if isinstance(info.get("flow_map"), dict) else _run_data_settings(info).get("flow_map")
    if isinstance(d, dict):
        return FlowMapConfig.from_dict(d)  # fields it lacks: the values of the map that made that data
    return FlowMapConfig()


def _fail(msg) -> None:
    raise click.ClickException(str(msg).splitlines()[0] if str(msg) else "failed")


@click.command("sample")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--run", "run", type=click.Path(exists=True, file_okay=False), default=None,
              help="A DD run directory (`dd train`): the student and, through it, the teacher.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="DD steps: the first N trained timesteps. Default: all trained timesteps.")
@click.option("--timesteps", default=None, help="Explicit DD timesteps (paper notation), e.g. 1,81.")
@click.option("--split", type=click.IntRange(min=0), default=None,
              help="Steps < SPLIT take the logits head, the rest the embedding head. Default: the run's.")
@click.option("--snap", is_flag=True, default=False,
              help="Snap embedding-head outputs to the nearest codebook row (default: decode them as is).")
@click.option("--regen", default=None, metavar="A:B",
              help="Teacher-mixed sampling pre-trained-A-B: keep steps < A-1 of one DD step, the teacher "
                   "re-generates steps A-1..B-2, one DD step at t=B (a trained timestep).")
@click.option("--baseline", default=None, metavar="skip-N|teacher|onestep",
              help="skip-N: the teacher with its last N steps skipped; teacher: = skip-0; onestep: every "
                   "token drawn independently from its marginal in --data.")
@click.option("--skip-fill", type=click.Choice(SKIP_FILLS), default="draw", show_default=True,
              help="skip-N: draw the skipped steps' tokens from the last computed prediction, or drop "
                   "them and decode the computed steps only (VAR).")
@click.option("--data", "data", type=click.Path(exists=True, file_okay=False), default=None,
              help="A `dd build-dataset` data set: token marginals (onestep) and its teacher.")
@click.option("--marginal", type=click.Choice(["class", "global"]), default="class", show_default=True,
              help="onestep: marginals given the class label, or pooled over classes.")
@click.option("--compare", is_flag=True, default=False,
              help="Write compare.png: rows teacher (flow map) / DD-1 / DD-2 / teacher-mixed, same noise and labels.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None,
              help="Samples to draw. Default: 64 (8 with --compare).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-sample noise, labels and draws.")
@click.option("--labels", "labels", default="balanced", show_default=True,
              help="balanced | uniform (as `dd build-dataset`) | comma-separated class ids (cycled).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... Default: cuda when available.")
@click.option("--png", is_flag=True, default=False, help="Also write one PNG per sample into OUT/png.")
@click.option("--grid-max", type=click.IntRange(min=1), default=64, show_default=True, help="Images in grid.png.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the run's EMA weights.")
@click.option("--warmup", is_flag=True, default=False, help="Run one untimed batch first (timing only).")
@click.option("--cfg-scale", "cfg_scale", type=float, default=None, help="Teacher CFG scale (teacher parts).")
@click.option("--temperature", type=float, default=None, help="Teacher temperature (teacher parts).")
@click.option("--top-k", "top_k", type=int, default=None, help="Teacher top-k (teacher parts).")
@click.option("--top-p", "top_p", type=float, default=None, help="Teacher top-p (teacher parts).")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
def sample_cmd(out, run, steps, timesteps, split, snap, regen, baseline, skip_fill, data, marginal, compare,
               num_samples, batch_size, seed, labels, device, png, grid_max, ema, warmup, cfg_scale,
               temperature, top_k, top_p, no_progress):
    """Sample with a DD student (1/2-step, teacher-mixed) or a baseline; write images, tokens, timing.

    \b
      dd sample --run RUN --out OUT                        # DD with all trained timesteps
      dd sample --run RUN --out OUT --steps 1              # one step
      dd sample --run RUN --out OUT --regen 41:81          # pre-trained-41-81 (teacher-mixed)
      dd sample --run RUN --out OUT --baseline skip-106    # teacher, last 106 steps skipped
      dd sample --data DS --out OUT --baseline onestep     # independent token marginals
      dd sample --run RUN --out OUT --compare --num-samples 8
    """
    device = device or _default_device()
    num_samples = num_samples or (8 if compare else 64)
    overrides = {"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    modes = [n for n, v in (("--regen", regen), ("--baseline", baseline), ("--compare", compare)) if v]
    if len(modes) > 1:
        _fail(f"{' and '.join(modes)} cannot be combined")
    if (steps is not None or timesteps is not None) and (regen or baseline):
        _fail("--steps/--timesteps apply to DD sampling, not to --regen or --baseline")
    n_skip = None
    if baseline is not None:
        if baseline == "onestep":
            if data is None:
                _fail("--baseline onestep needs --data (a `dd build-dataset` directory)")
        elif baseline == "teacher" or baseline.startswith("skip-"):
            try:
                n_skip = 0 if baseline == "teacher" else int(baseline[5:])
            except ValueError:
                _fail(f"--baseline {baseline!r}: expected skip-N with an integer N, teacher, or onestep")
            if run is None and data is None:
                _fail(f"--baseline {baseline} needs a teacher: give --run or --data")
        else:
            _fail(f"--baseline {baseline!r}: choose skip-N, teacher or onestep")
    elif run is None:
        _fail("give --run (DD sampling) or --baseline with --data")

    try:
        student, info, teacher = None, {}, None
        if run is not None and baseline != "onestep":
            student, info, teacher = _load_run(run, device, ema)
            sampling = _sampling(teacher, _run_sampling_base(info), overrides)
        else:
            from .dataset import read_manifest
            from .teacher_spec import TeacherSpec
            m = read_manifest(data)
            teacher = TeacherSpec.from_dict(m["teacher_spec"]).load(device)
            sampling = _sampling(teacher, m["settings"].get("sampling"), overrides)
        _check_labels(labels, teacher.num_classes)
        trained = tuple(student.config.timesteps) if student is not None else ()
        if split is None and student is not None:
            split = int(student.config.split)
        if compare:
            return _compare(out, student, teacher, info, trained, split, snap, regen, sampling, seed,
                            num_samples, labels, device)
        if baseline == "onestep":
            marg = TokenMarginals.from_dataset(data, conditional=marginal == "class")
            plan = Plan("onestep", teacher, marginals=marg)
        elif n_skip is not None:
            if not 0 <= n_skip < teacher.num_steps:
                _fail(f"--baseline skip-{n_skip}: N must be in [0, {teacher.num_steps - 1}]")
            if skip_fill == "drop" and n_skip and teacher.family != "var":
                _fail(f"--skip-fill drop: the {teacher.family} tokenizer cannot decode a partial token sequence")
            plan = Plan("skip", teacher, sampling=sampling, n_skip=n_skip, skip_fill=skip_fill)
        elif regen is not None:
            a, b = parse_regen(regen)
            check_regen(a, b, trained, teacher.num_steps)
            plan = Plan("regen", teacher, student, split=split, snap=snap, regen=(a, b), sampling=sampling)
        else:
            if timesteps is not None and steps is not None:
                _fail("give --steps or --timesteps, not both")
            if timesteps is not None:
                ts = check_timesteps(parse_timesteps(timesteps), teacher.num_steps)
                untrained = [t for t in ts if t not in trained]
                if untrained:
                    click.echo(f"warning: timesteps {untrained} were not trained (trained: {list(trained)})", err=True)
            else:
                k = len(trained) if steps is None else steps
                if k > len(trained):
                    _fail(f"--steps {k}: the run was trained for {len(trained)} timestep(s) {list(trained)}")
                ts = check_timesteps(trained[:k], teacher.num_steps)
            plan = Plan("dd", teacher, student, timesteps=ts, split=split, snap=snap)
        _run_plan(plan, out, num_samples=num_samples, batch_size=batch_size, seed=seed, labels=labels,
                  device=device, png=png, grid_max=grid_max, warmup=warmup, progress=not no_progress,
                  settings={"run": os.path.abspath(run) if run else None,
                            "data": os.path.abspath(data) if data else None, "marginal": marginal,
                            "sampling": sampling.to_dict(), "ema": ema})
    except click.ClickException:
        raise
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)
    except Exception as e:  # noqa: BLE001 - data set / run errors of other modules
        from .dataset import DatasetError
        if isinstance(e, DatasetError):
            _fail(e)
        raise


def _run_plan(plan: Plan, out: str, *, num_samples: int, batch_size: int, seed: int, labels: str, device,
              png: bool, grid_max: int, warmup: bool, progress: bool, settings: dict,
              log: Callable[[str], None] = click.echo) -> dict:
    from tqdm import tqdm
    t = plan.teacher
    if warmup:
        idx = list(range(min(batch_size, num_samples)))
        plan.run(seed, idx, make_labels(seed, idx, t.num_classes, labels).to(device), device)
    n_tok = t.num_tokens if not (plan.mode == "skip" and plan.skip_fill == "drop") \
        else t.step_offsets[t.num_steps - plan.n_skip]
    writer = None
    sw_model, sw_dec = Stopwatch(device), Stopwatch(device)
    t0 = time.perf_counter()
    bar = tqdm(total=num_samples, unit="img", disable=not progress, desc=plan.describe())
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(start + batch_size, num_samples)))
        lab = make_labels(seed, idx, t.num_classes, labels).to(device)
        with sw_model:
            x, tok = plan.run(seed, idx, lab, device)
        with sw_dec:
            imgs = t.decode(x)
        arr = to_uint8(imgs)
        if writer is None:
            writer = SampleWriter(out, num_samples, arr.shape[1:], n_tok, t.vocab_size, png=png, grid_max=grid_max)
        writer.add(idx, arr, lab, tok)
        bar.update(len(idx))
    bar.close()
    writer.close()
    total = time.perf_counter() - t0
    rec = timing_record(num_samples, sw_model.seconds, sw_dec.seconds, total, mode=plan.describe(),
                        batch_size=batch_size, device=str(device), warmup=warmup)
    line = timing_line(rec)
    log(line)
    rec["line"] = line
    with open(os.path.join(out, "timing.json"), "w") as f:
        json.dump(rec, f, indent=1)
    meta = {"mode": plan.mode, "describe": plan.describe(), "timesteps": list(plan.timesteps),
            "split": plan.split, "snap": plan.snap, "regen": list(plan.regen) if plan.regen else None,
            "n_skip": plan.n_skip if plan.mode == "skip" else None,
            "skip_fill": plan.skip_fill if plan.mode == "skip" else None,
            "num_samples": num_samples, "batch_size": batch_size, "seed": seed, "labels": labels,
            "device": str(device), "teacher": t.describe(), **settings}
    with open(os.path.join(out, "sample.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    log(f"wrote {num_samples} samples to {out} (samples.npz, tokens.npy, grid.png"
        + (", png/" if png else "") + ", timing.json)")
    return rec


@torch.no_grad()
def _compare(out, student, teacher, info, trained, split, snap, regen, sampling, seed, num, labels, device):
    """compare.png: teacher (flow map) / DD-1 / DD-2 / teacher-mixed on the same noise and labels."""
    from .dataset import generate_pairs, sample_noise
    if student is None:
        _fail("--compare needs --run")
    idx = list(range(num))
    lab = make_labels(seed, idx, teacher.num_classes, labels).to(device)
    noise = sample_noise(seed, idx, teacher.num_tokens, teacher.embed_dim).to(device)
    rows = []
    tok = generate_pairs(teacher, lab, noise, sampling, _run_flow_map(info))
    rows.append(("teacher", to_uint8(teacher.decode(tok))))
    x, _ = dd_sample(student, noise, lab, trained[:1], split=split, snap=snap)
    rows.append(("DD-1", to_uint8(teacher.decode(x))))
    if len(trained) >= 2:
        x, _ = dd_sample(student, noise, lab, trained[:2], split=split, snap=snap)
        rows.append(("DD-2", to_uint8(teacher.decode(x))))
    rg = parse_regen(regen) if regen else default_regen(trained)
    if rg is not None:
        check_regen(rg[0], rg[1], trained, teacher.num_steps)
        x, _ = regen_sample(student, teacher, noise, lab, rg, sampling, sample_generators(seed, idx, "draw", device),
                            split=split, snap=snap)
        rows.append((f"mixed {rg[0]}-{rg[1]}", to_uint8(teacher.decode(x))))
    os.makedirs(out, exist_ok=True)
    save_png(labelled_rows(rows), os.path.join(out, "compare.png"))
    click.echo(f"wrote {os.path.join(out, 'compare.png')}: rows {', '.join(n for n, _ in rows)}; "
               f"labels {lab.tolist()}")
