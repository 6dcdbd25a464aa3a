"""Analytic GFLOPs per image of a DiT teacher forward, an S-step step-distillation student and an ARD
student (S, N, mask), as sampled (one input at a time, K/V cached in the N lower blocks).

Counting convention: the DiT paper's (and fvcore's) - one multiply-add is one FLOP, and only matrix
products count (linear layers, the patch-embedding convolution, the two attention products QKᵀ and
AV); norms, softmax, activations, modulation and embedding lookups are free. With L tokens, width D,
MLP ratio r, patch p and C_in/C_out channels, one DiT forward is

    depth·[(4 + 2r)·L·D² + 2·L·L_kv·D + 6·D²]      blocks: qkv+proj, MLP, QKᵀ+AV over L_kv keys, adaLN
    + L·p²·C_in·D                                  patch embedding
    + 256·D + D² + 2·D² + L·D·p²·C_out             time MLP, final adaLN, final linear

with L_kv = L. DiT-XL/2 at 256 px (L = 256, D = 1152, depth 28): 118.6 GFLOPs (the DiT paper's figure).
A step-distillation student runs that S times (its heads have C_in outputs: the state, not ε and σ).
An ARD student is the same except that at step k its N lower blocks attend to the keys of every input
the mask shows (|visible_k|·L keys), so it costs N·2·L²·D·(|visible_k| − 1) more at step k: over S
steps N·2L²D·S(S−1)/2 for M4, N·2L²D·(S−1) for M2 and M3, nothing for M1. Table 1 of the ARD paper:
474.4 GFLOPs (step distillation, 4 steps) -> 479.9 (ARD, N = 6, M4), +1.1%.
"""
from __future__ import annotations

from typing import Optional, Union

from teachers.dit import DiTConfig, as_dit_config

from .history_mask import visible_blocks

GIGA = 1e9
TIME_FREQUENCIES = 256          # TimestepEmbedder's sinusoid width (teachers/dit.py)


def _cfg(config: Union[str, dict, DiTConfig], image_size: int = 256) -> DiTConfig:
    return as_dit_config(config, image_size)


def block_macs(cfg: DiTConfig, kv_tokens: Optional[int] = None) -> float:
    """Multiply-adds of one DiT block on one input's L tokens attending to `kv_tokens` keys (default L)."""
    L, D = cfg.num_patches, cfg.hidden_size
    kv = L if kv_tokens is None else kv_tokens
    hidden = int(D * cfg.mlp_ratio)
    linear = L * D * 3 * D + L * D * D + 2 * L * D * hidden
    attention = 2 * L * kv * D
    return linear + attention + D * 6 * D


def forward_macs(cfg: DiTConfig, out_channels: Optional[int] = None, kv_tokens: Optional[list] = None) -> float:
    """One forward on one input. out_channels: the head's channels (default the DiT's own, ε and σ);
    kv_tokens: per block, the keys it attends to (default L each)."""
    L, D, p = cfg.num_patches, cfg.hidden_size, cfg.patch_size
    out = cfg.out_channels if out_channels is None else out_channels
    kv = kv_tokens if kv_tokens is not None else [L] * cfg.depth
    embed = L * p * p * cfg.in_channels * D + TIME_FREQUENCIES * D + D * D
    head = D * 2 * D + L * D * p * p * out
    return embed + sum(block_macs(cfg, k) for k in kv) + head


def dit_gflops(config: Union[str, dict, DiTConfig] = "DiT-XL/2", image_size: int = 256) -> float:
    """GFLOPs per image of one teacher forward (one image, no CFG batch doubling)."""
    return forward_macs(_cfg(config, image_size)) / GIGA


def step_distillation_gflops(config: Union[str, dict, DiTConfig], num_steps: int, image_size: int = 256) -> float:
    """GFLOPs per image of an S-step step-distillation student (S forwards, C_in-channel heads)."""
    cfg = _cfg(config, image_size)
    return num_steps * forward_macs(cfg, out_channels=cfg.in_channels) / GIGA


def ard_gflops(config: Union[str, dict, DiTConfig], num_steps: int, lower_layers: int, mask: str = "M4",
               image_size: int = 256) -> float:
    """GFLOPs per image of an ARD student sampling S steps: step k's N lower blocks attend to the L
    tokens of each input visible to it (history_mask.visible_blocks), the upper blocks to L."""
    cfg = _cfg(config, image_size)
    if not 0 <= lower_layers <= cfg.depth:
        raise ValueError(f"lower_layers must be in 0..{cfg.depth}, got {lower_layers}")
    L = cfg.num_patches
    total = 0.0
    for k in range(num_steps):
        seen = len(visible_blocks(num_steps, mask, k)) * L
        kv = [seen] * lower_layers + [L] * (cfg.depth - lower_layers)
        total += forward_macs(cfg, out_channels=cfg.in_channels, kv_tokens=kv)
    return total / GIGA


def ard_config_gflops(config) -> float:
    """ard_gflops of an ARDConfig (distilled_decoding.ard_student)."""
    return ard_gflops(DiTConfig.from_dict(config.dit), config.num_steps, config.lower_layers, config.mask)


def table(config: Union[str, dict, DiTConfig] = "DiT-XL/2", num_steps: int = 4, lower_layers: int = 6,
          image_size: int = 256) -> str:
    """A markdown table: teacher forward, step distillation and ARD (M1..M4) GFLOPs per image."""
    sd = step_distillation_gflops(config, num_steps, image_size)
    rows = [("DiT teacher, one forward", dit_gflops(config, image_size)),
            (f"step distillation, {num_steps} steps", sd)]
    rows += [(f"ARD {m}, N = {lower_layers}, {num_steps} steps", ard_gflops(config, num_steps, lower_layers, m, image_size))
             for m in ("M1", "M2", "M3", "M4")]
    name = config if isinstance(config, str) else "DiT"
    lines = [f"| {name} at {image_size} px | GFLOPs / image | vs step distillation |", "|---|---:|---:|"]
    lines += [f"| {what} | {g:.1f} | {100 * (g / sd - 1):+.2f}% |" for what, g in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table())
