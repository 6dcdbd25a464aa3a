"""The Distilled Decoding student: one network that maps (X_t, t) to the clean token sequence.

A DD student is the teacher's transformer turned into a one-step denoiser over the whole sequence
(Liu et al. 2025, §3.3 and the authors' released models). Its input is a sequence of n continuous
vectors of the codebook space, X_t = [data rows of the first t−1 AR steps, Gaussian noise after]
(`make_xt`), its output at token i's own slot predicts clean token i twice: logits over the codebook
(the teacher's head) and a continuous embedding (`final_layer_conti`). `dd_step` is one step of the
sampler (Algorithm 3): positions of AR steps < `split` take the greedy logits head, the others the
embedding head.

Timesteps are the paper's, 1-indexed over AR steps (a LlamaGen step = 1 token, a VAR step = 1 scale):
at t the first t − 1 steps are data, `step_offsets[t − 1]` tokens. The authors' code uses t − 1;
`load_official` is the only place that meets their files.

Family differences live in two backbone classes selected here by the teacher's family
(`BACKBONES`), each one readable file whose state dict is exactly the released layout:

    distilled_decoding/student_llamagen.py  LlamaGenDD  (LlamaGen-DD-B / -L, "ema" in the release)
    distilled_decoding/student_var.py       VARDD       (VAR-DD-d16/20/24, "trainer.ema_parameters")

A backbone provides `step_sizes`, `forward(x, labels, is_data) -> (logits, emb)`, the classmethods
`from_teacher(teacher, **opts)`, `config_from_teacher(teacher)`, `build(model, codebook_dim, **opts)`,
`paper_defaults(model, num_steps)`, and the class attributes `OFFICIAL_NESTING`, `OFFICIAL_IGNORE`.

Run directory (written by `save_run`, read by `load_run`; `dd sample` needs nothing else):

    config.json            {"format": "dd-student", "student": StudentConfig, "teacher": TeacherSpec, ...}
    student.safetensors    backbone weights (EMA by default) in the released key layout
    student_raw.safetensors  the non-EMA weights (when an EMA exists)
    codebook.safetensors   {"codebook": [V, C] fp32} the teacher's codebook (l2-normalised for LlamaGen)
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .fileio import atomic_json, link_or_copy, save_state_dict  # noqa: F401
from .flowmap import nearest_code

# family -> "module:Class" of its backbone (imported lazily: the backbone files import FinalLayer from here)
BACKBONES = {
    "llamagen": "distilled_decoding.student_llamagen:LlamaGenDD",
    "var": "distilled_decoding.student_var:VARDD",
}

RUN_FORMAT = "dd-student"
RUN_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "student.safetensors"
RAW_WEIGHTS_FILE = "student_raw.safetensors"
CODEBOOK_FILE = "codebook.safetensors"


def backbone_class(family: str):
    if family not in BACKBONES:
        raise ValueError(f"no DD student for teacher family {family!r}; families: {sorted(BACKBONES)}")
    mod, name = BACKBONES[family].split(":")
    return getattr(importlib.import_module(mod), name)


# ---- config -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudentConfig:
    """Everything needed to rebuild a student (saved in every run's config.json).

    family: the teacher family ("llamagen" | "var"); model: the teacher transformer's config dict
    (official GPTConfig / VARConfig names; the backbone derives its own shapes from it);
    codebook_dim: C; vocab_size: V; timesteps: training timesteps (paper notation, e.g. (1, 81));
    split: AR steps < split take the logits head at sampling time; options: family options of the
    backbone (VAR: {"layerwise_n_d_embed": True}).
    """

    family: str
    model: dict
    codebook_dim: int
    vocab_size: int
    timesteps: tuple
    split: int
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        object.__setattr__(self, "split", int(self.split))
        if self.family not in BACKBONES:
            raise ValueError(f"unknown student family {self.family!r}; choose from {sorted(BACKBONES)}")
        if not self.timesteps or min(self.timesteps) < 1:
            raise ValueError(f"timesteps are 1-indexed AR steps (t = 1: pure noise), got {self.timesteps}")

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


def default_schedule(family: str, model: dict, num_steps: int) -> Tuple[tuple, int]:
    """The paper's (timesteps, split) for this teacher, scaled to its number of AR steps.

    Paper values (LlamaGen-B {1, 81}/80, -L {1, 81}/130, VAR-d16 {1, 6}/5, d20/d24 {1, 5}/4) hold for
    teachers with the paper's step count (256 tokens, 10 scales). For other teachers (tiny ones) the
    data prefix and the split are scaled by num_steps / paper_num_steps, rounding half up:
    t2 = 1 + round((t2_paper − 1)·r) clipped to [2, num_steps], split = round(split_paper·r) clipped
    to [1, num_steps]. E.g. a 16-token LlamaGen gets {1, 6} and split 5; a 3-scale VAR {1, 3}, split 2.
    """
    paper_steps, timesteps, split = backbone_class(family).paper_defaults(model)
    if num_steps == paper_steps:
        return tuple(timesteps), int(split)
    r = num_steps / paper_steps
    rnd = lambda v: int(v * r + 0.5)  # noqa: E731 - round half up (Python's round is to even)
    ts = sorted({1} | {min(max(1 + rnd(t - 1), 2), num_steps) for t in timesteps if t > 1})
    return tuple(ts), min(max(rnd(split), 1), num_steps)


# ---- the shared embedding head ------------------------------------------------------------------
class FinalLayer(nn.Module):
    """The released embedding head (PixArt's final layer): LayerNorm (no affine, eps 1e-6), then
    x·(1 + scale) + shift with (shift, scale) = scale_shift_table [2, D] + the class embedding, then
    Linear(D, C_out)."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D]; cond: [B, D] or [B, 1, D] class embedding -> [B, L, C_out]"""
        cond = cond.reshape(cond.shape[0], 1, -1)
        shift, scale = (self.scale_shift_table[None] + cond).chunk(2, dim=1)   # [B, 1, D] each
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


# ---- the student ------------------------------------------------------------------------------
def offsets_of(step_sizes: Sequence[int]) -> tuple:
    offs = [0]
    for k in step_sizes:
        offs.append(offs[-1] + int(k))
    return tuple(offs)


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
        n = self.num_tokens if n is None else n
        return torch.arange(n, device=t.device)[None, :] < self.data_tokens(t)[:, None]

    def forward(self, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, n, C] fp32 (data rows before step_offsets[t−1], noise after); labels: [B] int64;
        t: [B] int64 paper timesteps -> (logits [B, n, V] fp32, emb [B, n, C] fp32); output i
        predicts clean token i."""
        B, n, C = x.shape
        if C != self.config.codebook_dim:
            raise ValueError(f"x has {C} channels, the codebook {self.config.codebook_dim}")
        t = t.to(x.device).long().reshape(B)
        return self.backbone(x, labels.to(x.device).long(), self.data_mask(t, n))


def make_xt(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
            step_offsets: Sequence[int]) -> torch.Tensor:
    """X_t: data [B, n, C] before step_offsets[t − 1], noise [B, n, C] from there on; t: [B]."""
    B, n, _ = data.shape
    offs = torch.tensor(step_offsets, device=data.device)
    keep = torch.arange(n, device=data.device)[None, :] < offs[t.to(data.device).long() - 1][:, None]
    return torch.where(keep[..., None], data, noise)


@torch.no_grad()
def dd_step(student: DDStudent, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
            split: Optional[int] = None, snap: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """One sampler step F_theta(X_t, t) (Algorithm 3).

    x: [B, n, C]; labels: [B]; t: [B] (or int) paper timestep; split: AR steps < split take
    codebook[argmax logits], the rest the embedding head (default: the student's split); snap: also
    snap the embedding-head outputs to their nearest codebook rows. Tokens before step_offsets[t − 1]
    are kept from x (they are data). Returns (x_next [B, n, C] fp32, idx [B, n] int64 = nearest
    codebook index of every position of x_next).
    """
    B, n, C = x.shape
    if not torch.is_tensor(t):
        t = torch.full((B,), int(t), dtype=torch.long)
    t = t.to(x.device).long().reshape(B)
    split = student.config.split if split is None else int(split)
    split = min(max(split, 0), student.num_steps)
    logits, emb = student(x, labels, t)
    cb = student.codebook.to(x.device)
    pos = torch.arange(n, device=x.device)
    below = (pos < student.step_offsets[split])[None, :, None]             # [1, n, 1]
    pred = torch.where(below, cb[logits.argmax(-1)], emb.float())            # [B, n, C]
    if snap:
        pred = torch.where(below, pred, cb[nearest_code(emb.reshape(-1, C).float(), cb).view(B, n)])
    keep = student.data_mask(t, n)[..., None]                                # [B, n, 1]
    x_next = torch.where(keep, x.float(), pred)
    idx = nearest_code(x_next.reshape(-1, C), cb).view(B, n)
    return x_next, idx


# ---- losses -----------------------------------------------------------------------------------
def masked_mean(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """v, mask: [B, n] -> [B] mean of v over each row's True positions (0 for an empty row)."""
    m = mask.to(v.dtype)
    return (v * m).sum(1) / m.sum(1).clamp_min(1)


def mse_emb_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pred, target: [B, n, C]; mask: [B, n] -> [B] mean over masked positions of the per-token
    mean squared error (mean over C)."""
    return masked_mean((pred.float() - target.float()).pow(2).mean(-1), mask)


def dd_loss(student: nn.Module, noise: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
            t: torch.Tensor, *, codebook: torch.Tensor, step_offsets: Sequence[int],
            lambda_ce: float = 0.1, lambda_emb: float = 1.0, emb_loss=None) -> Tuple[torch.Tensor, dict]:
    """The training loss of one batch (per-sample means, then the batch mean).

    noise: [B, n, C]; tokens: [B, n] int64 (the teacher's flow-map tokens); labels, t: [B].
    X_t = make_xt(codebook[tokens], noise, t); on the noise positions (i >= step_offsets[t − 1]):
    λ_ce·CE(logits, tokens) + λ_emb·d(emb, codebook[tokens]). d = `emb_loss(pred_emb, target_emb,
    noise_mask) -> [B]` (default `mse_emb_loss`; the LPIPS loss of train.py composes the full
    sequence and compares decoded images). `student` may be DDP-wrapped (it is only called).
    Returns (loss scalar, {"ce": [B], "emb": [B]} detached per-sample parts).
    """
    emb_loss = mse_emb_loss if emb_loss is None else emb_loss
    data = codebook[tokens]                                                   # [B, n, C]
    x = make_xt(data, noise, t, step_offsets)
    offs = torch.tensor(step_offsets, device=noise.device)
    n = tokens.shape[1]
    mask = torch.arange(n, device=noise.device)[None, :] >= offs[t.long() - 1][:, None]   # [B, n]
    logits, emb = student(x, labels, t)
    B, _, V = logits.shape
    ce_tok = F.cross_entropy(logits.float().reshape(B * n, V), tokens.reshape(B * n),
                             reduction="none").view(B, n)
    ce = masked_mean(ce_tok, mask)                                            # [B]
    d = emb_loss(emb.float(), data, mask)                                     # [B]
    loss = (lambda_ce * ce + lambda_emb * d).mean()
    return loss, {"ce": ce.detach(), "emb": d.detach()}


# ---- building ---------------------------------------------------------------------------------
def build_student(teacher, timesteps: Optional[Sequence[int]] = None, split: Optional[int] = None,
                  seed: int = 0, **opts) -> DDStudent:
    """A student initialised from `teacher` (a `teachers.base.Teacher`) on the teacher's device.

    timesteps / split: None = the paper's defaults scaled to the teacher (`default_schedule`).
    seed: seeds the initialisation of the new tensors (the same student on every rank).
    opts: backbone options (VAR: layerwise_n_d_embed=True).
    """
    cls = backbone_class(teacher.family)
    model = cls.config_from_teacher(teacher)
    d_ts, d_split = default_schedule(teacher.family, model, teacher.num_steps)
    timesteps = d_ts if timesteps is None else tuple(timesteps)
    split = d_split if split is None else split
    if max(timesteps) > teacher.num_steps:
        raise ValueError(f"timesteps {tuple(timesteps)} exceed the teacher's {teacher.num_steps} AR steps")
    codebook = teacher.codebook.float()
    dev = codebook.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        backbone = cls.from_teacher(teacher, **opts)
    config = StudentConfig(family=teacher.family, model=model, codebook_dim=codebook.shape[1],
                           vocab_size=codebook.shape[0], timesteps=tuple(timesteps), split=split,
                           options=backbone.options())
    return DDStudent(config, backbone.to(dev), codebook)


def _build_backbone_loaded(config: StudentConfig, source, *, nesting=(), ignore=(), device="cpu",
                           weights_only: bool = True, what: str = "DD student"):
    from teachers.checkpoint import load_strict
    cls = backbone_class(config.family)
    return load_strict(lambda: cls.build(config.model, config.codebook_dim, **config.options), source,
                       ignore=ignore, nesting=nesting, device=device, dtype=torch.float32,
                       weights_only=weights_only, what=what)


def load_official(path, teacher, *, ema: bool = True, timesteps: Optional[Sequence[int]] = None,
                  split: Optional[int] = None, weights_only: bool = True, **opts) -> DDStudent:
    """A released DD checkpoint (microsoft/distilled_decoding) -> DDStudent, strictly.

    LlamaGen-DD (`llamagen-B.pt`, `llamagen-L.pt`): weights under "ema" (ema=False: "model").
    VAR-DD (`var-d16.pth` ...): under trainer.ema_parameters (ema=False: trainer.var_wo_ddp).
    Every key and shape must match the student built from `teacher`'s config; only derived buffers
    (RoPE tables, KV caches, VAR's level ids / masks / zero k-biases) are ignored and rebuilt.
    timesteps / split: None = the paper's settings for that model (README: LlamaGen-B split 80, -L 130,
    VAR-d16 {1, 6} / 5, d20/d24 {1, 5} / 4). opts: backbone options (VAR: layerwise_n_d_embed).
    """
    cls = backbone_class(teacher.family)
    model = cls.config_from_teacher(teacher)
    d_ts, d_split = default_schedule(teacher.family, model, teacher.num_steps)
    codebook = teacher.codebook.float()
    config = StudentConfig(family=teacher.family, model=model, codebook_dim=codebook.shape[1],
                           vocab_size=codebook.shape[0],
                           timesteps=d_ts if timesteps is None else tuple(timesteps),
                           split=d_split if split is None else split,
                           options=cls.default_options(**opts))
    nesting = cls.OFFICIAL_NESTING if ema else cls.OFFICIAL_NESTING_RAW
    backbone = _build_backbone_loaded(config, path, nesting=nesting, ignore=cls.OFFICIAL_IGNORE,
                                      device=codebook.device, weights_only=weights_only,
                                      what=f"released {teacher.family} DD student ({'ema' if ema else 'raw'})")
    return DDStudent(config, backbone, codebook).eval()


# ---- run directories --------------------------------------------------------------------------
def save_run(run_dir: str, student: DDStudent, ema_state: Optional[dict], config: StudentConfig,
             extra: dict) -> None:
    """Write a self-contained run directory (see the module docstring).

    ema_state: the EMA backbone state dict (`ema.backbone.state_dict()`), saved as student.safetensors
    with the raw weights in student_raw.safetensors; None = the student's weights as student.safetensors.
    extra: JSON-able run information merged into config.json; "teacher" should be the TeacherSpec dict.
    """
    os.makedirs(run_dir, exist_ok=True)
    raw = student.backbone.state_dict()
    if ema_state is not None:
        save_state_dict(os.path.join(run_dir, WEIGHTS_FILE), ema_state, {"weights": "ema"})
        save_state_dict(os.path.join(run_dir, RAW_WEIGHTS_FILE), raw, {"weights": "raw"})
    else:
        save_state_dict(os.path.join(run_dir, WEIGHTS_FILE), raw, {"weights": "raw"})
    save_state_dict(os.path.join(run_dir, CODEBOOK_FILE), {"codebook": student.codebook.float()})
    write_run_config(run_dir, config, dict(extra, weights="ema" if ema_state is not None else "raw"))


def write_run_config(run_dir: str, config: StudentConfig, extra: dict) -> None:
    info = dict(extra)
    info.update({"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "student": config.to_dict()})
    atomic_json(os.path.join(run_dir, CONFIG_FILE), info)


def read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a DD run directory (no {CONFIG_FILE})")
    with open(path) as f:
        info = json.load(f)
    if info.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: format {info.get('format')!r}, expected {RUN_FORMAT!r}")
    return info


def load_run(run_dir: str, device: Union[str, torch.device] = "cpu", ema: bool = True
             ) -> Tuple[DDStudent, dict]:
    """Rebuild the student of a run directory -> (student in eval mode, run_info).

    ema: the EMA weights (student.safetensors); False = the raw weights (student_raw.safetensors,
    or student.safetensors when the run has no EMA). run_info is config.json: "student" (the
    StudentConfig dict), "teacher" (the TeacherSpec dict), "split", "timesteps", "data", "train", ...
    """
    from safetensors.torch import load_file
    info = read_run_config(run_dir)
    config = StudentConfig.from_dict(info["student"])
    name = WEIGHTS_FILE
    if not ema and os.path.exists(os.path.join(run_dir, RAW_WEIGHTS_FILE)):
        name = RAW_WEIGHTS_FILE
    # cloned: safetensors hands out views into one buffer at arbitrary alignment, and misaligned
    # weights take other SIMD paths (last-bit differences from the in-memory model)
    state = {k: v.clone() for k, v in load_file(os.path.join(run_dir, name)).items()}
    backbone = _build_backbone_loaded(config, state, device=device, what=f"DD student of {run_dir}/{name}")
    codebook = load_file(os.path.join(run_dir, CODEBOOK_FILE))["codebook"].to(device)
    student = DDStudent(config, backbone, codebook).eval()
    return student, info
