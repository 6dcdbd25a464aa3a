"""The Distilled Decoding student: one network that maps (X_t, t) to the clean token sequence.

A DD student is the teacher's transformer turned into a one-step denoiser over the whole sequence
(Liu et al. 2025, §3.3 and the authors' released models). Its input is a sequence of n continuous
vectors of the codebook space, X_t = [data rows of the first t−1 AR steps, Gaussian noise after]
(`schedule.make_xt`), its output at token i's own slot predicts clean token i twice: logits over the
codebook (the teacher's head) and a continuous embedding (`final_layer_conti`). The sampler step is
`samplers.dd_step`, the loss `dd_loss.dd_loss`, the run directory `student_run.py`.

`DDStudent` wraps a family backbone (`student_backbones.py`: the `StudentBackbone` protocol and the
`BACKBONES` registry) with what every family shares: the codebook, the timestep -> data-prefix rule
(`schedule.py`) and the forward contract. `build_student` initialises one from a teacher,
`student_official.load_official` from a released checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from teachers.base import Caption

from .schedule import default_schedule, offsets_of, prefix_mask
from .student_history import HistoryCache
from .student_backbones import BACKBONES, backbone_class


OUTPUTS = ("embedding", "velocity", "ar_diffusion")


# ---- config -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudentConfig:
    """Everything needed to rebuild a student (saved in every run's config.json).

    family: the teacher family ("llamagen" | "var"); model: the teacher transformer's config dict
    (official GPTConfig / VARConfig names; the backbone derives its own shapes from it);
    codebook_dim: C; vocab_size: V; timesteps: training timesteps (paper notation, e.g. (1, 81));
    split: AR steps < split take the logits head at sampling time; options: family options of the
    backbone (VAR: {"layerwise_n_d_embed": True}); output: what the embedding head's value is,
    "embedding" (the token embedding itself, DD) or "velocity" (v with embedding = x − v, x the input
    row: DD2's generator parameterisation, App. E.1; x is the noise at a one-step generator's t = 1)
    or "ar_diffusion" (DD2's AR-diffusion generator, §3.3: the backbone is a `csd_nets.GuidanceNet`,
    an MLP head of width `head_width` over a block-causal teacher backbone, and emb = x −
    generator_velocity(x); one step from noise only).
    """

    family: str
    model: dict
    codebook_dim: int
    vocab_size: int
    timesteps: tuple
    split: int
    options: dict = field(default_factory=dict)
    output: str = "embedding"
    head_width: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        object.__setattr__(self, "split", int(self.split))
        if self.family not in BACKBONES:
            raise ValueError(f"unknown student family {self.family!r}; choose from {sorted(BACKBONES)}")
        if not self.timesteps or min(self.timesteps) < 1:
            raise ValueError(f"timesteps are 1-indexed AR steps (t = 1: pure noise), got {self.timesteps}")
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown student output {self.output!r}; choose from {OUTPUTS}")
        if (self.output == "ar_diffusion") != (self.head_width is not None):
            raise ValueError("head_width is given exactly for an ar_diffusion student")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["timesteps"] = list(self.timesteps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudentConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown StudentConfig fields: {sorted(unknown)}")
        return cls(**d)


# ---- the student ------------------------------------------------------------------------------
class DDStudent(nn.Module):
    """A family backbone (official key layout, `self.backbone`) plus what every family shares:
    the codebook, the timestep -> data-prefix rule, and the forward contract.

    step_sizes / step_offsets / num_tokens are the teacher's. codebook: [V, C] fp32 buffer (not part
    of the state dict; saved beside the weights by `save_run`).
    """

    def __init__(self, config: StudentConfig, backbone: nn.Module, codebook: torch.Tensor):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.register_buffer("codebook", codebook.detach().float().clone(), persistent=False)
        self.step_sizes = tuple(backbone.step_sizes)
        self.step_offsets = offsets_of(self.step_sizes)
        self.num_tokens = self.step_offsets[-1]
        if tuple(self.codebook.shape) != (config.vocab_size, config.codebook_dim):
            raise ValueError(f"codebook {tuple(self.codebook.shape)} != (V, C) = "
                             f"({config.vocab_size}, {config.codebook_dim})")

    @property
    def num_steps(self) -> int:
        return len(self.step_sizes)

    @property
    def family(self) -> str:
        return self.config.family

    def data_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """t: [B] paper timesteps (1 .. num_steps + 1; num_steps + 1 = all data) -> [B] int64 number
        of leading data tokens, step_offsets[t − 1]."""
        offs = torch.tensor(self.step_offsets, device=t.device)
        if t.numel() and (int(t.min()) < 1 or int(t.max()) > self.num_steps + 1):
            raise ValueError(f"timesteps must lie in [1, {self.num_steps + 1}], got {t.tolist()}")
        return offs[t.long() - 1]

    def data_mask(self, t: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
        """[B, n] bool: True where token i is data at timestep t (i < step_offsets[t − 1])."""
        self.data_tokens(t)                                  # range check
        return prefix_mask(self.step_offsets, t.long() - 1, self.num_tokens if n is None else n)

    @property
    def history(self):
        """DD-H's `student_history.HistorySpec` (None: a plain student)."""
        return getattr(self.backbone, "history", None)

    def new_history(self) -> HistoryCache:
        """An empty DD-H cache for one batch's sampling trajectory (`forward(..., history=cache)`)."""
        if self.history is None:
            raise ValueError("not a DD-H student (trained without --history)")
        return HistoryCache(self.history)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                history: Optional[HistoryCache] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, n, C] fp32 (data rows before step_offsets[t−1], noise after); labels: [B] int64
        (a text-to-image student: a `teachers.base.Caption`);
        t: [B] int64 paper timesteps -> (logits [B, n, V] fp32, emb [B, n, C] fp32); output i
        predicts clean token i. history: a DD-H student's cache (`new_history`): x is block
        `history.step` of the trajectory, which the call then advances. A 4-d x [B, K, n, C] with t the
        K timesteps is `forward_blocks` (so that a DDP wrapper sees the teacher-forced DD-H forward)."""
        if x.dim() == 4:
            return self.forward_blocks(x, labels, t)
        B, n, C = x.shape
        if C != self.config.codebook_dim:
            raise ValueError(f"x has {C} channels, the codebook {self.config.codebook_dim}")
        t = t.to(x.device).long().reshape(B)
        if self.config.output == "ar_diffusion":
            return self._ar_diffusion_forward(x, labels, t, history)
        if history is None:
            logits, emb = self.backbone(x, as_condition(labels, x.device), self.data_mask(t, n))
        else:
            logits, emb = self.backbone(x, as_condition(labels, x.device), self.data_mask(t, n), history=history)
        if self.config.output == "velocity":
            emb = x.float() - emb
        return logits, emb

    def _ar_diffusion_forward(self, x, labels, t, history) -> Tuple[torch.Tensor, torch.Tensor]:
        """DD2's AR-diffusion generator: emb = x − v(x) at t = 1 (x the noise); logits = the nearest-code
        scores 2⟨emb, c_j⟩ − ‖c_j‖² (their argmax is the snapped output)."""
        if history is not None or bool((t != 1).any()):
            raise ValueError("an AR-diffusion generator samples in one step from noise (t = 1, no history)")
        emb = x.float() - self.backbone.generator_velocity(x.float(), as_condition(labels, x.device)).float()
        cb = self.codebook
        return 2.0 * emb @ cb.t() - cb.pow(2).sum(-1), emb

    def forward_blocks(self, xs: torch.Tensor, labels: torch.Tensor, ts: Sequence[int]
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """DD-H teacher-forced, one forward over a trajectory's K inputs: xs [B, K, n, C] (block k =
        X_{ts[k]}); labels [B] -> (logits [B, K, n, V], emb [B, K, n, C])."""
        B, K, n, C = xs.shape
        if len(ts) != K:
            raise ValueError(f"{K} blocks but {len(ts)} timesteps")
        t = torch.tensor([int(v) for v in ts], device=xs.device).repeat(B)     # [B·K]
        is_data = self.data_mask(t, n).view(B, K, n)
        return self.backbone.forward_blocks(xs, as_condition(labels, xs.device), is_data)


def as_condition(labels, device):
    """Class labels [B] -> int64 on `device`; a Caption (text-to-image) -> moved to `device`."""
    if isinstance(labels, Caption):
        return labels.to(device)
    return labels.to(device).long()


# ---- building ---------------------------------------------------------------------------------
def build_student(teacher, timesteps: Optional[Sequence[int]] = None, split: Optional[int] = None,
                  seed: int = 0, output: str = "embedding", **opts) -> DDStudent:
    """A student initialised from `teacher` (a `teachers.base.Teacher`) on the teacher's device.

    timesteps / split: None = the paper's defaults scaled to the teacher (`default_schedule`).
    seed: seeds the initialisation of the new tensors (the same student on every rank).
    output: "embedding" (DD), "velocity" (DD2's generator: embedding = input − head output) or
    "ar_diffusion" (DD2's AR-diffusion model as a generator, `opts` head_width=W: a `csd_nets.GuidanceNet`
    of width W over the backbone, zero last layer).
    opts: backbone options (VAR: layerwise_n_d_embed=True; DD-H: history="none"|"noise"|"all",
    lower_layers=N, whose history_steps is the number of timesteps).
    """
    cls = backbone_class(teacher.family)
    model = cls.config_from_teacher(teacher)
    d_ts, d_split = default_schedule(teacher.family, model, teacher.num_steps)
    timesteps = d_ts if timesteps is None else tuple(timesteps)
    split = d_split if split is None else split
    if max(timesteps) > teacher.num_steps:
        raise ValueError(f"timesteps {tuple(timesteps)} exceed the teacher's {teacher.num_steps} AR steps")
    if not 0 <= split <= teacher.num_steps:
        raise ValueError(f"--split {split}: must be in [0, {teacher.num_steps}] for this teacher "
                         "(0: the embedding head at every step)")
    if opts.get("history") is not None:
        opts = dict(opts, history_steps=len(timesteps))
    head_width = opts.pop("head_width", None)
    if (output == "ar_diffusion") != (head_width is not None):
        raise ValueError("head_width is given exactly for output ar_diffusion")
    codebook = teacher.codebook.float()
    dev = codebook.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        backbone = cls.from_teacher(teacher, **opts)
    config = StudentConfig(family=teacher.family, model=model, codebook_dim=codebook.shape[1],
                           vocab_size=codebook.shape[0], timesteps=tuple(timesteps), split=split,
                           options=backbone.options(), output=output, head_width=head_width)
    if output == "ar_diffusion":
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            backbone = _ar_diffusion_net(config, backbone)
    return DDStudent(config, backbone.to(dev), codebook)


def _ar_diffusion_net(config: StudentConfig, backbone: nn.Module) -> nn.Module:
    from .csd_nets import GuidanceNet
    return GuidanceNet(backbone, backbone.step_sizes, config.codebook_dim, config.head_width)


def build_backbone_loaded(config: StudentConfig, source, *, nesting=(), ignore=(), device="cpu",
                           weights_only: bool = True, what: str = "DD student"):
    from teachers.checkpoint import load_strict
    cls = backbone_class(config.family)

    def build():
        net = cls.build(config.model, config.codebook_dim, **config.options)
        return _ar_diffusion_net(config, net) if config.output == "ar_diffusion" else net
    return load_strict(build, source,
                       ignore=ignore, nesting=nesting, device=device, dtype=torch.float32,
                       weights_only=weights_only, what=what)
