"""ARD student (Kim et al., "Autoregressive Distillation of Diffusion Transformers", CVPR 2025): a copy
of a DiT teacher that predicts the next state of a few-step trajectory from the states so far.

The student reads S inputs x_0 (noise), x_1, ..., x_{S-1} (teacher-forced in training, its own outputs
when sampling). Each goes through the teacher's shared patch embedder + position embedding; the S·L
tokens are concatenated, and every token is adaLN-modulated by its own input's conditioning
c_k = t_emb(timesteps[k]) + y_emb(label). The lower N blocks attend across inputs with the mask M of
`history_mask.py` (M1 current only = step distillation, M2 window of 2, M3 noise + current, M4
block-causal, the default); the upper blocks see only their own input (block-diagonal). Head k (one
teacher final layer per step) reads input k's tokens and outputs state k+1 directly: a regression
target, so each head keeps only the first C (ε) channels of the teacher's head when it learns σ.

Key layout (what `load_ard_student` / `load_ard_state_dict` accept, strictly): the teacher's DiT keys
(`x_embedder.*`, `t_embedder.*`, `y_embedder.*`, `pos_embed`, `blocks.{i}.*`) with `final_layer.*`
replaced by `heads.{k}.*` (k < S); `heads.{k}.linear` is [p*p*C, D].

    student = build_ard_student(teacher.model, ARDConfig(teacher.model.cfg.to_dict(), 4, 6, "M4",
                                                         (999, 749, 499, 249)))
    out = student(states[:, :-1], labels)                  # [B, S, C, H, W], teacher-forced
    traj = ard_sample(student, torch.randn(B, C, H, W), labels)   # [B, S+1, C, H, W]

Sampling runs one input at a time: each step embeds only the new input's L tokens, the lower N blocks
attend over K/V cached from the earlier inputs the mask lets it see (nothing is cached in the upper
blocks), so an ARD step costs a step-distillation step plus the N lower blocks' wider attention.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from teachers.checkpoint import CheckpointFileError, CheckpointMismatchError, StateSource, check_keys, load_strict
from teachers.dit import (DiT, DiTBlock, DiTConfig, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder,
                          sincos_pos_embed_2d, unpatchify)

from .history_mask import canonical, history_mask, visible_blocks

# per lower block: {input index j: (keys, values) [B, heads, L, head_dim]}
KVCache = List[Dict[int, Tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class ARDConfig:
    """dit: the teacher's DiTConfig as a dict; num_steps: S (inputs = heads); lower_layers: N blocks
    (0..depth) that attend across inputs with `mask` ("M1".."M4" or an alias of history_mask);
    timesteps: S time labels, timesteps[k] for input k (999 for the noise)."""

    dit: dict
    num_steps: int
    lower_layers: int
    mask: str = "M4"
    timesteps: tuple = field(default=())

    def __post_init__(self):
        dit = DiTConfig.from_dict(dict(self.dit))       # validates the names
        object.__setattr__(self, "dit", dit.to_dict())
        object.__setattr__(self, "mask", canonical(self.mask))
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0 <= self.lower_layers <= dit.depth:
            raise ValueError(f"lower_layers must be in 0..{dit.depth} (the teacher's depth), got {self.lower_layers}")
        if len(self.timesteps) != self.num_steps:
            raise ValueError(f"{len(self.timesteps)} timesteps for {self.num_steps} steps (one time label per input)")

    @property
    def dit_config(self) -> DiTConfig:
        return DiTConfig.from_dict(self.dit)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["timesteps"] = list(self.timesteps)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ARDConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown ARD config keys {bad}; known: {sorted(names)}")
        return cls(**d)


# ---- attention over a teacher block's own weights, with a mask or with cached K/V -------------------
def _qkv(attn: nn.Module, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [B, T, D] -> q, k, v [B, heads, T, D/heads] through the block's `qkv` linear (timm's layout)."""
    B, T, D = y.shape
    h = attn.num_heads
    return attn.qkv(y).view(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, h, T, d], k/v [B, h, T', d], mask [T, T'] bool (True = may attend) -> [B, T, D] after `proj`."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    B, h, T, d = out.shape
    return attn.proj(out.transpose(1, 2).reshape(B, T, h * d))


def _block(block: DiTBlock, x: torch.Tensor, c: torch.Tensor, attention: Callable) -> torch.Tensor:
    """DiTBlock.forward with one conditioning per input: x [B, S, L, D], c [B, S, D];
    attention(attn, y [B, S, L, D]) -> [B, S, L, D]."""
    sh_a, sc_a, g_a, sh_m, sc_m, g_m = block.adaLN_modulation(c).unsqueeze(2).chunk(6, dim=-1)   # [B, S, 1, D]
    x = x + g_a * attention(block.attn, block.norm1(x) * (1 + sc_a) + sh_a)
    return x + g_m * block.mlp(block.norm2(x) * (1 + sc_m) + sh_m)


def _self_attention(attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Each input attends to itself only (the upper blocks): y [B, S, L, D] -> [B, S, L, D]."""
    B, S, L, D = y.shape
    return _attend(attn, *_qkv(attn, y.reshape(B * S, L, D))).view(B, S, L, D)


def _masked_attention(mask: torch.Tensor) -> Callable:
    """Across inputs with a [S·L, S·L] token mask (the lower blocks, teacher-forced)."""
    def attention(attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
        B, S, L, D = y.shape
        return _attend(attn, *_qkv(attn, y.reshape(B, S * L, D)), mask=mask).view(B, S, L, D)
    return attention


def _cached_attention(cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]], step: int, visible: List[int]) -> Callable:
    """One new input (step `step`) against the cached K/V of the inputs it may see (itself included,
    added to the cache first)."""
    def attention(attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
        B, S, L, D = y.shape                     # S == 1: the new input
        q, k, v = _qkv(attn, y.reshape(B, L, D))
        cache[step] = (k, v)
        missing = [j for j in visible if j not in cache]
        if missing:
            raise RuntimeError(f"ARD step {step}: no cached keys for inputs {missing} (steps must run in order 0..S-1)")
        if len(visible) == 1:
            keys, values = cache[visible[0]]
        else:
            keys = torch.cat([cache[j][0] for j in visible], dim=2)
            values = torch.cat([cache[j][1] for j in visible], dim=2)
        return _attend(attn, q, keys, values).view(B, 1, L, D)
    return attention


# ---- the student --------------------------------------------------------------------------------
class ARDStudent(nn.Module):
    """The teacher's trunk + S heads (module names = the DiT's, `heads` for `final_layer`).

    Built by `build_ard_student` (from a teacher) or `load_ard_student` (from a checkpoint); built
    directly it has PyTorch's default initialisation (and the fixed sin-cos positions)."""

    def __init__(self, config: ARDConfig):
        super().__init__()
        self.config = config
        cfg = config.dit_config
        self.dit_cfg = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        head_cfg = dataclasses.replace(cfg, learn_sigma=False)       # the state itself: C channels
        self.heads = nn.ModuleList([FinalLayer(head_cfg) for _ in range(config.num_steps)])
        self._masks: Dict[tuple, torch.Tensor] = {}        # (L, device) -> token mask (not state)
        if not self.pos_embed.is_meta:
            g = cfg.input_size // cfg.patch_size
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed_2d(cfg.hidden_size, g)[None])

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, C, H, W] -> tokens [B, S, L, D] (shared patch embedder + positions)."""
        B, S = x.shape[:2]
        tokens = self.x_embedder(x.flatten(0, 1).to(self.pos_embed.dtype)) + self.pos_embed      # [B·S, L, D]
        return tokens.view(B, S, *tokens.shape[1:])

    def _conditioning(self, labels: torch.Tensor, steps: range) -> torch.Tensor:
        """-> c [B, len(steps), D]: t_emb(timesteps[k]) + y_emb(labels) for each input k in `steps`."""
        t = torch.tensor([self.config.timesteps[k] for k in steps], device=labels.device)
        return self.t_embedder(t)[None] + self.y_embedder(labels)[:, None]

    def _head(self, k: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Head k on one input's tokens h [B, L, D], c [B, D] -> state k+1 [B, C, H, W]."""
        return unpatchify(self.heads[k](h, c), self.dit_cfg.patch_size, self.dit_cfg.in_channels)

    def _token_mask(self, L: int, device: torch.device) -> torch.Tensor:
        """[S·L, S·L] bool history_mask of the lower blocks, built once per device."""
        key = (L, str(device))
        if key not in self._masks:
            self._masks[key] = history_mask(self.num_steps, L, self.config.mask).to(device)
        return self._masks[key]

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: x [B, S, C, H, W] (inputs 0..S-1), labels [B] -> [B, S, C, H, W], where
        out[:, k] is head k's prediction of state k+1 from the inputs the mask lets input k see."""
        B, S = x.shape[:2]
        if S != self.num_steps:
            raise ValueError(f"ARD student takes {self.num_steps} inputs, got {S}")
        h = self._embed(x)
        c = self._conditioning(labels, range(S))
        L = h.shape[2]
        lower = self.config.lower_layers
        masked = _masked_attention(self._token_mask(L, h.device)) if lower else None
        for i, block in enumerate(self.blocks):
            h = _block(block, h, c, masked if i < lower else _self_attention)
        return torch.stack([self._head(k, h[:, k], c[:, k]) for k in range(S)], dim=1)

    def new_cache(self) -> KVCache:
        return [dict() for _ in range(self.config.lower_layers)]

    def step(self, x: torch.Tensor, k: int, labels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One sampling step: input k, x [B, C, H, W] -> state k+1 [B, C, H, W]; `cache` (new_cache())
        holds the lower blocks' K/V of inputs 0..k-1 and gains input k's (those no later step can see
        are dropped)."""
        S = self.num_steps
        if not 0 <= k < S:
            raise ValueError(f"step {k} out of range 0..{S - 1}")
        h = self._embed(x[:, None])
        c = self._conditioning(labels, range(k, k + 1))
        visible = visible_blocks(S, self.config.mask, k)
        for i, block in enumerate(self.blocks):
            h = _block(block, h, c, _cached_attention(cache[i], k, visible) if i < self.config.lower_layers
                       else _self_attention)
        later = {j for kk in range(k + 1, S) for j in visible_blocks(S, self.config.mask, kk)}
        for layer in cache:
            for j in [j for j in layer if j not in later]:
                del layer[j]
        return self._head(k, h[:, 0], c[:, 0])


@torch.no_grad()
def ard_sample(student: ARDStudent, noise: torch.Tensor, labels: torch.Tensor,
               callback: Optional[Callable[[int, torch.Tensor], None]] = None,
               teacher_forcing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """noise [B, C, H, W], labels [B] -> trajectory [B, S+1, C, H, W]: slot 0 the noise, slot k+1
    the student's output of step k (fed back as input k+1). K/V are cached in the N lower blocks only.

    callback(k + 1, state [B, C, H, W]) after each step. teacher_forcing: [B, S, C, H, W] inputs to
    use instead of the student's own outputs (input 0 = teacher_forcing[:, 0]); then slot k+1 equals
    the teacher-forced forward's out[:, k] (what the tests check)."""
    S = student.num_steps
    if teacher_forcing is not None and teacher_forcing.shape[1] != S:
        raise ValueError(f"teacher_forcing holds {teacher_forcing.shape[1]} inputs, the student takes {S}")
    cache = student.new_cache()
    states = [noise]
    for k in range(S):
        x = teacher_forcing[:, k] if teacher_forcing is not None else states[-1]
        out = student.step(x, k, labels, cache).to(noise.dtype)
        states.append(out)
        if callback is not None:
            callback(k + 1, out)
    return torch.stack(states, dim=1)


# ---- building and loading -----------------------------------------------------------------------
def _head_state(final_layer: Mapping[str, torch.Tensor], cfg: DiTConfig) -> Dict[str, torch.Tensor]:
    """The teacher's final-layer tensors for one head: its modulation as is, and of `linear` only the
    first in_channels outputs of each of the p·p positions (a token holds (p, p, C_out))."""
    p, C, C_out = cfg.patch_size, cfg.in_channels, cfg.out_channels
    w, b = final_layer["linear.weight"], final_layer["linear.bias"]
    return {
        "linear.weight": w.view(p, p, C_out, -1)[:, :, :C].reshape(p * p * C, w.shape[-1]).clone(),
        "linear.bias": b.view(p, p, C_out)[:, :, :C].reshape(p * p * C).clone(),
        "adaLN_modulation.1.weight": final_layer["adaLN_modulation.1.weight"].clone(),
        "adaLN_modulation.1.bias": final_layer["adaLN_modulation.1.bias"].clone(),
    }


def build_ard_student(teacher_model: Union[DiT, nn.Module], config: ARDConfig) -> ARDStudent:
    """A copy of the teacher (a `DiT`, or a DiT teacher: its `.model`) on its device and dtype, every
    head initialised from the teacher's final layer."""
    model = getattr(teacher_model, "model", teacher_model)
    if not isinstance(model, DiT):
        raise TypeError(f"an ARD student is built from a DiT, got {type(model).__name__}")
    if model.cfg.to_dict() != config.dit:
        raise ValueError(f"ARD config's DiT {config.dit} is not the teacher's {model.cfg.to_dict()}")
    ref = model.pos_embed
    with torch.device("meta"):
        student = ARDStudent(config)
    teacher_sd = model.state_dict()
    state = {k: v.detach().clone() for k, v in teacher_sd.items() if not k.startswith("final_layer.")}
    final = {k[len("final_layer."):]: v for k, v in teacher_sd.items() if k.startswith("final_layer.")}
    for k in range(config.num_steps):
        state.update({f"heads.{k}.{name}": v for name, v in _head_state(final, model.cfg).items()})
    load_ard_state_dict(student, state, assign=True)
    return student.to(device=ref.device, dtype=ref.dtype).train(model.training)


def expected_shapes(config: ARDConfig) -> Dict[str, torch.Size]:
    """{key: shape} of an ARD student's state dict (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in ARDStudent(config).state_dict().items()}


def _one_line(e: CheckpointMismatchError, where: Optional[str]) -> CheckpointMismatchError:
    msg = "; ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return CheckpointMismatchError(f"{where}: {msg}" if where else msg)


def load_ard_state_dict(student: ARDStudent, state: Mapping[str, torch.Tensor], *, assign: bool = False,
                        where: Optional[str] = None) -> ARDStudent:
    """Load `state` (the ARD key layout) into `student` strictly: a missing, unexpected or mis-shaped
    key raises one one-line CheckpointMismatchError naming it (prefixed by `where`, e.g. the file)."""
    expected = {k: v.shape for k, v in student.state_dict().items()}
    what = f"ARD student (S={student.num_steps}, DiT {student.config.dit})"
    try:
        check_keys(expected, state, what=what)
    except CheckpointMismatchError as e:
        raise _one_line(e, where) from None
    student.load_state_dict(dict(state), strict=True, assign=assign)
    student.pos_embed.requires_grad_(False)
    return student


def load_ard_student(config: ARDConfig, source: StateSource, *, device: Union[str, torch.device] = "cpu",
                     dtype: torch.dtype = torch.float32, where: Optional[str] = None) -> ARDStudent:
    """An ARD student from a checkpoint file or state dict in the ARD layout, strictly (built on the
    meta device, so it loads in about its own size). Mismatches raise one one-line
    CheckpointMismatchError naming the keys (and the file; `where` names an in-memory dict's origin)."""
    what = f"ARD student (S={config.num_steps}, DiT {config.dit})"
    try:
        student = load_strict(lambda: ARDStudent(config), source, device=device, dtype=dtype, what=what, nesting=())
    except CheckpointMismatchError as e:
        raise _one_line(e, where if not isinstance(source, (str, os.PathLike)) else None) from None
    except CheckpointFileError as e:            # NaN/inf tensors of an in-memory dict: name its origin
        raise CheckpointFileError(f"{where}: {e}" if where else str(e)) from None
    student.pos_embed.requires_grad_(False)
    return student
