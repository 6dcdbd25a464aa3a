"""`dd build-dataset`'s builder: the pairs (`pairs.py`) of a teacher + flow map, made shard by shard on
the shard store (resume, extension and torchrun ranks are the store's, `shard_store.py`).

A data set is only ever completed with the settings it was started with (`dataset_settings`: teacher
identity, sampling, flow map, seed, labels, shard size, ...); with the same batch size and device a
resumed build is byte-identical to an uninterrupted one. The next batch's noise is drawn on a CPU
thread while the teacher runs the current one.

Text-to-image teachers take a `CaptionTable` (`captions.py`): pair i's `labels` entry is then a caption
index drawn like a class label over the P prompts (`--labels balanced`: each prompt once per block of P),
the table is stored once as a side file, and `settings["condition"]` records its hashes.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

from teachers.base import SamplingConfig, Teacher

from .distributed import dist_info
from .fileio import normalise_json
from .flowmap import FlowMapConfig, codebook_warning
from .pairs import FLOW_MAP_NON_DATA, generate_pairs, pair_store, token_dtype
from .captions import SIDE_FILE, CaptionError, CaptionTable, caption_shape_if_given
from .seeding import LABEL_MODES, noise_fingerprint, sample_labels, sample_noise
from .shard_store import build_shards
from .teacher_spec import TeacherSpec


def dataset_settings(teacher: Teacher, spec: TeacherSpec, sampling: SamplingConfig, fm_config: FlowMapConfig,
                     seed: int, labels: str, shard_size: int, store_noise: bool,
                     captions: Optional[CaptionTable] = None) -> dict:
    """The settings that decide the data: a directory is only ever completed with equal ones.
    captions: the conditions of a text-to-image teacher (then `num_classes` is the prompt count)."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels {labels!r}: choose from {LABEL_MODES}")
    check_condition(teacher, captions)
    fm = {k: v for k, v in fm_config.to_dict().items() if k not in FLOW_MAP_NON_DATA}
    cond = {} if captions is None else {"condition": captions.settings()}
    return normalise_json({
        "teacher": teacher.describe(),
        "teacher_dtype": spec.dtype,
        "sampling": sampling.to_dict(),
        "flow_map": fm,
        "seed": int(seed),
        "labels": labels,
        "num_classes": int(teacher.num_classes if captions is None else len(captions)),
        "shard_size": int(shard_size),
        "store_noise": bool(store_noise),
        "num_tokens": int(teacher.num_tokens),
        "embed_dim": int(teacher.embed_dim),
        "vocab_size": int(teacher.vocab_size),
        "step_sizes": list(teacher.step_sizes),
        "token_dtype": str(token_dtype(teacher.vocab_size)).replace("torch.", ""),
        "noise_fingerprint": noise_fingerprint(seed, teacher.num_tokens, teacher.embed_dim),
        **cond,
    })


def check_condition(teacher: Teacher, captions: Optional[CaptionTable]) -> None:
    """CaptionError unless captions are given exactly to a text-to-image teacher, in its shape."""
    shape = caption_shape_if_given(teacher, captions is not None)
    if shape is not None and (captions.slots, captions.dim) != tuple(shape):
        raise CaptionError(f"captions of {captions.slots} slots x {captions.dim}, the teacher takes "
                           f"{shape[0]} x {shape[1]}")


def build_shard(teacher: Teacher, start: int, count: int, *, settings: dict, sampling: SamplingConfig,
                fm_config: FlowMapConfig, batch_size: int, codebook: torch.Tensor,
                on_batch: Optional[Callable[[int], None]] = None, captions: Optional[CaptionTable] = None) -> dict:
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
            cond = labels[b0:b0 + len(idx)]
            if captions is not None:
                cond = captions.caption(cond)
            tok = generate_pairs(teacher, cond, eps, sampling, fm_config, codebook=codebook)
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
                  show_progress: bool = True, log: Callable[[str], None] = print,
                  captions: Optional[CaptionTable] = None) -> Optional[dict]:
    """Build (or complete, or extend) the data set in `out`. Returns the manifest on rank 0.
    captions: the prompts' conditions, required by (and only by) a text-to-image teacher.

    Collective under torch.distributed: every rank calls it with the same arguments.
    """
    if num_samples <= 0 or shard_size <= 0 or batch_size <= 0:
        raise ValueError("num_samples, shard_size and batch_size must be positive")
    settings = dataset_settings(teacher, spec, sampling, fm_config, seed, labels, shard_size, store_noise, captions)
    build_info = {"torch": torch.__version__, "device": str(teacher.device), "batch_size": batch_size,
                  "world_size": dist_info()[1], "flow_map": fm_config.to_dict()}
    codebook = teacher.codebook.to(teacher.device, torch.float32)
    if dist_info()[0] == 0 and (msg := codebook_warning(codebook, fm_config)):
        log(f"warning: {msg}")

    def produce(k, start, count, on_batch):
        return build_shard(teacher, start, count, settings=settings, sampling=sampling, fm_config=fm_config,
                           batch_size=batch_size, codebook=codebook, on_batch=on_batch, captions=captions)

    return build_shards(pair_store(out), settings, num_samples, produce,
                        extra={"teacher_spec": normalise_json(spec.to_dict())}, build_info=build_info,
                        show_progress=show_progress, desc="build-dataset", log=log,
                        side_files=None if captions is None else {SIDE_FILE: captions.to_bytes()})
