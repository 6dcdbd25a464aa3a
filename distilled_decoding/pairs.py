"""(noise, tokens) training pairs for Distilled Decoding: the definition, and the builder of
`dd build-dataset` on the shard store (`shard_store.py`, schema `PAIRS`).

**The data.** A pair is (eps, tokens) for one class label: eps [n, C] is one N(0, I_C) vector per
token, and tokens [n] are what the teacher generates when, at every AR step, the multinomial draw is
replaced by the flow map (`distilled_decoding.flowmap.flow_map`) applied to that step's slice of
eps. `generate_pairs` is the one definition; `dd dataset verify` and the teacher-mixed sampler reuse
it. Noise and labels are those of (seed, global sample index) (`seeding.py`).

**Noise is regenerated, not stored** (by default). VAR's 680x32 fp32 noise is 87 KB a sample (over
100 GB at 1.2M pairs) against 1.4 KB of int16 tokens, and regenerating it costs about 0.1 ms a
sample. Since the CPU RNG's output could change across torch versions, the manifest stores a
fingerprint (sha256 of the noise of samples 0..3); `PairDataset` refuses to regenerate when the
fingerprint differs, and `--store-noise` keeps the fp32 noise in the shards for the cautious.

**Shards** (see `shard_store.py` for layout, resume and ranks): `tokens` [m, n] (int16 when the
vocabulary fits, else int32), `labels` [m] int32, `index` [m] int64 and optionally `noise` [m, n, C]
fp32. `manifest.json` holds the settings (teacher identity, sampling, flow map, seed, labels, shard
size, ...) and the `teacher_spec` that rebuilds the teacher. With the same batch size and device a
resumed build is byte-identical to an uninterrupted one.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

from teachers.base import SamplingConfig, Teacher

from .fileio import normalise_json
from .flowmap import FlowMapConfig, flow_map
from .seeding import LABEL_MODES, noise_fingerprint, sample_labels, sample_noise
from .shard_store import ShardSchema, ShardStore, StoreError, build_shards
from .teacher_spec import TeacherSpec

# FlowMapConfig fields that change how, not what, is computed (kept in the manifest, not compared).
FLOW_MAP_NON_DATA = ("mem_budget_mb",)

DatasetError = StoreError   # the store's error, under the name the data-set verbs report


def pair_shapes(settings: dict, m: int) -> dict:
    """The tensors of a pair shard of m pairs."""
    n, C = settings["num_tokens"], settings["embed_dim"]
    want = {"tokens": (m, n), "labels": (m,), "index": (m,)}
    if settings["store_noise"]:
        want["noise"] = (m, n, C)
    return want


PAIRS = ShardSchema(format="dd-pairs", version=1, made_by="`dd build-dataset`", noun="data set", unit="pairs",
                    shapes=pair_shapes)


def pair_store(root: str) -> ShardStore:
    return ShardStore(root, PAIRS)


def read_manifest(root: str) -> dict:
    """The manifest of a pair data set (StoreError unless `root` is one)."""
    return pair_store(root).read_manifest()


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


def token_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 2 ** 15 else torch.int32


# ---- building -----------------------------------------------------------------------------------
def dataset_settings(teacher: Teacher, spec: TeacherSpec, sampling: SamplingConfig, fm_config: FlowMapConfig,
                     seed: int, labels: str, shard_size: int, store_noise: bool) -> dict:
    """The settings that decide the data: a directory is only ever completed with equal ones."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels {labels!r}: choose from {LABEL_MODES}")
    fm = {k: v for k, v in fm_config.to_dict().items() if k not in FLOW_MAP_NON_DATA}
    return normalise_json({
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


def build_shard(teacher: Teacher, start: int, count: int, *, settings: dict, sampling: SamplingConfig,
                fm_config: FlowMapConfig, batch_size: int, codebook: torch.Tensor,
                on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Compute the pairs of indices [start, start + count) in batches of `batch_size` (never straddling
    shards) -> the shard's tensors (CPU).

    The next batch's noise is drawn on a CPU thread while the teacher runs the current one.
    """
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



def build_dataset(out: str, teacher: Teacher, spec: TeacherSpec, *, num_samples: int,
                  sampling: SamplingConfig, fm_config: FlowMapConfig, seed: int = 0, labels: str = "balanced",
                  shard_size: int = 4096, batch_size: int = 64, store_noise: bool = False,
                  show_progress: bool = True, log: Callable[[str], None] = print) -> Optional[dict]:
    """Build (or complete, or extend) the data set in `out`. Returns the manifest on rank 0.

    Collective under torch.distributed: every rank calls it with the same arguments.
    """
    from .distributed import dist_info
    if num_samples <= 0 or shard_size <= 0 or batch_size <= 0:
        raise ValueError("num_samples, shard_size and batch_size must be positive")
    settings = dataset_settings(teacher, spec, sampling, fm_config, seed, labels, shard_size, store_noise)
    build_info = {"torch": torch.__version__, "device": str(teacher.device), "batch_size": batch_size,
                  "world_size": dist_info()[1], "flow_map": fm_config.to_dict()}
    codebook = teacher.codebook.to(teacher.device, torch.float32)

    def produce(k, start, count, on_batch):
        return build_shard(teacher, start, count, settings=settings, sampling=sampling, fm_config=fm_config,
                           batch_size=batch_size, codebook=codebook, on_batch=on_batch)

    return build_shards(pair_store(out), settings, num_samples, produce,
                        extra={"teacher_spec": normalise_json(spec.to_dict())}, build_info=build_info,
                        show_progress=show_progress, desc="build-dataset", log=log)
