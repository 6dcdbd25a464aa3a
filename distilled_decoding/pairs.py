"""(noise, tokens) training pairs for Distilled Decoding: the definition (`generate_pairs`) and what a
shard of them holds (the shard-store schema `PAIRS`). Built by `dataset_build.py`, read by
`dataset.py`, checked by `dataset_check.py`.

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
size, ...) and the `teacher_spec` that rebuilds the teacher.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from teachers.base import SamplingConfig, Teacher

from .fileio import normalise_json
from .flowmap import LEGACY, FlowMapConfig, flow_map
from .shard_store import ShardSchema, ShardStore, StoreError, diff_settings

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


def upgrade_manifest(m: dict) -> dict:
    """Flow-map fields a manifest lacks were not settings yet: that data was built with their LEGACY values."""
    for part in (m.get("settings", {}), m.get("build", {})):
        if isinstance(part.get("flow_map"), dict):
            part["flow_map"] = {**LEGACY, **part["flow_map"]}
    return m


PAIRS = ShardSchema(format="dd-pairs", version=1, made_by="`dd build-dataset`", noun="data set", unit="pairs",
                    shapes=pair_shapes, upgrade=upgrade_manifest)


def pair_store(root: str) -> ShardStore:
    return ShardStore(root, PAIRS)


def read_manifest(root: str) -> dict:
    """The manifest of a pair data set (StoreError unless `root` is one)."""
    return pair_store(root).read_manifest()


def teacher_differences(settings: dict, teacher: Teacher, limit: int = 3) -> list:
    """'teacher.<key>: recorded vs now' for the identity fields (family, configs, checkpoint hashes) in
    which `teacher` differs from the one that built a data set of `settings`; [] = the same teacher."""
    diffs = diff_settings(settings["teacher"], normalise_json(teacher.describe()), "teacher")
    out = [f"{name}: {_short(a)} recorded vs {_short(b)} now" for name, a, b in diffs[:limit]]
    return out + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _short(v, n: int = 24) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


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
