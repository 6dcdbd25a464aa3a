"""Sample-quality metrics: pure functions over features (numpy or torch, any device).

    mu, sigma = feature_stats(feats)                       # [N, D] -> float64 [D], [D, D]
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)        # pytorch-fid's formula and eps fallback
    is_mean, is_std = inception_score(logits, splits=10)   # improved-GAN / ADM split scheme
    precision, recall = precision_recall(real, fake, k=3)  # Kynkaanniemi et al. 2019, chunked

Features come from `extractors.py`, images and statistics files from `image_sets.py`; `dd eval` is
`evaluate.py`.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(feats: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """feats: [N, D] -> (mu [D], sigma [D, D]) in float64; sigma is the unbiased (N-1) covariance."""
    f = _np64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), as pytorch-fid computes it.

    If the matrix square root of the product is not finite (near-singular covariances), `eps` is
    added to both diagonals and it is retried; an imaginary part from round-off is dropped when the
    diagonal's is below 1e-3, and raises ValueError otherwise.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(_np64(mu1)), np.atleast_1d(_np64(mu2))
    sigma1, sigma2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits_or_probs: ArrayLike, splits: int = 10, kind: str = "auto") -> Tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` contiguous chunks -> (mean, std) over chunks.

    logits_or_probs: [N, K]. kind: "logits" (softmax taken here, in float64), "probs", or "auto"
    (probs when every row is non-negative and sums to 1 within 1e-4). Uniform predictions give 1;
    confident one-hot predictions spread evenly over K classes in every chunk give K.
    """
    x = _np64(logits_or_probs)
    if x.ndim != 2:
        raise ValueError(f"inception_score needs [N, K] logits or probabilities, got shape {x.shape}")
    if kind == "auto":
        kind = "probs" if (x >= 0).all() and np.allclose(x.sum(1), 1.0, atol=1e-4) else "logits"
    if kind == "logits":
        m = x.max(axis=1, keepdims=True)
        logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    elif kind == "probs":
        with np.errstate(divide="ignore"):
            logp = np.log(x)
    else:
        raise ValueError(f"kind must be 'auto', 'logits' or 'probs', got {kind!r}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score: splits={splits} needs 1 <= splits <= N={n}")
    p = np.exp(logp)
    scores = []
    for i in range(splits):
        sl = slice(i * n // splits, (i + 1) * n // splits)
        part, logpart = p[sl], logp[sl]
        with np.errstate(divide="ignore"):
            log_py = np.log(part.mean(axis=0, keepdims=True))   # [1, K]; -inf only where part is all 0
        kl = (part * np.where(part > 0, logpart - log_py, 0.0)).sum(axis=1)   # [n_split]; 0 log 0 = 0
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _as_torch(x: ArrayLike, device: Union[str, torch.device]) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device, dtype=torch.float32)


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [n, m] from a [n, D], b [m, D] and their squared norms."""
    return (a_sq[:, None] - 2.0 * (a @ b.t()) + b_sq[None, :]).clamp_min_(0.0)


def knn_radii(feats: ArrayLike, k: int = 3, chunk: int = 5000,
              device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in `feats`, itself excluded.

    feats: [N, D] -> [N] fp32 on `device`. Processed in chunk x chunk blocks (a running top-k per row),
    so memory is O(chunk^2) whatever N is.
    """
    x = _as_torch(feats, device)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k-NN radii need 1 <= k < N (k={k}, N={n})")
    x_sq = (x * x).sum(1)
    radii = torch.empty(n, device=x.device)
    for i in range(0, n, chunk):
        rows = slice(i, min(i + chunk, n))
        best = None                                                 # [r, <=k] smallest so far
        for j in range(0, n, chunk):
            cols = slice(j, min(j + chunk, n))
            d = _sq_dists(x[rows], x_sq[rows], x[cols], x_sq[cols])   # [r, c]
            if i == j:                                              # a block on the diagonal: drop self
                d.fill_diagonal_(float("inf"))
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k, cand.shape[1]), dim=1, largest=False).values
        radii[rows] = best[:, k - 1]
    return radii


def _coverage(ref: torch.Tensor, ref_radii: torch.Tensor, query: torch.Tensor, chunk: int) -> float:
    """Fraction of `query` rows inside at least one ball (ref_i, ref_radii_i) (squared distances)."""
    ref_sq, q_sq = (ref * ref).sum(1), (query * query).sum(1)
    inside = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    for i in range(0, query.shape[0], chunk):
        rows = slice(i, i + chunk)
        for j in range(0, ref.shape[0], chunk):
            cols = slice(j, j + chunk)
            d = _sq_dists(query[rows], q_sq[rows], ref[cols], ref_sq[cols])   # [r, c]
            inside[rows] |= (d <= ref_radii[None, cols]).any(1)
    return inside.sum().item() / query.shape[0]


def precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, k: int = 3, chunk: int = 5000,
                     device: Union[str, torch.device] = "cpu") -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    precision: fraction of fake samples inside the real manifold (the union of balls around each
    real feature with radius its k-th nearest real neighbour); recall: fraction of real samples
    inside the fake manifold. real_feats [N, D], fake_feats [M, D]; fp32 distances in chunks.
    """
    real, fake = _as_torch(real_feats, device), _as_torch(fake_feats, device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs [N, D] and [M, D] features, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    precision = _coverage(real, knn_radii(real, k, chunk, device), fake, chunk)
    recall = _coverage(fake, knn_radii(fake, k, chunk, device), real, chunk)
    return precision, recall
