"""The discrete VP (DDPM) diffusion of DiT / ADM as small pure functions over tensors.

x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε, t ∈ {0, ..., T−1}, ᾱ_t = Π_{s≤t} (1 − β_s), β linear from
1e-4 to 0.02 at T = 1000 (scaled by 1000/T otherwise, as ADM's `get_named_beta_schedule("linear")`).

A sampler sees the model only through `eps_fn(x [B, ...], t [B] int64) -> ε [B, ...]` with t the
*original* timestep (what the network was trained on), so respacing is just the list of timesteps
visited. Schedules are float64; coefficients are cast to fp32 before touching tensors, as ADM does.

    ts = spaced_timesteps(1000, 25)                         # [0, 42, 83, ..., 957, 999]
    x0 = ddim_sample(eps_fn, noise, ts, linear_alphas_cumprod(1000), callback=record)
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """[T] float64 β, linear over T steps; the endpoints scale by 1000/T so that any T matches the
    same continuous process."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def linear_alphas_cumprod(num_timesteps: int = 1000) -> np.ndarray:
    """[T] float64 ᾱ_t of the linear schedule."""
    return np.cumprod(1.0 - linear_betas(num_timesteps))


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> List[int]:
    """ADM/DiT respacing: split [0, T) into len(section_counts) equal sections (the first T mod n
    one step longer) and take `count` evenly strided, rounded steps from each. "ddimN" is the DDIM
    paper's integer stride instead. Returns the kept timesteps, ascending.

    space_timesteps(1000, "25") -> [0, 42, 83, 125, ..., 957, 999]; "5" -> [0, 250, 500, 749, 999].
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} of {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # accumulated (not multiplied) and rounded half-to-even, so the indices match ADM's exactly
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def spaced_timesteps(num_timesteps: int, steps: Union[int, str]) -> List[int]:
    """The timesteps a `steps`-step sampler visits, descending (first = the noisiest)."""
    return space_timesteps(num_timesteps, str(steps) if isinstance(steps, int) else steps)[::-1]


def _coef(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] (float64 table) as fp32 [B, 1, ...] broadcastable to `like`."""
    v = torch.from_numpy(values).to(t.device)[t].float()
    return v.view(-1, *([1] * (like.dim() - 1)))


def predict_x0(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: np.ndarray) -> torch.Tensor:
    """x̂_0 = x_t / sqrt(ᾱ_t) − sqrt(1/ᾱ_t − 1)·ε; x, eps [B, ...], t [B] original timesteps."""
    return (_coef(np.sqrt(1.0 / alphas_cumprod), t, x) * x
            - _coef(np.sqrt(1.0 / alphas_cumprod - 1), t, x) * eps)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: np.ndarray) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε (the forward process, for training and tests)."""
    return _coef(np.sqrt(alphas_cumprod), t, x0) * x0 + _coef(np.sqrt(1.0 - alphas_cumprod), t, x0) * noise


def ddim_step(x: torch.Tensor, t: torch.Tensor, t_prev: Optional[int], eps: torch.Tensor,
              alphas_cumprod: np.ndarray, clip_x0: Optional[float] = None):
    """One deterministic DDIM (η = 0) step from timestep t to t_prev (None = to the data, ᾱ = 1).

    Returns (x_prev, x̂_0). ε is re-derived from the (possibly clipped) x̂_0, as ADM does.
    """
    x0 = predict_x0(x, t, eps, alphas_cumprod)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    eps = (_coef(np.sqrt(1.0 / alphas_cumprod), t, x) * x - x0) / _coef(np.sqrt(1.0 / alphas_cumprod - 1), t, x)
    prev = np.ones_like(alphas_cumprod) if t_prev is None else np.full_like(alphas_cumprod, alphas_cumprod[t_prev])
    a_prev = _coef(prev, t, x)
    return x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev) * eps, x0


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, noise: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: np.ndarray,
                callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
                clip_x0: Optional[float] = None) -> torch.Tensor:
    """Deterministic DDIM over `timesteps` (descending original timesteps, e.g. `spaced_timesteps`).

    noise: x_T [B, ...]. callback(i, t, x_t, x̂_0) sees, at every step i, the state it starts from
    and the model's clean prediction there; the return value is the final state (= the last x̂_0).
    clip_x0: clamp x̂_0 to ±clip_x0 (ADM's clip_denoised for pixel models; None for latents).
    """
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts[:6]}...")
    x = noise
    B = x.shape[0]
    for i, t in enumerate(ts):
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        eps = eps_fn(x, tt)
        x_next, x0 = ddim_step(x, tt, ts[i + 1] if i + 1 < len(ts) else None, eps, alphas_cumprod, clip_x0)
        if callback is not None:
            callback(i, t, x, x0)
        x = x_next
    return x
