"""(noise, tokens) training pairs for Distilled Decoding: definition, sharded storage, loading.

**The data.** A pair is (eps, tokens) for one class label: eps [n, C] is one N(0, I_C) vector per
token, and tokens [n] are what the teacher generates when, at every AR step, the multinomial draw is
replaced by the flow map (`distilled_decoding.flowmap.flow_map`) applied to that step's slice of
eps. `generate_pairs` is the one definition; `dd dataset verify` and the teacher-mixed sampler reuse
it.

**Per-sample randomness.** A sample's noise and label depend only on (seed, global sample index),
never on the batch, shard, rank or run that made it. Each draws from its own CPU `torch.Generator`,
seeded with the first 8 bytes (little-endian, top bit cleared) of blake2b("<stream>:<seed>:<index>"):

- noise:  stream "noise", `torch.randn(n, C)` in generation order (VAR: scale by scale, row-major).
- labels, `uniform`: stream "label", `torch.randint(num_classes, (1,))`.
- labels, `balanced`: sample i sits in block b = i // num_classes; stream "balanced" seeded with b
  gives `torch.randperm(num_classes)` and sample i takes entry i % num_classes. Every complete block
  of num_classes consecutive indices holds each class exactly once.

**Noise is regenerated, not stored** (by default). VAR's 680x32 fp32 noise is 87 KB a sample (over
100 GB at 1.2M pairs) against 1.4 KB of int16 tokens, and regenerating it costs about 0.1 ms a
sample. Since the CPU RNG's output could change across torch versions, the manifest stores a
fingerprint (sha256 of the noise of samples 0..3); `PairDataset` refuses to regenerate when the
fingerprint differs, and `--store-noise` keeps the fp32 noise in the shards for the cautious.

**Shards.** Shard k always covers global indices [k*S, min((k+1)*S, N)) (S = shard size), so its
contents do not depend on batch size, rank count or interruptions; batches never straddle shards.
Each shard is a safetensors file `shard-<k:05d>.safetensors` with `tokens` [m, n] (int16 when the
vocabulary fits, else int32), `labels` [m] int32, `index` [m] int64 and optionally `noise`
[m, n, C] fp32. Files are written atomically (temporary file, fsync, rename), followed by a record
`.progress/shard-<k:05d>.json` (count, sha256, size). `manifest.json` holds the settings (teacher
identity, sampling, flow map, seed, labels, shard size, ...), `num_samples`, a `complete` flag and,
once complete, the shard list with counts and sha256.

**Resume.** Re-running the same command skips finished shards (recorded, present, right size,
parseable) and recomputes the rest; with the same batch size and device the result is byte-identical
to an uninterrupted run. A larger `--num-samples` extends a data set. A directory made with other
settings is refused, naming each differing setting; nothing already written is ever deleted except
stale temporary files.

**Several processes.** Under torchrun every rank loads the teacher, rank 0 checks the directory and
lists the shards still to do, rank r builds every world-th of them, and rank 0 writes the final
manifest after a barrier (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import bisect
import datetime
import functools
import glob
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import click
import numpy as np
import torch
from torch.utils.data import Dataset

from teachers.base import SamplingConfig, Teacher

from .dpm_solver import SPACINGS, VARIANTS
from .flowmap import GRID_SCALES, LEGACY, FlowMapConfig, codebook_warning, flow_map
from .teacher_spec import TeacherSpec, resolve_sampling, teacher_options

FORMAT = "dd-pairs"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS_DIR = ".progress"
LABEL_MODES = ("uniform", "balanced")
# FlowMapConfig fields that change how, not what, is computed (kept in the manifest, not compared).
FLOW_MAP_NON_DATA = ("mem_budget_mb",)


class DatasetError(RuntimeError):
    """A data set directory that cannot be used as asked (other settings, corrupt shard, ...)."""


# ---- per-sample randomness ----------------------------------------------------------------------
def sample_seed(seed: int, index: int, stream: str) -> int:
    """The 63-bit generator seed of one sample's `stream` ("noise", "label", "balanced")."""
    h = hashlib.blake2b(f"{stream}:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _generator(seed: int, index: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index, stream))


def _as_list(indices) -> list:
    if isinstance(indices, torch.Tensor):
        return indices.reshape(-1).tolist()
    return [int(i) for i in indices]


def sample_noise(seed: int, indices, n: int, C: int) -> torch.Tensor:
    """indices [B] global sample indices -> noise [B, n, C] fp32 on the CPU."""
    idx = _as_list(indices)
    out = torch.empty(len(idx), n, C)
    for b, i in enumerate(idx):
        out[b].normal_(generator=_generator(seed, i, "noise"))  # = torch.randn(n, C, generator=...)
    return out


def sample_labels(seed: int, indices, num_classes: int, balanced: bool) -> torch.Tensor:
    """indices [B] -> class labels [B] int64 (see the module docstring for both modes)."""
    idx = _as_list(indices)
    if not balanced:
        return torch.tensor([int(torch.randint(num_classes, (1,), generator=_generator(seed, i, "label")))
                             for i in idx], dtype=torch.long)
    perms = {}
    out = []
    for i in idx:
        block = i // num_classes
        if block not in perms:
            perms[block] = torch.randperm(num_classes, generator=_generator(seed, block, "balanced"))
        out.append(int(perms[block][i % num_classes]))
    return torch.tensor(out, dtype=torch.long)


def noise_fingerprint(seed: int, n: int, C: int) -> str:
    """sha256 (16 hex) of the noise of samples 0..3: detects a changed CPU RNG."""
    return hashlib.sha256(sample_noise(seed, range(4), n, C).numpy().tobytes()).hexdigest()[:16]


# ---- the pair definition ------------------------------------------------------------------------
@torch.no_grad()
def generate_pairs(teacher: Teacher, labels: torch.Tensor, eps: torch.Tensor, sampling: SamplingConfig,
                   fm_config: FlowMapConfig, codebook: Optional[torch.Tensor] = None,
                   progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """labels [B], eps [B, n, C] -> tokens [B, n] int64 (on the teacher's device).

    The teacher's KV-cached AR loop where step s chooses `flow_map(eps[:, offs[s]:offs[s+1]],
    probs, codebook, fm_config)` instead of a multinomial draw.
    codebook: [V, C] fp32, `teacher.codebook` unless given (pass it to skip recomputing it).
    """
    dev = teacher.device
    cb = (teacher.codebook if codebook is None else codebook).to(dev, torch.float32)
    eps = eps.to(dev, torch.float32)
    offs = teacher.step_offsets
    if eps.shape[1:] != (teacher.num_tokens, cb.shape[1]):
        raise ValueError(f"eps is {tuple(eps.shape)}, expected [B, {teacher.num_tokens}, {cb.shape[1]}]")

    def choose(s: int, probs: torch.Tensor) -> torch.Tensor:
        return flow_map(eps[:, offs[s]:offs[s + 1]], probs, cb, fm_config)  # [B, k_s]

    return teacher.generate(labels.to(dev), sampling, choose, progress=progress)


# ---- small file helpers -------------------------------------------------------------------------
def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_bounds(k: int, shard_size: int, num_samples: int) -> tuple:
    """(start, count) of shard k."""
    start = k * shard_size
    return start, max(0, min(shard_size, num_samples - start))


def num_shards(num_samples: int, shard_size: int) -> int:
    return -(-num_samples // shard_size)


def token_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 2 ** 15 else torch.int32


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete (tmp, fsync, rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def _normalise(obj):
    """JSON round trip, so tuples and lists (and int keys) compare equal."""
    return json.loads(json.dumps(obj))


def diff_settings(old, new, prefix: str = "") -> list:
    """Dotted names of the leaves that differ between two JSON-like trees, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append((name, "<absent>", new[k]))
            elif k not in new:
                out.append((name, old[k], "<absent>"))
            else:
                out += diff_settings(old[k], new[k], name)
        return out
    return [] if old == new else [(prefix or "<root>", old, new)]


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        raise DatasetError(f"{root}: no {MANIFEST} (not a data set made by `dd build-dataset`)")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable manifest ({e})") from e
    if m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format {m.get('format')!r} v{m.get('format_version')}, "
                           f"this code reads {FORMAT!r} v{FORMAT_VERSION}")
    fm = m.get("settings", {}).get("flow_map")
    if isinstance(fm, dict):  # a manifest from before a flow-map field existed: the map that built it
        m["settings"]["flow_map"] = {**LEGACY, **fm}
    return m


def check_shard(root: str, entry: dict, settings: dict, *, verify_hash: bool) -> None:
    """Raise DatasetError naming the shard unless its file exists, has the recorded size (and sha256
    when `verify_hash`), parses as safetensors and holds tensors of the recorded count and shapes."""
    from safetensors import safe_open
    path = os.path.join(root, entry["file"])
    name = entry["file"]
    if not os.path.exists(path):
        raise DatasetError(f"shard {name} is missing ({path})")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise DatasetError(f"shard {name} is corrupt or truncated: {size} bytes, manifest says {entry['bytes']}")
    if verify_hash:
        from teachers.checkpoint import file_sha256
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise DatasetError(f"shard {name} is corrupt: sha256 {digest[:16]}..., manifest says "
                               f"{entry['sha256'][:16]}...")
    m, n, C = entry["count"], settings["num_tokens"], settings["embed_dim"]
    want = {"tokens": (m, n), "labels": (m,), "index": (m,)}
    if settings["store_noise"]:
        want["noise"] = (m, n, C)
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt shard
        raise DatasetError(f"shard {name} is corrupt: it does not parse as safetensors ({e})") from e
    if shapes != want:
        raise DatasetError(f"shard {name} is corrupt: tensors {shapes}, expected {want}")


# ---- building -----------------------------------------------------------------------------------
def dataset_settings(teacher: Teacher, spec: TeacherSpec, sampling: SamplingConfig, fm_config: FlowMapConfig,
                     seed: int, labels: str, shard_size: int, store_noise: bool) -> dict:
    """The settings that decide the data: a directory is only ever completed with equal ones."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels {labels!r}: choose from {LABEL_MODES}")
    fm = {k: v for k, v in fm_config.to_dict().items() if k not in FLOW_MAP_NON_DATA}
    return _normalise({
        "teacher": teacher.describe(),
        "teacher_dtype": spec.dtype,
        "sampling": sampling.to_dict(),
        "flow_map": fm,
        "seed": int(seed),
        "labels": labels,
        "num_classes": int(teacher.num_classes),
        "shard_size": int(shard_size),
        "store_noise": bool(store_noise),
        "num_tokens": int(teacher.num_tokens),
        "embed_dim": int(teacher.embed_dim),
        "vocab_size": int(teacher.vocab_size),
        "step_sizes": list(teacher.step_sizes),
        "token_dtype": str(token_dtype(teacher.vocab_size)).replace("torch.", ""),
        "noise_fingerprint": noise_fingerprint(seed, teacher.num_tokens, teacher.embed_dim),
    })


def _progress_path(root: str, k: int) -> str:
    return os.path.join(root, PROGRESS_DIR, f"shard-{k:05d}.json")


def _finished_shards(root: str, manifest: Optional[dict], settings: dict, num_samples: int,
                     warn: Callable[[str], None]) -> dict:
    """{k: entry} of the shards that are done for `num_samples` and intact on disk (size + parse)."""
    records = {}
    for e in (manifest or {}).get("shards", []):
        records[e["shard"]] = e
    for p in sorted(glob.glob(os.path.join(root, PROGRESS_DIR, "shard-*.json"))):
        try:
            with open(p) as f:
                e = json.load(f)
            records[e["shard"]] = e
        except (OSError, json.JSONDecodeError, KeyError):
            warn(f"ignoring unreadable progress record {p}")
    done = {}
    S = settings["shard_size"]
    for k, e in sorted(records.items()):
        start, count = shard_bounds(k, S, num_samples)
        if count == 0 or e.get("start") != start or e.get("count") != count:
            continue  # e.g. the old last shard of a data set being extended: rebuilt
        try:
            check_shard(root, e, settings, verify_hash=False)
        except DatasetError as err:
            warn(f"{err}; rebuilding it")
            continue
        done[k] = e
    return done


def _dist_info() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def build_shard(teacher: Teacher, k: int, *, settings: dict, num_samples: int, sampling: SamplingConfig,
                fm_config: FlowMapConfig, batch_size: int, codebook: torch.Tensor,
                on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Compute shard k in batches of `batch_size` (never straddling shards) -> its tensors (CPU).

    The next batch's noise is drawn on a CPU thread while the teacher runs the current one.
    """
    start, count = shard_bounds(k, settings["shard_size"], num_samples)
    n, C, seed = settings["num_tokens"], settings["embed_dim"], settings["seed"]
    index = torch.arange(start, start + count, dtype=torch.long)
    labels = sample_labels(seed, index, settings["num_classes"], settings["labels"] == "balanced")
    batches = index.split(batch_size)
    tokens, noises = [], []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(sample_noise, seed, batches[0], n, C)
        for j, idx in enumerate(batches):
            eps = pending.result()                                           # [b, n, C]
            if j + 1 < len(batches):
                pending = pool.submit(sample_noise, seed, batches[j + 1], n, C)
            b0 = j * batch_size
            tok = generate_pairs(teacher, labels[b0:b0 + len(idx)], eps, sampling, fm_config, codebook=codebook)
            tokens.append(tok.cpu())
            if settings["store_noise"]:
                noises.append(eps)
            if on_batch is not None:
                on_batch(len(idx))
    out = {"tokens": torch.cat(tokens).to(getattr(torch, settings["token_dtype"])),
           "labels": labels.to(torch.int32), "index": index}
    if settings["store_noise"]:
        out["noise"] = torch.cat(noises)
    return out


def write_shard(root: str, k: int, tensors: dict) -> dict:
    """Write shard k atomically, then its progress record; return the record."""
    from safetensors.torch import save
    data = save({name: t.contiguous() for name, t in tensors.items()},
                metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
    atomic_write(os.path.join(root, shard_name(k)), data)
    index = tensors["index"]
    entry = {"shard": k, "file": shard_name(k), "start": int(index[0]) if len(index) else 0,
             "count": int(index.numel()), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write(_progress_path(root, k), _json_bytes(entry))
    return entry


def build_dataset(out: str, teacher: Teacher, spec: TeacherSpec, *, num_samples: int,
                  sampling: SamplingConfig, fm_config: FlowMapConfig, seed: int = 0, labels: str = "balanced",
                  shard_size: int = 4096, batch_size: int = 64, store_noise: bool = False,
                  show_progress: bool = True, log: Callable[[str], None] = print) -> Optional[dict]:
    """Build (or complete, or extend) the data set in `out`. Returns the manifest on rank 0.

    Collective under torch.distributed: every rank calls it with the same arguments.
    """
    rank, world = _dist_info()
    if num_samples <= 0 or shard_size <= 0 or batch_size <= 0:
        raise ValueError("num_samples, shard_size and batch_size must be positive")
    settings = dataset_settings(teacher, spec, sampling, fm_config, seed, labels, shard_size, store_noise)
    build_info = {"torch": torch.__version__, "device": str(teacher.device), "batch_size": batch_size,
                  "world_size": world, "flow_map": fm_config.to_dict()}
    warn = (lambda msg: log(f"warning: {msg}")) if rank == 0 else (lambda msg: None)
    if rank == 0 and (msg := codebook_warning(teacher.codebook, fm_config)):
        warn(msg)

    plan = None
    if rank == 0:
        try:
            plan = _prepare(out, settings, spec, num_samples, build_info, warn)
        except DatasetError as e:
            plan = {"error": str(e)}
    plan = _broadcast(plan, rank, world)
    if "error" in plan:
        raise DatasetError(plan["error"])
    if plan.get("unchanged"):
        if rank == 0:
            log(f"{out}: complete, {num_samples} pairs with these settings; nothing to build")
        return read_manifest(out) if rank == 0 else None
    todo = plan["todo"]
    mine = todo[rank::world]
    S = shard_size
    my_total = sum(shard_bounds(k, S, num_samples)[1] for k in mine)
    if rank == 0:
        log(f"{out}: {num_shards(num_samples, S)} shards of {S}; {len(plan['done'])} done, {len(todo)} to build"
            + (f" on {world} ranks" if world > 1 else "") + f"; {num_samples} pairs in all")

    codebook = teacher.codebook.to(teacher.device, torch.float32)
    bar = None
    if show_progress and rank == 0 and mine:
        from tqdm.auto import tqdm
        bar = tqdm(total=my_total, unit="pair", desc="build-dataset" + (f" (rank 0 of {world})" if world > 1 else ""),
                   dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    try:
        for k in mine:
            tensors = build_shard(teacher, k, settings=settings, num_samples=num_samples, sampling=sampling,
                                  fm_config=fm_config, batch_size=batch_size, codebook=codebook,
                                  on_batch=bar.update if bar is not None else None)
            write_shard(out, k, tensors)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    _barrier(world)
    manifest = None
    if rank == 0:
        manifest = _finalise(out, settings, spec, num_samples, build_info, warn)
        if my_total:
            log(f"built {len(todo)} shards; rank 0: {my_total} pairs in {elapsed:.1f}s "
                f"({my_total / max(elapsed, 1e-9):.2f} pairs/s)")
    _barrier(world)
    return manifest


def _manifest(settings: dict, spec: TeacherSpec, num_samples: int, build_info: dict, shards: list,
              complete: bool) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": complete,
            "num_samples": int(num_samples), "num_shards": num_shards(num_samples, settings["shard_size"]),
            "settings": settings, "teacher_spec": _normalise(spec.to_dict()),
            "build": dict(build_info, updated=datetime.datetime.now().isoformat(timespec="seconds")),
            "shards": shards}


def _prepare(out: str, settings: dict, spec: TeacherSpec, num_samples: int, build_info: dict,
             warn: Callable[[str], None]) -> dict:
    """Rank 0, before any shard is written: check the directory, clean temporaries, plan the work."""
    old = None
    if os.path.exists(os.path.join(out, MANIFEST)):
        old = read_manifest(out)
        diffs = diff_settings(old["settings"], settings)
        if diffs:
            lines = "\n".join(f"  {name}: {a!r} in {out} vs {b!r} now" for name, a, b in diffs)
            raise DatasetError(f"{out} holds a data set built with other settings:\n{lines}\n"
                               "Use another --out, or the settings it was built with.")
        if num_samples < old["num_samples"]:
            raise DatasetError(f"{out} holds {old['num_samples']} samples; --num-samples {num_samples} "
                               "would shrink it (take a subset when loading instead)")
    elif glob.glob(os.path.join(out, "shard-*.safetensors")):
        raise DatasetError(f"{out} holds shards but no {MANIFEST}; refusing to mix data sets")
    os.makedirs(os.path.join(out, PROGRESS_DIR), exist_ok=True)
    for p in glob.glob(os.path.join(out, "*.tmp.*")) + glob.glob(os.path.join(out, PROGRESS_DIR, "*.tmp.*")):
        os.remove(p)  # temporaries of an interrupted run; finished files are never touched
    done = _finished_shards(out, old, settings, num_samples, warn)
    todo = [k for k in range(num_shards(num_samples, settings["shard_size"])) if k not in done]
    if old is not None and old.get("complete") and not todo and old["num_samples"] == num_samples:
        # Nothing to do: leave manifest.json byte-identical, since training runs record its sha256.
        try:
            os.rmdir(os.path.join(out, PROGRESS_DIR))
        except OSError:
            pass
        return {"done": sorted(done), "todo": [], "unchanged": True}
    shards = [done[k] for k in sorted(done)]
    atomic_write(os.path.join(out, MANIFEST),
                 _json_bytes(_manifest(settings, spec, num_samples, build_info, shards, complete=not todo)))
    return {"done": sorted(done), "todo": todo}


def _finalise(out: str, settings: dict, spec: TeacherSpec, num_samples: int, build_info: dict,
              warn: Callable[[str], None]) -> dict:
    """Rank 0, after every rank's barrier: collect the shard records into the final manifest."""
    old = read_manifest(out)
    done = _finished_shards(out, old, settings, num_samples, warn)
    expected = num_shards(num_samples, settings["shard_size"])
    missing = [k for k in range(expected) if k not in done]
    if missing:
        raise DatasetError(f"{out}: shards {missing[:10]} are missing after the build")
    manifest = _manifest(settings, spec, num_samples, build_info, [done[k] for k in range(expected)], True)
    atomic_write(os.path.join(out, MANIFEST), _json_bytes(manifest))
    for p in glob.glob(os.path.join(out, PROGRESS_DIR, "shard-*.json")):
        os.remove(p)  # the manifest now holds these records
    try:
        os.rmdir(os.path.join(out, PROGRESS_DIR))
    except OSError:
        pass
    return manifest


# ---- reading ------------------------------------------------------------------------------------
class PairDataset(Dataset):
    """A built data set as a map-style Dataset over memory-mapped shards.

    item i -> {"noise": [n, C] fp32, "tokens": [n] int64, "label": int64, "index": int64}; the noise
    is read from the shard when stored, else regenerated from (seed, index). Works with shuffled
    DataLoaders and DistributedSampler (each worker process opens its own file handles).
    On opening, every shard must exist, have the recorded size, parse and hold the recorded count;
    `verify=True` also checks each shard's sha256 (reads every byte).
    """

    def __init__(self, root: str, verify: bool = False, allow_incomplete: bool = False):
        self.root = os.fspath(root)
        self.manifest = read_manifest(self.root)
        if not self.manifest["complete"] and not allow_incomplete:
            raise DatasetError(f"{self.root} is incomplete: re-run its `dd build-dataset` command to finish it")
        self.settings = self.manifest["settings"]
        shards = self.manifest["shards"]
        for e in shards:
            check_shard(self.root, e, self.settings, verify_hash=verify)
        if not self.settings["store_noise"]:
            fp = noise_fingerprint(self.settings["seed"], self.settings["num_tokens"], self.settings["embed_dim"])
            if fp != self.settings["noise_fingerprint"]:
                raise DatasetError(
                    f"{self.root}: this torch ({torch.__version__}) draws different noise from the one that built "
                    f"the data set (torch {self.manifest['build'].get('torch')}); rebuild with --store-noise")
        self.shards = shards
        self._ends = np.cumsum([e["count"] for e in shards]).tolist()
        self._handles: dict = {}
        self._pid = None

    @property
    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec.from_dict(self.manifest["teacher_spec"])

    @property
    def num_tokens(self) -> int:
        return self.settings["num_tokens"]

    @property
    def embed_dim(self) -> int:
        return self.settings["embed_dim"]

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"], d["_pid"] = {}, None
        return d

    def _handle(self, s: int):
        from safetensors import safe_open
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = safe_open(os.path.join(self.root, self.shards[s]["file"]), framework="pt")
        return self._handles[s]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} pairs")
        s = bisect.bisect_right(self._ends, i)
        j = i - (self._ends[s - 1] if s else 0)
        f = self._handle(s)
        index = int(f.get_slice("index")[j:j + 1][0])
        item = {"tokens": f.get_slice("tokens")[j:j + 1][0].long(),
                "label": f.get_slice("labels")[j:j + 1][0].long(),
                "index": torch.tensor(index, dtype=torch.long)}
        if self.settings["store_noise"]:
            item["noise"] = f.get_slice("noise")[j:j + 1][0]
        else:
            item["noise"] = sample_noise(self.settings["seed"], [index], self.num_tokens, self.embed_dim)[0]
        return item


# ---- verify / info ------------------------------------------------------------------------------
def verify_dataset(root: str, recompute: int = 0, *, device: str = "cpu", batch_size: int = 64,
                   spec: Optional[TeacherSpec] = None, sample_seed_: int = 0,
                   log: Callable[[str], None] = print) -> list:
    """Check a data set; return a list of problems (empty = good).

    Every shard: present, recorded size and sha256, parses, counts; `index` is its range; `labels`
    are those of (seed, index); tokens lie in [0, V). With `recompute` > 0, that many random samples
    are regenerated with the teacher + flow map (`generate_pairs`) and compared with the stored tokens.
    spec: the teacher to use instead of the manifest's (e.g. checkpoints moved); its identity
    (`describe()`) must still equal the recorded one.
    """
    m = read_manifest(root)
    st = m["settings"]
    problems = []
    if not m["complete"]:
        problems.append(f"{root} is incomplete ({len(m['shards'])} of {m['num_shards']} shards recorded)")
    expected = [shard_bounds(k, st["shard_size"], m["num_samples"]) for k in range(m["num_shards"])]
    for k, e in enumerate(m["shards"]):
        if e["shard"] != k or (e["start"], e["count"]) != expected[k]:
            problems.append(f"manifest entry {k} ({e['file']}) covers start {e['start']} count {e['count']}, "
                            f"expected {expected[k]}")
            continue
        try:
            check_shard(root, e, st, verify_hash=True)
        except DatasetError as err:
            problems.append(str(err))
            continue
        from safetensors.torch import load_file
        t = load_file(os.path.join(root, e["file"]))
        if not torch.equal(t["index"], torch.arange(e["start"], e["start"] + e["count"])):
            problems.append(f"shard {e['file']}: index is not [{e['start']}, {e['start'] + e['count']})")
        elif not torch.equal(t["labels"].long(), sample_labels(st["seed"], t["index"], st["num_classes"],
                                                              st["labels"] == "balanced")):
            problems.append(f"shard {e['file']}: labels differ from those of (seed, index)")
        tok = t["tokens"].long()
        if tok.numel() and (tok.min() < 0 or tok.max() >= st["vocab_size"]):
            problems.append(f"shard {e['file']}: tokens outside [0, {st['vocab_size']})")
    log(f"checked {len(m['shards'])} shards, {sum(e['count'] for e in m['shards'])} pairs: "
        + ("ok" if not problems else f"{len(problems)} problem(s)"))
    if recompute > 0 and not problems:
        problems += _recompute(root, m, recompute, device=device, batch_size=batch_size, spec=spec,
                               seed=sample_seed_, log=log)
    return problems


def _recompute(root, m, n_check, *, device, batch_size, spec, seed, log) -> list:
    st = m["settings"]
    spec = spec or TeacherSpec.from_dict(m["teacher_spec"])
    teacher = spec.load(device)
    ident = _normalise(teacher.describe())
    if ident != st["teacher"]:
        diffs = diff_settings(st["teacher"], ident, "teacher")
        return ["the teacher loaded for --recompute is not the one recorded: "
                + "; ".join(f"{a}: {b!r} vs {c!r}" for a, b, c in diffs)]
    ds = PairDataset(root)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(ds), generator=g)[:n_check].tolist()
    sampling = SamplingConfig(**st["sampling"])
    fm_config = FlowMapConfig.from_dict(dict(m["build"].get("flow_map", {}), **st["flow_map"]))
    codebook = teacher.codebook.to(teacher.device, torch.float32)
    bad, agree, total, same = [], 0, 0, 0
    for b0 in range(0, len(picks), batch_size):
        items = [ds[i] for i in picks[b0:b0 + batch_size]]
        eps = torch.stack([it["noise"] for it in items])
        labels = torch.stack([it["label"] for it in items])
        stored = torch.stack([it["tokens"] for it in items])
        if st["store_noise"]:
            regen = sample_noise(st["seed"], [int(it["index"]) for it in items], st["num_tokens"], st["embed_dim"])
            if not torch.equal(regen, eps):
                bad.append("stored noise differs from the noise regenerated from (seed, index)")
        got = generate_pairs(teacher, labels, eps, sampling, fm_config, codebook=codebook).cpu()
        agree += int((got == stored).sum())
        total += stored.numel()
        for it, row_ok in zip(items, (got == stored).all(1).tolist()):
            same += row_ok
            if not row_ok:
                bad.append(f"sample {int(it['index'])}: recomputed tokens differ from the stored ones")
    log(f"recomputed {len(picks)} samples: {same} identical, token agreement {agree / max(total, 1):.6f}")
    return bad


def dataset_info(root: str) -> dict:
    m = read_manifest(root)
    st = m["settings"]
    size = sum(e["bytes"] for e in m["shards"])
    return {"dir": os.path.abspath(root), "complete": m["complete"], "num_samples": m["num_samples"],
            "shards": f"{len(m['shards'])} of {m['num_shards']} recorded", "bytes": size,
            "teacher": st["teacher"], "teacher_dtype": st["teacher_dtype"], "sampling": st["sampling"],
            "flow_map": st["flow_map"], "seed": st["seed"], "labels": st["labels"],
            "num_classes": st["num_classes"], "tokens": f"{st['num_tokens']} x {st['token_dtype']} "
            f"(V={st['vocab_size']}, steps {st['step_sizes']})", "embed_dim": st["embed_dim"],
            "noise": "stored (fp32)" if st["store_noise"] else "regenerated from (seed, index)",
            "build": m["build"]}


# ---- CLI ----------------------------------------------------------------------------------------
_FM = FlowMapConfig()  # the defaults shown and used by the CLI live on the dataclass
_FLOW_MAP_OPTIONS = [
    click.option("--nfe", type=click.IntRange(min=1), default=_FM.nfe, show_default=True,
                 help="Flow-map solver evaluations per token."),
    click.option("--order", type=click.IntRange(1, 3), default=_FM.order, show_default=True,
                 help="Multistep DPM-Solver++ order."),
    click.option("--spacing", type=click.Choice(SPACINGS), default=_FM.spacing, show_default=True,
                 help="Solver time spacing."),
    click.option("--t-start", "t_start", type=float, default=_FM.t_start, show_default=True,
                 help="Solver start time (noise at t = 0)."),
    click.option("--t-end", "t_end", type=float, default=_FM.t_end, show_default=True,
                 help="Solver end time, then snap to the nearest code (data at t = 1)."),
    click.option("--solver-variant", "variant", type=click.Choice(VARIANTS), default=_FM.variant,
                 show_default=True, help="Order-3 coefficient: exact, or as the official DPM-Solver code."),
    click.option("--lower-order-final/--no-lower-order-final", "lower_order_final", default=_FM.lower_order_final,
                 show_default=True, help="Lower the order over the last two steps (stabilises the long final step)."),
    click.option("--grid-scale", "grid_scale", type=click.Choice(GRID_SCALES), default=_FM.grid_scale,
                 show_default=True, help="codebook: shift the solver's time grid by the codebook's spread; "
                 "unit: as for spread 1 (the map before issue 14)."),
    click.option("--solver-mem-mb", "mem_budget_mb", type=float, default=_FM.mem_budget_mb, show_default=True,
                 help="Working memory of one flow-map call (does not change the data)."),
]
_FLOW_MAP_FIELDS = ("nfe", "order", "spacing", "t_start", "t_end", "variant", "lower_order_final", "grid_scale",
                    "mem_budget_mb")


def flow_map_options(f):
    """Click decorator: adds the flow-map solver options; the command receives `fm_config`."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        given = {k: kwargs.pop(k) for k in _FLOW_MAP_FIELDS}
        try:
            cfg = FlowMapConfig(**given)
        except ValueError as e:
            raise click.BadParameter(str(e)) from e
        return f(*args, fm_config=cfg, **kwargs)

    wrapper.__click_params__ = list(getattr(f, "__click_params__", []))
    for opt in reversed(_FLOW_MAP_OPTIONS):
        wrapper = opt(wrapper)
    return wrapper


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _init_distributed(device: str) -> tuple:
    """Join the torchrun process group if launched under one -> (device, initialised_here)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.distributed.is_initialized():
        return device, False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend)
    return device, True


@click.command("build-dataset")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--num-samples", required=True, type=click.IntRange(min=1), help="Number of pairs.")
@click.option("--shard-size", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Pairs per shard file (the unit of resume).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Pairs per teacher batch.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the per-sample noise and labels.")
@click.option("--labels", "labels", type=click.Choice(LABEL_MODES), default="balanced", show_default=True,
              help="balanced: each class once per block of num_classes indices; uniform: i.i.d. classes.")
@click.option("--store-noise", is_flag=True, default=False, help="Also store the fp32 noise in the shards.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... Default: cuda when available.")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
@flow_map_options
@teacher_options
def build_dataset_command(out, num_samples, shard_size, batch_size, seed, labels, store_noise, device,
                          no_progress, fm_config, teacher_spec, sampling_overrides):
    """Generate (noise, tokens) pairs with a teacher and the flow map, into sharded files.

    Resumable (re-run the same command), extendable (a larger --num-samples), and multi-process
    under `torchrun --nproc_per_node=K -m distilled_decoding build-dataset ...`.
    """
    device, own_pg = _init_distributed(device or _default_device())
    try:
        teacher = teacher_spec.load(device)
        sampling = resolve_sampling(teacher, sampling_overrides)
        build_dataset(out, teacher, teacher_spec, num_samples=num_samples, sampling=sampling, fm_config=fm_config,
                      seed=seed, labels=labels, shard_size=shard_size, batch_size=batch_size,
                      store_noise=store_noise, show_progress=not no_progress, log=click.echo)
    except DatasetError as e:
        raise click.ClickException(str(e)) from e
    finally:
        if own_pg:
            torch.distributed.destroy_process_group()


@click.group("dataset")
def dataset_group():
    """Inspect and check data sets made by `dd build-dataset`."""


@dataset_group.command("verify")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--recompute", default=0, show_default=True, type=click.IntRange(min=0),
              help="Regenerate this many random samples with the teacher and compare tokens.")
@click.option("--device", default=None, help="Device for --recompute. Default: cuda when available.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Teacher checkpoint, if it moved since the build (its hash must match).")
@click.option("--tokenizer-checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Tokenizer checkpoint, if it moved since the build (its hash must match).")
def verify_command(root, recompute, device, batch_size, checkpoint, tokenizer_checkpoint):
    """Check counts, sizes, hashes and labels of every shard; optionally recompute samples."""
    try:
        spec = None
        if checkpoint or tokenizer_checkpoint:
            d = read_manifest(root)["teacher_spec"]
            d = dict(d, checkpoint=checkpoint or d["checkpoint"],
                     tokenizer_checkpoint=tokenizer_checkpoint or d["tokenizer_checkpoint"])
            spec = TeacherSpec.from_dict(d)
        problems = verify_dataset(root, recompute, device=device or _default_device(), batch_size=batch_size,
                                  spec=spec, log=click.echo)
    except DatasetError as e:
        raise click.ClickException(str(e)) from e
    if problems:
        for p in problems:
            click.echo(f"FAIL: {p}", err=True)
        raise SystemExit(1)
    click.echo("OK")


@dataset_group.command("info")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON.")
def info_command(root, as_json):
    """Summarise a data set: teacher, settings, size, completeness."""
    try:
        info = dataset_info(root)
    except DatasetError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    for k, v in info.items():
        click.echo(f"{k:>12}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
