"""The one teacher contract every AR family implements.

Everything downstream (the flow map driver, build-dataset, the teacher-mixed sampler, baselines,
benchmarks) talks to a teacher only through this class, never through `if family == ...`.

A teacher generates `num_tokens` tokens in `len(step_sizes)` AR steps. Step `s` emits
`step_sizes[s]` tokens at once (LlamaGen: 256 steps of 1 token; VAR: 10 scales of 1, 4, ..., 256).
Tokens are always handled as one flat sequence `[B, n]` in generation order (VAR: scale by scale,
row-major inside a scale), so slicing by `step_offsets` gives the tokens of each step.

Stepping protocol (KV-cached):

    state = teacher.start(labels, sampling)          # prefill the class token(s)
    for s in range(state.step, teacher.num_steps):
        probs = teacher.step_probs(state)            # [B, k, V] fp32, CFG/temperature/top-k/top-p applied
        idx = choose(probs)                          # [B, k] int64 (multinomial, the flow map, ...)
        teacher.feed(state, idx)                     # advance one step

`Teacher.generate` is that loop; `Teacher.sample` is it with a multinomial draw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingConfig:
    """How a teacher turns logits into next-token probabilities.

    Each family applies these exactly as its official sampler does (LlamaGen: CFG `u + s·(c − u)` at
    every step, logits / max(T, 1e-5), HF-style top-k then top-p; VAR: CFG ramp `t = s·si/(S−1)`,
    `(1+t)·c − t·u`, top-k then VAR's top-p). Off-values: `cfg_scale <= 1` (LlamaGen) / `0` (VAR)
    disables guidance, `top_k <= 0` keeps all, `top_p <= 0` or `>= 1` keeps all, `temperature = 1`
    leaves logits alone (VAR's official sampler has no temperature; we allow one as an extension).
    """

    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def to_dict(self) -> dict:
        return {"cfg_scale": self.cfg_scale, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p}


@dataclass(frozen=True)
class Caption:
    """A text condition: caption features [B, L, D] (e.g. FLAN-T5-XL last hidden states, D = 2048) and
    mask [B, L] bool (True = a real token; any 0/1 dtype is accepted and turned into bool).

    A text-conditional teacher takes a Caption wherever this interface says `labels`; features and
    mask are used in the positions given (LlamaGen's official sampler left-pads them first:
    `teachers.llamagen.left_pad`). Indexing selects along the batch: `cap[2:5]`, `cap[idx]`.
    """

    features: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        f, m = self.features, self.mask
        if f.dim() != 3:
            raise ValueError(f"caption features must be [B, L, D], got shape {tuple(f.shape)}")
        if tuple(m.shape) != tuple(f.shape[:2]):
            raise ValueError(f"caption mask {tuple(m.shape)} does not match the features "
                             f"{tuple(f.shape)}: expected [B, L] = {tuple(f.shape[:2])}")
        if m.dtype != torch.bool:
            object.__setattr__(self, "mask", m != 0)

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def device(self) -> torch.device:
        return self.features.device

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, idx) -> "Caption":
        return Caption(self.features[idx], self.mask[idx])

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Caption":
        """Move both tensors to `device`; `dtype` casts the features only."""
        return Caption(self.features.to(device=device, dtype=dtype), self.mask.to(device))


def condition_batch_size(cond) -> int:
    """B of a condition: class labels [B] or a Caption."""
    return cond.batch_size if isinstance(cond, Caption) else cond.shape[0]


@dataclass
class DecodeState:
    """Where a KV-cached generation stands. Families subclass it to hold their caches.

    labels: the condition, [B] int64 class labels or a `Caption`; step: index of the next AR step to
    run; tokens: list of [B, k_s] int64 tensors already fed (one per finished step).
    """

    labels: object
    sampling: SamplingConfig
    step: int = 0
    tokens: list = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return condition_batch_size(self.labels)


class Teacher(nn.Module):
    """Abstract base of a pre-trained image AR teacher (tokenizer + transformer).

    Subclasses set `family`, `step_sizes`, `num_classes`, `image_size` and implement the abstract
    methods. The transformer may run in bf16/fp16; everything returned here (`codebook`,
    `step_probs`, `logits`) is fp32.
    """

    family: str = ""
    # The sampling settings DD uses for this family when making training pairs (the paper's
    # defaults; subclasses override). build-dataset and the samplers start from these.
    default_sampling: SamplingConfig = SamplingConfig()
    step_sizes: tuple = ()
    num_classes: int = 0
    image_size: int = 0
    # Capability: the condition is a `Caption` (text features + mask), not class labels.
    text_conditional: bool = False
    # A text-conditional teacher that ships its own text encoder (the digits-t2i zoo teacher): a
    # callable prompts [B] (str) -> Caption in the teacher's shape (`teachers.text_encoder.PromptEncoder`).
    # None: caption features come from elsewhere (precomputed T5 files for the official checkpoints).
    prompt_encoder = None
    # Capability: `decode` also accepts the tokens of the first k whole AR steps only (and decodes
    # that coarser partial image); downstream code asks this, never the family name.
    decodes_prefix: bool = False

    # ---- static description -------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.step_sizes)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.step_sizes))

    @property
    def step_offsets(self) -> tuple:
        """Start index of each step's tokens in the flat sequence, plus num_tokens at the end."""
        offs = [0]
        for k in self.step_sizes:
            offs.append(offs[-1] + k)
        return tuple(offs)

    @property
    def codebook(self) -> torch.Tensor:
        """[V, C] fp32: the embedding space the flow map and the student work in."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.codebook.shape[1]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def describe(self) -> dict:
        """JSON-able identity of this teacher (family, config, checkpoint hashes), for manifests."""
        raise NotImplementedError

    # ---- KV-cached stepping ----------------------------------------------------------------------
    def start(self, labels: torch.Tensor, sampling: SamplingConfig,
              prefix: Optional[torch.Tensor] = None) -> DecodeState:
        """Allocate caches and prefill the condition: class labels [B], or a `Caption` for a
        text-conditional teacher (`text_conditional` True).

        prefix: optional [B, m] int64 tokens already decided, m a step boundary (one of
        `step_offsets`); they are prefilled with the teacher's own causal/block-causal mask and the
        returned state continues at the step after them.
        """
        raise NotImplementedError

    def step_probs(self, state: DecodeState) -> torch.Tensor:
        """Next-step probabilities [B, k, V] fp32 for step `state.step`, after CFG, temperature,
        top-k and top-p exactly as the official sampler applies them (rows sum to 1)."""
        raise NotImplementedError

    def feed(self, state: DecodeState, tokens: torch.Tensor) -> None:
        """Feed back the chosen tokens [B, k] int64 of step `state.step` and advance it."""
        raise NotImplementedError

    # ---- full-sequence views ---------------------------------------------------------------------
    def logits(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced forward: labels [B] (or a Caption), tokens [B, n] -> logits [B, n, V] fp32.

        Row i is the conditional (no CFG, no label dropout) logit vector of token i given all
        tokens before it in the teacher's own ordering/mask, as the official training forward.
        """
        raise NotImplementedError

    @torch.no_grad()
    def sequence_probs(self, labels: torch.Tensor, tokens: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """Teacher-forced sampling view: labels [B], tokens [B, n] -> [B, n, V] fp32, row i the
        probabilities `step_probs` gives token i's step after the earlier steps' tokens were fed (CFG,
        temperature, top-k/p applied). This default runs the stepping loop; families may override it
        with one forward."""
        offs = self.step_offsets
        state = self.start(labels, sampling)
        out = []
        for s in range(self.num_steps):
            out.append(self.step_probs(state))
            self.feed(state, tokens[:, offs[s]:offs[s + 1]])
        return torch.cat(out, 1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, n] int64, or continuous embeddings [B, n, C] -> images [B, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> tokens [B, n] int64 (the tokenizer's encoder)."""
        raise NotImplementedError

    def decode_differentiable(self, emb: torch.Tensor) -> torch.Tensor:
        """Continuous embeddings [B, n, C] -> images [B, 3, H, W] in [-1, 1], differentiable in emb
        (the DD student's image-space loss; `decode` is the no-grad, [0, 1] view)."""
        raise NotImplementedError

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, n] int64 -> codebook rows [B, n, C] fp32."""
        return self.codebook[tokens]

    # ---- generation loops (shared by every family) ----------------------------------------------
    @torch.no_grad()
    def generate(self, labels: torch.Tensor, sampling: SamplingConfig,
                 choose: Callable[[int, torch.Tensor], torch.Tensor],
                 prefix: Optional[torch.Tensor] = None, stop_step: Optional[int] = None,
                 progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """Run the AR loop, calling `choose(step, probs [B, k, V]) -> idx [B, k]` at every step.

        Starts after `prefix` (if given) and stops before `stop_step` (default: the end).
        Returns all tokens so far, prefix included: [B, offsets[stop_step]] int64.
        """
        stop = self.num_steps if stop_step is None else stop_step
        state = self.start(labels, sampling, prefix=prefix)
        out = [] if prefix is None else [prefix.long()]
        while state.step < stop:
            s = state.step
            probs = self.step_probs(state)
            idx = choose(s, probs).long()
            self.feed(state, idx)
            out.append(idx)
            if progress is not None:
                progress(s)
        if not out:
            return torch.zeros(condition_batch_size(labels), 0, dtype=torch.long, device=labels.device)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, sampling: Optional[SamplingConfig] = None,
               generator: Optional[torch.Generator] = None, **kw) -> torch.Tensor:
        """Plain AR sampling (multinomial at each step): labels [B] -> tokens [B, n] int64."""
        sampling = sampling or SamplingConfig()

        def draw(_s: int, probs: torch.Tensor) -> torch.Tensor:
            B, k, V = probs.shape
            return torch.multinomial(probs.reshape(B * k, V), 1, generator=generator).view(B, k)

        return self.generate(labels, sampling, draw, **kw)


def steps_to_tokens(step_sizes: Sequence[int], steps: int) -> int:
    """Number of tokens emitted by the first `steps` AR steps."""
    return int(sum(step_sizes[:steps]))
