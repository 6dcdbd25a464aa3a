"""`dd sample`'s outputs on the shard store (`shard_store.py`, schema `SAMPLES`), so that a long
sampling run (50k images of a 256-step teacher for FID) resumes after a kill, splits its sample
indices over torchrun ranks, and can be verified.

Shard k holds the samples of indices [k*S, (k+1)*S): `images` uint8 [m, H, W, 3], `labels` [m] int64,
`tokens` [m, n'] (int16 when the vocabulary fits, else int32; n' < n for skip-N with fill "drop") and
`index` [m] int64. Noise, labels and draws are seeded per sample index (`seeding.py`) and batches
never straddle shards, so every shard, and hence every output, is the same whatever the world size,
and a resumed run equals an uninterrupted one byte for byte. When all shards are there, rank 0
assembles the outputs from them, in index order:

    samples.npz   ADM format: arr_0 uint8 [N, H, W, 3], arr_1 int64 labels [N]   (`adm_npz.py`)
    tokens.npy    [N, n'] the tokens of every sample
    grid.png      the first --grid-max images;  png/<index:06d>.png with --png
    timing.json   model / decoder seconds of the samples this invocation made (rank 0's)
    sample.json   the settings
    prompts.txt   text-to-image: "<index>\t<prompt>" of every sample (arr_1 holds caption indices)

The shards stay beside them (the source of truth of `verify_samples`): the images take twice their
size on disk.
"""
from __future__ import annotations

import io
import os
import time
import zipfile
from typing import Callable, List, Optional

import numpy as np
import torch

from .adm_npz import AdmNpzReader, write_adm_npz
from .distributed import dist_info
from .fileio import atomic_write, file_sha256, json_bytes, normalise_json, replace_dir, tmp_path
from .images import make_grid, save_png, to_uint8
from .samplers import SamplePlan
from .seeding import make_labels
from .shard_store import ShardSchema, ShardStore, build_shards
from .timing import Stopwatch, timing_line, timing_record

SAMPLES_FILE = "samples.npz"
TOKENS_FILE = "tokens.npy"
GRID_FILE = "grid.png"
PROMPTS_FILE = "prompts.txt"
PNG_DIR = "png"


def sample_shapes(settings: dict, m: int) -> dict:
    """The tensors of a sample shard of m samples."""
    return {"images": (m, *settings["image_shape"]), "labels": (m,), "tokens": (m, settings["num_tokens"]),
            "index": (m,)}


SAMPLES = ShardSchema(format="dd-samples", version=1, made_by="`dd sample`", noun="sample set", unit="images",
                      shapes=sample_shapes)


def sample_store(out: str) -> ShardStore:
    return ShardStore(out, SAMPLES)


def sample_settings(plan: SamplePlan, *, seed: int, labels: str, shard_size: int, run: Optional[str],
                    ema: bool, data: Optional[str], marginal: str) -> dict:
    """What decides the samples: a directory is only ever completed with equal settings."""
    t = plan.teacher
    weights = None
    if run is not None:
        from .student_run import RAW_WEIGHTS_FILE, WEIGHTS_FILE
        name = WEIGHTS_FILE if ema or not os.path.exists(os.path.join(run, RAW_WEIGHTS_FILE)) else RAW_WEIGHTS_FILE
        weights = file_sha256(os.path.join(run, name))
    return normalise_json({
        "sampler": plan.kind, "describe": plan.describe(), "timesteps": list(plan.timesteps), "split": plan.split,
        "snap": plan.snap, "regen": list(plan.regen) if plan.regen else None,
        "n_skip": plan.n_skip if plan.kind == "skip" else None,
        "skip_fill": plan.skip_fill if plan.kind == "skip" else None,
        "teacher": t.describe(), "sampling": plan.sampling.to_dict() if plan.sampling is not None else None,
        "run": os.path.abspath(run) if run else None, "ema": ema, "student_sha256": weights,
        "data": os.path.abspath(data) if data else None, "marginal": marginal if plan.kind == "onestep" else None,
        "seed": int(seed), "labels": labels, "shard_size": int(shard_size),
        "num_classes": int(t.num_classes if plan.captions is None else len(plan.captions)),
        **({} if plan.captions is None else {"condition": plan.captions.settings()}),
        "image_shape": [int(t.image_size), int(t.image_size), 3], "num_tokens": int(plan.num_tokens),
        "token_dtype": "int16" if t.vocab_size <= 2 ** 15 else "int32",
    })


def build_samples(out: str, plan: SamplePlan, settings: dict, *, num_samples: int, batch_size: int, device,
                  warmup: bool = False, png: bool = False, grid_max: int = 64, show_progress: bool = True,
                  log: Callable[[str], None] = print) -> Optional[dict]:
    """Make (or complete, or extend) the samples in `out` and, on rank 0, assemble the outputs.
    Collective under torch.distributed. Returns rank 0's timing record (None elsewhere, or when every
    shard was already there)."""
    rank, world = dist_info()
    t = plan.teacher
    seed, spec = settings["seed"], settings["labels"]
    tdtype = getattr(torch, settings["token_dtype"])
    if warmup:
        idx = list(range(min(batch_size, num_samples)))
        plan.run(seed, idx, make_labels(seed, idx, settings["num_classes"], spec).to(device), device)
    sw_model, sw_dec = Stopwatch(device), Stopwatch(device)
    made = [0]

    def produce(k, start, count, on_batch):
        images, labels, tokens = [], [], []
        for b0 in range(start, start + count, batch_size):
            idx = list(range(b0, min(b0 + batch_size, start + count)))
            lab = make_labels(seed, idx, settings["num_classes"], spec).to(device)
            with sw_model:
                x, tok = plan.run(seed, idx, lab, device)
            with sw_dec:
                arr = to_uint8(t.decode(x))
            if list(arr.shape[1:]) != settings["image_shape"]:
                raise ValueError(f"the decoder made images {arr.shape[1:]}, expected {settings['image_shape']}")
            images.append(torch.from_numpy(arr))
            labels.append(lab.long().cpu())
            tokens.append(tok.cpu().to(tdtype))
            made[0] += len(idx)
            if on_batch is not None:
                on_batch(len(idx))
        return {"images": torch.cat(images), "labels": torch.cat(labels), "tokens": torch.cat(tokens),
                "index": torch.arange(start, start + count, dtype=torch.long)}

    t0 = time.perf_counter()
    build_info = {"torch": torch.__version__, "device": str(device), "batch_size": batch_size, "world_size": world}
    manifest = build_shards(sample_store(out), settings, num_samples, produce, extra={}, build_info=build_info,
                            show_progress=show_progress, desc=plan.describe(), log=log)
    total = time.perf_counter() - t0
    if rank != 0:
        return None
    assemble_outputs(out, manifest, png=png, grid_max=grid_max)
    rec = None
    if made[0]:
        rec = timing_record(made[0], sw_model.seconds, sw_dec.seconds, total, mode=plan.describe(),
                            batch_size=batch_size, device=str(device), warmup=warmup, world_size=world)
        rec["line"] = timing_line(rec)
        log(rec["line"])
        atomic_write(os.path.join(out, "timing.json"), json_bytes(rec))
    meta = dict(settings, num_samples=num_samples, batch_size=batch_size, device=str(device), world_size=world)
    atomic_write(os.path.join(out, "sample.json"), json_bytes(meta))
    log(f"wrote {num_samples} samples to {out} ({SAMPLES_FILE}, {TOKENS_FILE}, {GRID_FILE}"
        + (", png/" if png else "") + (", timing.json" if rec else "") + ")")
    return rec


def write_prompts(out: str, captions, settings: dict, num_samples: int) -> None:
    """prompts.txt of a text-to-image sample set: the prompt of each sample, in grid order (rank 0,
    after `build_samples`; `captions` a `captions.CaptionTable`)."""
    ids = make_labels(settings["seed"], range(num_samples), settings["num_classes"], settings["labels"]).tolist()
    atomic_write(os.path.join(out, PROMPTS_FILE),
                 "".join(f"{i}\t{captions.prompts[c]}\n" for i, c in enumerate(ids)).encode())


def _shards(store: ShardStore, manifest: dict):
    for e in manifest["shards"]:
        yield store.load_shard(e)


def assemble_outputs(out: str, manifest: dict, png: bool = False, grid_max: int = 64) -> None:
    """samples.npz, tokens.npy, grid.png (and png/) from the shards of a complete sample set, in index
    order; a pure function of the shards' bytes. png/ is written as a temporary folder and moved into
    place whole (a killed run leaves no partial image set); an existing png/ is always rewritten, so
    it never holds images of an earlier, smaller run."""
    store = sample_store(out)
    st = manifest["settings"]
    num = manifest["num_samples"]
    labels, tokens, grid = [], [], []
    png_dir = os.path.join(out, PNG_DIR)
    png = png or os.path.isdir(png_dir)
    png_tmp = tmp_path(png_dir)
    if png:
        os.makedirs(png_tmp)

    def images():
        for sh in _shards(store, manifest):
            arr = sh["images"].numpy()
            labels.append(sh["labels"].numpy())
            tokens.append(sh["tokens"].numpy())
            if len(grid) < grid_max:
                grid.extend(arr[:grid_max - len(grid)])
            if png:
                for i, im in zip(sh["index"].tolist(), arr):
                    save_png(im, os.path.join(png_tmp, f"{i:06d}.png"), atomic=False)
            yield arr

    # labels are only known after the images streamed by: arr_1 is written from the shards again
    write_adm_npz(os.path.join(out, SAMPLES_FILE), num, tuple(st["image_shape"]), images(),
                  labels=_labels_of(store, manifest))
    buf = io.BytesIO()
    np.save(buf, np.concatenate(tokens) if tokens else np.zeros((0, st["num_tokens"]), st["token_dtype"]))
    atomic_write(os.path.join(out, TOKENS_FILE), buf.getvalue())
    if grid:
        save_png(make_grid(np.stack(grid)), os.path.join(out, GRID_FILE))
    if png:
        replace_dir(png_tmp, png_dir)


def _labels_of(store: ShardStore, manifest: dict) -> np.ndarray:
    from safetensors import safe_open
    parts = []
    for e in manifest["shards"]:
        with safe_open(store.path(e["file"]), framework="pt") as f:
            parts.append(f.get_tensor("labels").numpy())
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def verify_samples(out: str, log: Callable[[str], None] = print) -> List[str]:
    """Problems (empty = good) of a sample directory: the store's checks (sizes, sha256, index
    ranges), labels equal to those of (seed, index), and samples.npz / tokens.npy equal to the shards."""
    store = sample_store(out)

    def check(st, e, t):
        want = make_labels(st["seed"], t["index"], st["num_classes"], st["labels"])
        return [] if torch.equal(t["labels"], want) else [f"shard {e['file']}: labels differ from those of (seed, index)"]

    problems = store.verify(check, log=log)
    if problems:
        return problems
    m = store.read_manifest()
    path = os.path.join(out, SAMPLES_FILE)
    if not os.path.exists(path):
        return [f"{path} is missing (re-run the `dd sample` command to assemble it)"]
    try:
        problems += _compare_outputs(out, path, store, m)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        problems.append(f"{path} or {TOKENS_FILE} is unreadable or corrupt ({e})")
    log(f"{SAMPLES_FILE} and {TOKENS_FILE}: " + ("equal to the shards" if not problems else f"{len(problems)} problem(s)"))
    return problems


def _compare_outputs(out: str, path: str, store: ShardStore, m: dict) -> List[str]:
    problems = []
    reader = AdmNpzReader(path)
    if reader.shape[0] != m["num_samples"]:
        return [f"{path} holds {reader.shape[0]} images, the shards {m['num_samples']}"]
    tokens = np.load(os.path.join(out, TOKENS_FILE))
    offset = 0
    for sh, arr in zip(_shards(store, m), reader.batches(m["settings"]["shard_size"], m["num_samples"])):
        n = len(sh["index"])
        if not np.array_equal(arr, sh["images"].numpy()):
            problems.append(f"{SAMPLES_FILE}: images {offset}..{offset + n - 1} differ from the shards")
        if not np.array_equal(tokens[offset:offset + n], sh["tokens"].numpy()):
            problems.append(f"{TOKENS_FILE}: tokens {offset}..{offset + n - 1} differ from the shards")
        offset += n
    with np.load(path) as z:
        if not np.array_equal(z["arr_1"], _labels_of(store, m)):
            problems.append(f"{SAMPLES_FILE}: arr_1 (labels) differs from the shards")
    return problems
