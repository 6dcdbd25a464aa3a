"""The samplers: a DD student's 1/2-step sampler, the teacher-mixed sampler and the paper's baselines.

Small pure functions over tensors (k-diffusion style); `dd sample` (`sampling.py`) drives them through
the table `SAMPLERS` at the bottom, whose entries share one signature.

Timesteps are the paper's 1-indexed t over AR steps (see `schedule.py`): at t the first t-1 steps are
data, the rest noise; t = 1 is pure noise.

**Algorithm 3 (DD 1/2-step), `dd_sample`.** X₁ = noise [B, n, C]; for t in timesteps:
X ← F_θ(make_xt(X, X₁, t), t) (`dd_step`), always with the SAME initial noise X₁. Between steps
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
  computed steps (defined for teachers with `decodes_prefix`, i.e. VAR: the coarser
  partial f_hat). N = 0 is plain teacher sampling, draw for draw.
- `TokenMarginals` (`--baseline onestep`): every position drawn independently from its marginal,
  the optimum of independent one-step generation (paper Prop. 3.1), estimated by the token
  frequencies of a `dd build-dataset` data set: position i of a sample with label c takes position
  i of a uniformly drawn pair of class c (`conditional=True`, the optimum for a class-conditional
  generator) or of any class (`conditional=False`). Exactly the empirical marginal; no [n, V] table.

**Randomness.** Noise and labels are `seeding.sample_noise` / `sample_labels` of (seed, global sample
index), so `--seed s` gives the same noise and labels as a data set built with seed s. Multinomial
draws take one generator per sample (seeded from (seed, index, stream)), so a sample never depends on
the batch it ran in. The functions also accept a single `torch.Generator` (one stream for the batch,
as `Teacher.sample`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from teachers.base import SamplingConfig, Teacher

from .flowmap import nearest_code
from .schedule import make_xt, prefix_mask
from .seeding import sample_generators, sample_noise

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]

SKIP_FILLS = ("draw", "drop")


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


# ---- randomness ---------------------------------------------------------------------------------
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
@torch.no_grad()
def dd_step(student, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
            split: Optional[int] = None, snap: bool = False, history=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One sampler step F_theta(X_t, t) (Algorithm 3).

    x: [B, n, C]; labels: [B]; t: [B] (or int) paper timestep; split: AR steps < split take
    codebook[argmax logits], the rest the embedding head (default: the student's split); snap: also
    snap the embedding-head outputs to their nearest codebook rows. Tokens before step_offsets[t − 1]
    are kept from x (they are data). Returns (x_next [B, n, C] fp32, idx [B, n] int64 = nearest
    codebook index of every position of x_next). history: a DD-H student's cache (the step is its
    next block).
    """
    B, n, C = x.shape
    if not torch.is_tensor(t):
        t = torch.full((B,), int(t), dtype=torch.long)
    t = t.to(x.device).long().reshape(B)
    split = student.config.split if split is None else int(split)
    split = min(max(split, 0), student.num_steps)
    logits, emb = student(x, labels, t) if history is None else student(x, labels, t, history=history)
    cb = student.codebook.to(x.device)
    below = prefix_mask(student.step_offsets, torch.tensor([split], device=x.device), n)[..., None]   # [1, n, 1]
    pred = torch.where(below, cb[logits.argmax(-1)], emb.float())            # [B, n, C]
    if snap:
        pred = torch.where(below, pred, cb[nearest_code(emb.reshape(-1, C).float(), cb).view(B, n)])
    keep = student.data_mask(t, n)[..., None]                                # [B, n, 1]
    x_next = torch.where(keep, x.float(), pred)
    idx = nearest_code(x_next.reshape(-1, C), cb).view(B, n)
    return x_next, idx


def _t(batch: int, t: int, device) -> torch.Tensor:
    return torch.full((batch,), int(t), dtype=torch.long, device=device)


@torch.no_grad()
def dd_sample(student, noise: torch.Tensor, labels: torch.Tensor, timesteps: Sequence[int], *,
              split: Optional[int] = None, snap: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """noise X₁ [B, n, C], labels [B] -> (x [B, n, C] final continuous output, idx [B, n] nearest codes).

    X ← F_θ(make_xt(X, X₁, t), t) for t in timesteps (e.g. (1,) or (1, 81)). A DD-H student
    (`student.history`) runs the steps as the blocks of one trajectory, its lower layers reading the
    cached keys/values of the earlier steps' inputs; its timesteps must be a prefix of the trained ones."""
    cache = None
    if getattr(student, "history", None) is not None:
        trained = tuple(student.config.timesteps)
        if tuple(timesteps) != trained[:len(timesteps)]:
            raise ValueError(f"a DD-H student samples a prefix of its trained timesteps {list(trained)}, "
                             f"got {list(timesteps)}")
        cache = student.new_history()
    x, idx = noise, None
    for t in timesteps:
        tt = _t(noise.shape[0], t, noise.device)
        x, idx = dd_step(student, make_xt(x, noise, tt, student.step_offsets), labels, tt, split=split, snap=snap,
                         history=cache)
    return x, idx


@torch.no_grad()
def regen_sample(student, teacher: Teacher, noise: torch.Tensor, labels: torch.Tensor, regen: Tuple[int, int],
                 sampling: SamplingConfig, generator: Generators = None, *, split: Optional[int] = None,
                 snap: bool = False, progress: Optional[Callable[[int], None]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 4, paper pre-trained-a-b: (x [B, n, C], idx [B, n]); see the module docstring."""
    a, b = regen
    if getattr(student, "history", None) is not None:
        raise ValueError("--regen (teacher-mixed) is not defined for a DD-H student: its steps need their history")
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
        from .pairs import read_manifest
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


# ---- the table `dd sample` dispatches on ------------------------------------------------------------
@dataclasses.dataclass
class SamplePlan:
    """One configured sampler. kind: a key of `SAMPLERS`; the other fields are that sampler's settings
    (unused ones keep their defaults)."""

    kind: str
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
    captions: object = None        # text-to-image: a captions.CaptionTable; labels are then caption indices

    def __post_init__(self):
        if self.kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.kind!r}; choose from {sorted(SAMPLERS)}")

    def run(self, seed: int, indices: List[int], labels: torch.Tensor, device
            ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (decoder input: embeddings [B, n, C] or tokens [B, m], tokens [B, m] int64).
        labels: class labels [B], or caption indices [B] into `captions`."""
        if self.captions is not None and self.kind != "onestep":   # onestep's marginals are per caption index
            labels = self.captions.caption(labels).to(device)
        return SAMPLERS[self.kind].run(self, seed, indices, labels, device)

    def describe(self) -> str:
        return SAMPLERS[self.kind].describe(self)

    @property
    def num_tokens(self) -> int:
        """Tokens a sample has (fewer than the teacher's when skip-N drops the skipped steps)."""
        t = self.teacher
        if self.kind == "skip" and self.skip_fill == "drop":
            return t.step_offsets[t.num_steps - self.n_skip]
        return t.num_tokens


@dataclasses.dataclass(frozen=True)
class Sampler:
    """An entry of `SAMPLERS`: run(plan, seed, indices [B], labels [B], device) -> (decoder input,
    tokens [B, m]); describe(plan) -> a one-line name."""

    run: Callable[..., Tuple[torch.Tensor, torch.Tensor]]
    describe: Callable[[SamplePlan], str]


def _run_dd(p: SamplePlan, seed, indices, labels, device):
    t = p.teacher
    noise = sample_noise(seed, indices, t.num_tokens, t.embed_dim).to(device)
    return dd_sample(p.student, noise, labels, p.timesteps, split=p.split, snap=p.snap)


def _run_regen(p: SamplePlan, seed, indices, labels, device):
    t = p.teacher
    noise = sample_noise(seed, indices, t.num_tokens, t.embed_dim).to(device)
    gens = sample_generators(seed, indices, "draw", device)
    return regen_sample(p.student, t, noise, labels, p.regen, p.sampling, gens, split=p.split, snap=p.snap)


def _run_skip(p: SamplePlan, seed, indices, labels, device):
    gens = sample_generators(seed, indices, "draw", device)
    tok = skip_sample(p.teacher, labels, p.sampling, p.n_skip, gens, fill=p.skip_fill)
    return tok, tok


def _run_onestep(p: SamplePlan, seed, indices, labels, device):
    gens = sample_generators(seed, indices, "onestep", "cpu")
    tok = p.marginals.sample(labels, gens).to(device)
    return tok, tok


SAMPLERS = {
    "dd": Sampler(_run_dd, lambda p: ("DD-H" if getattr(p.student, "history", None) is not None else "DD")
                  + f" {len(p.timesteps)}-step (t = {','.join(map(str, p.timesteps))})"),
    "regen": Sampler(_run_regen, lambda p: f"teacher-mixed pre-trained-{p.regen[0]}-{p.regen[1]}"),
    "skip": Sampler(_run_skip, lambda p: f"teacher skip-{p.n_skip}" + (f" ({p.skip_fill})" if p.n_skip else "")),
    "onestep": Sampler(_run_onestep, lambda p: "onestep (token marginals)"),
}
