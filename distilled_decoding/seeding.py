"""Per-sample randomness: every random choice of a sample depends only on (seed, global index).

A sample's noise, label and multinomial draws never depend on the batch, shard, rank or run that made
it. Each comes from its own CPU `torch.Generator`, seeded with the first 8 bytes (little-endian, top
bit cleared) of blake2b("<stream>:<seed>:<index>"):

- noise:  stream "noise", `torch.randn(n, C)` in generation order (VAR: scale by scale, row-major).
- labels, `uniform`: stream "label", `torch.randint(num_classes, (1,))`.
- labels, `balanced`: sample i sits in block b = i // num_classes; stream "balanced" seeded with b
  gives `torch.randperm(num_classes)` and sample i takes entry i % num_classes. Every complete block
  of num_classes consecutive indices holds each class exactly once.
- draws (`sample_generators`): any other stream name ("draw", "onestep"), one generator per sample.

Training timesteps use an integer hash instead (`sample_timestep`: splitmix64 of seed, epoch, position).
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence, Union

import torch

LABEL_MODES = ("uniform", "balanced")


def sample_seed(seed: int, index: int, stream: str) -> int:
    """The 63-bit generator seed of one sample's `stream` ("noise", "label", "balanced", ...)."""
    h = hashlib.blake2b(f"{stream}:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _generator(seed: int, index: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index, stream))


def as_index_list(indices) -> List[int]:
    """A tensor or iterable of sample indices -> list of ints."""
    if isinstance(indices, torch.Tensor):
        return indices.reshape(-1).tolist()
    return [int(i) for i in indices]


def sample_noise(seed: int, indices, n: int, C: int) -> torch.Tensor:
    """indices [B] global sample indices -> noise [B, n, C] fp32 on the CPU."""
    idx = as_index_list(indices)
    out = torch.empty(len(idx), n, C)
    for b, i in enumerate(idx):
        out[b].normal_(generator=_generator(seed, i, "noise"))  # = torch.randn(n, C, generator=...)
    return out


def sample_labels(seed: int, indices, num_classes: int, balanced: bool) -> torch.Tensor:
    """indices [B] -> class labels [B] int64 (see the module docstring for both modes)."""
    idx = as_index_list(indices)
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


def sample_generators(seed: int, indices, stream: str, device: Union[str, torch.device] = "cpu"
                      ) -> List[torch.Generator]:
    """One generator per global sample index, seeded from (seed, index, stream)."""
    dev = torch.device(device)
    return [torch.Generator(device=dev).manual_seed(sample_seed(seed, i, stream)) for i in as_index_list(indices)]


def noise_fingerprint(seed: int, n: int, C: int) -> str:
    """sha256 (16 hex) of the noise of samples 0..3: detects a changed CPU RNG."""
    return hashlib.sha256(sample_noise(seed, range(4), n, C).numpy().tobytes()).hexdigest()[:16]


def _mix64(x: int) -> int:
    """splitmix64 finaliser."""
    x &= (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return x ^ (x >> 31)


def sample_timestep(timesteps: Sequence[int], seed: int, epoch: int, position: int,
                    weights: Optional[Sequence[int]] = None) -> int:
    """The training timestep of dataset item `position` in `epoch`: uniform over `timesteps`, or
    timesteps[k] with probability weights[k] / Σ weights (positive integers, so the draw stays one
    exact integer hash; weights of 1 give exactly the uniform draw)."""
    h = _mix64(_mix64(_mix64(seed + 0x9E3779B97F4A7C15) + epoch) + position)
    if weights is None:
        return int(timesteps[h % len(timesteps)])
    if len(weights) != len(timesteps) or min(weights) < 1:
        raise ValueError(f"timestep weights {tuple(weights)}: need one positive integer per timestep "
                         f"{tuple(timesteps)}")
    r = h % sum(weights)
    for t, w in zip(timesteps, weights):
        if r < w:
            return int(t)
        r -= w
    raise AssertionError("unreachable")


def make_labels(seed: int, indices, num_classes: int, labels: str) -> torch.Tensor:
    """Class labels [B] int64 of a label spec: "balanced" | "uniform" (as above) | comma-separated
    class ids, cycled over the sample index."""
    if labels in LABEL_MODES:
        return sample_labels(seed, indices, num_classes, labels == "balanced")
    ids = [int(s) for s in labels.split(",") if s.strip()]
    return torch.tensor([ids[i % len(ids)] for i in as_index_list(indices)], dtype=torch.long)


def check_label_spec(labels: str, num_classes: int) -> None:
    """Raise a one-line ValueError unless `labels` is a valid spec for `make_labels`."""
    if labels in LABEL_MODES:
        return
    try:
        ids = [int(s) for s in labels.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--labels {labels!r}: balanced, uniform or comma-separated class ids") from None
    if not ids or any(not 0 <= i < num_classes for i in ids):
        raise ValueError(f"--labels {labels!r}: class ids must lie in [0, {num_classes})")


def reference_seed(seed: int) -> int:
    """Seed of a demo's reference teacher draw, which every "vs teacher" column compares with."""
    return seed + 1000


def sample_seeds(seed: int, num: int) -> List[int]:
    """A demo's evaluation seeds (every method's and the floor row's): distinct from the reference's
    and from the training data's (`seed`)."""
    return [seed + 2000 + 1000 * i for i in range(num)]
