"""`dd dataset verify` / `info` on a pair data set: the store's checks, the pairs' own (labels of
(seed, index), token range) and optionally a recomputation of random samples with the teacher."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from teachers.base import SamplingConfig

from .dataset import PairDataset
from .flowmap import FlowMapConfig
from .pairs import generate_pairs, pair_store, read_manifest, teacher_differences
from .seeding import sample_labels, sample_noise
from .teacher_spec import TeacherSpec


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
    store = pair_store(root)
    m = store.read_manifest()
    problems = store.verify(_check_pair_tensors, log=log)
    if recompute > 0 and not problems:
        problems += _recompute(root, m, recompute, device=device, batch_size=batch_size, spec=spec,
                               seed=sample_seed_, log=log)
    return problems


def _check_pair_tensors(st: dict, e: dict, t: dict) -> list:
    """The pair-specific checks of one shard's tensors (its index range is already checked)."""
    problems = []
    if not torch.equal(t["labels"].long(), sample_labels(st["seed"], t["index"], st["num_classes"],
                                                         st["labels"] == "balanced")):
        problems.append(f"shard {e['file']}: labels differ from those of (seed, index)")
    tok = t["tokens"].long()
    if tok.numel() and (tok.min() < 0 or tok.max() >= st["vocab_size"]):
        problems.append(f"shard {e['file']}: tokens outside [0, {st['vocab_size']})")
    return problems


def _recompute(root, m, n_check, *, device, batch_size, spec, seed, log) -> list:
    st = m["settings"]
    spec = spec or TeacherSpec.from_dict(m["teacher_spec"])
    teacher = spec.load(device)
    wrong = teacher_differences(st, teacher)
    if wrong:
        return ["the teacher loaded for --recompute is not the one recorded: " + "; ".join(wrong)]
    ds = PairDataset(root)
    captions = ds.captions
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
        cond = labels if captions is None else captions.caption(labels)
        got = generate_pairs(teacher, cond, eps, sampling, fm_config, codebook=codebook).cpu()
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

