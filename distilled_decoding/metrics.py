"""Sample-quality metrics (FID, IS, precision/recall) and the `dd eval` verb.

Pure functions over features (numpy or torch, any device):
    mu, sigma = feature_stats(feats)                       # [N, D] -> float64 [D], [D, D]
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)        # pytorch-fid's formula and eps fallback
    is_mean, is_std = inception_score(logits, splits=10)   # improved-GAN / ADM split scheme
    precision, recall = precision_recall(real, fake, k=3)  # Kynkaanniemi et al. 2019, chunked

Features come from a pluggable `FeatureExtractor` (images [N, 3, H, W] in [0, 1] -> [N, D] fp32,
optionally logits [N, K] for IS), picked by `get_extractor(spec, device)`:
    "inception:PATH"   pytorch-fid's Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth);
    "NAME"             a factory registered with `register_extractor(NAME, factory)` ("digits":
                       the tiny zoo's classifier, `DigitsExtractor`);
    "pkg.module:attr"  any importable factory `attr(device=...) -> FeatureExtractor`.

Images are ADM-format `.npz` files (`arr_0`: uint8 [N, H, W, 3], streamed, never loaded whole) or
folders of image files. Reference statistics are `.npz` files with `mu`, `sigma` (pytorch-fid's
layout) plus, written by us, `features` (needed for precision/recall), `extractor` and `num_images`.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import click
import numpy as np
import torch

from .adm_npz import AdmNpzReader, InputFileError, npz_members
from .distributed import default_device

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

# ---------------------------------------------------------------------------------------------------
# Metrics: pure functions
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------------


class FeatureExtractor:
    """Images [N, 3, H, W] float in [0, 1] (on `self.device`) -> features [N, D] fp32.

    Subclasses implement `features`, and `logits` ([N, K], unnormalised) if they can serve IS;
    `features_and_logits` may be overridden when one forward pass gives both. `name` tags saved
    statistics so that features from different extractors are never compared.
    """

    name: str = "extractor"
    device: torch.device = torch.device("cpu")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"extractor {self.name!r} has no logits (no Inception Score)")

    @property
    def has_logits(self) -> bool:
        return type(self).logits is not FeatureExtractor.logits

    def features_and_logits(self, images: torch.Tensor, want_logits: bool = True
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        lg = self.logits(images) if (want_logits and self.has_logits) else None
        return self.features(images), lg


class ModuleExtractor(FeatureExtractor):
    """A module whose forward maps images [N, 3, H, W] in [0, 1] to features [N, D], or to
    (features [N, D], logits [N, K]) when `returns_logits` is True. Run in eval mode, no grad."""

    def __init__(self, module: torch.nn.Module, name: str, returns_logits: bool = False,
                 device: Union[str, torch.device] = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval().requires_grad_(False)
        self.name = name
        self.returns_logits = returns_logits

    @property
    def has_logits(self) -> bool:
        return self.returns_logits

    @torch.no_grad()
    def features_and_logits(self, images, want_logits=True):
        out = self.module(images)
        if self.returns_logits:
            feats, lg = out
            return feats.float(), (lg.float() if want_logits else None)
        return out.float(), None

    def features(self, images):
        return self.features_and_logits(images, want_logits=False)[0]

    def logits(self, images):
        if not self.returns_logits:
            return super().logits(images)
        return self.features_and_logits(images)[1]


INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"   # torch.hub names files <stem>-<first 8 hex of sha256>.pth


def default_inception_path() -> Optional[str]:
    """Where pytorch-fid (via torch.hub) caches its weights, if the file is there."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    return path if os.path.isfile(path) else None


def inception_extractor(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                        check_hash: bool = True) -> ModuleExtractor:
    """pytorch-fid's Inception-v3 from a local weight file: 2048-d pool3 features, 1008 IS logits.

    The file is loaded strictly (every key and shape must match). Weights whose sha256 is not the
    released file's are accepted with a warning and tagged in the extractor's name.
    """
    from teachers.checkpoint import file_sha256, load_strict

    from .inception import FIDInceptionV3

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found: {path} (expected pytorch-fid's {INCEPTION_FILE})")
    name = "inception-fid"
    if check_hash:
        sha = file_sha256(path)
        if not sha.startswith(INCEPTION_SHA256_PREFIX):
            warnings.warn(f"{path}: sha256 {sha[:16]}... is not that of pytorch-fid's {INCEPTION_FILE}; "
                          "FID values will not be comparable with published ones")
            name = f"inception-fid[sha256:{sha[:16]}]"
    model = load_strict(FIDInceptionV3, path, device=device,
                        what=f"pytorch-fid InceptionV3 ({INCEPTION_FILE} layout)")
    return ModuleExtractor(model, name=name, returns_logits=True, device=device)


ExtractorFactory = Callable[..., FeatureExtractor]
EXTRACTORS: Dict[str, Union[ExtractorFactory, str]] = {}


def register_extractor(name: str, factory: Union[ExtractorFactory, str], overwrite: bool = False) -> None:
    """Make `get_extractor(name, device)` call `factory(device=device)`.

    factory: a callable, or a "pkg.module:attr" string imported on first use (keeps heavy imports
    out of `dd` start-up).
    """
    if name in EXTRACTORS and not overwrite:
        raise ValueError(f"feature extractor {name!r} is already registered")
    if name.startswith("inception:"):
        raise ValueError("names starting with 'inception:' are reserved for weight files")
    EXTRACTORS[name] = factory


class DigitsExtractor(FeatureExtractor):
    """The zoo's digits classifier (`teachers.zoo.load_classifier`): 128-d features (FID,
    precision/recall) and its 10 class logits (IS), from one forward pass. Images must be 16x16."""

    name = "digits"

    def __init__(self, device: Union[str, torch.device] = "cpu") -> None:
        from teachers.zoo import load_classifier   # the zoo (and its weights) only when asked for

        self.device = torch.device(device)
        self.classifier = load_classifier(self.device)

    @torch.no_grad()
    def features_and_logits(self, images, want_logits=True):
        feats, lg = self.classifier.features_and_logits(images)
        return feats.float(), (lg.float() if want_logits else None)

    def features(self, images):
        return self.features_and_logits(images, want_logits=False)[0]

    def logits(self, images):
        return self.features_and_logits(images)[1]


register_extractor("digits", DigitsExtractor)


def _import_attr(spec: str):
    mod, _, attr = spec.partition(":")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def get_extractor(spec: Union[str, FeatureExtractor],
                  device: Union[str, torch.device] = "cpu") -> FeatureExtractor:
    """Resolve an extractor spec: "inception:PATH", a registered name, or "pkg.module:factory"."""
    if isinstance(spec, FeatureExtractor):
        return spec
    if spec.startswith("inception:"):
        return inception_extractor(spec[len("inception:"):], device)
    if spec in EXTRACTORS:
        factory = EXTRACTORS[spec]
        if isinstance(factory, str):
            factory = _import_attr(factory)
        return factory(device=device)
    if ":" in spec:
        try:
            factory = _import_attr(spec)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"feature extractor {spec!r}: cannot import it ({e})") from e
        return factory(device=device)
    raise ValueError(f"unknown feature extractor {spec!r}: use 'inception:PATH' (pytorch-fid weights), "
                     f"a registered name ({', '.join(sorted(EXTRACTORS)) or 'none registered'}) "
                     "or 'pkg.module:factory'")


# ---------------------------------------------------------------------------------------------------
# Image sets and statistics files
# ---------------------------------------------------------------------------------------------------


EvalInputError = InputFileError   # an input file or folder is not what `dd eval` expects


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
STATS_KEYS = ("mu", "sigma")


class ImageSet:
    """N images of one size, read lazily in batches of uint8 [B, H, W, 3] (grey is repeated to RGB)."""

    def __init__(self, path: str, num: int, height: int, width: int) -> None:
        self.path, self.num, self.height, self.width = path, num, height, width

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num


def _rgb(batch: np.ndarray) -> np.ndarray:
    """[B, H, W] or [B, H, W, 1|3] uint8 -> [B, H, W, 3]."""
    if batch.ndim == 3:
        batch = batch[..., None]
    return np.repeat(batch, 3, axis=3) if batch.shape[3] == 1 else batch


class NpzImages(ImageSet):
    """`arr_0` of an ADM-format .npz (`adm_npz.AdmNpzReader`), streamed."""

    def __init__(self, path: str, limit: Optional[int] = None) -> None:
        self.reader = AdmNpzReader(path)
        shape = self.reader.shape
        num = shape[0] if limit is None else min(shape[0], limit)
        super().__init__(path, num, shape[1], shape[2])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for batch in self.reader.batches(batch_size, self.num):
            yield _rgb(batch)


class FolderImages(ImageSet):
    """Image files (png/jpg/...) directly inside a folder, in sorted name order, decoded in threads."""

    def __init__(self, path: str, limit: Optional[int] = None, workers: int = 8) -> None:
        files = sorted(e.path for e in os.scandir(path)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
        if not files:
            raise EvalInputError(f"{path}: no image files ({', '.join(IMAGE_EXTS)}) in this folder")
        files = files[:limit] if limit is not None else files
        first = self._load(files[0])
        super().__init__(path, len(files), first.shape[0], first.shape[1])
        self.files, self.workers = files, workers

    @staticmethod
    def _load(file: str) -> np.ndarray:
        from PIL import Image
        try:
            with Image.open(file) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise EvalInputError(f"{file}: cannot read this image ({e})") from e

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, self.num, batch_size):
                names = self.files[start:start + batch_size]
                imgs = list(pool.map(self._load, names))
                for name, im in zip(names, imgs):
                    if im.shape[:2] != (self.height, self.width):
                        raise EvalInputError(f"{name}: image is {im.shape[1]}x{im.shape[0]}, the others in "
                                             f"{self.path} are {self.width}x{self.height}")
                yield np.stack(imgs)


_NPZ_EXPECTED = ("an ADM-format .npz with 'arr_0' (uint8 images [N, H, W, 3]) or reference statistics "
                 "with 'mu' and 'sigma'")


def open_source(path: Union[str, os.PathLike], limit: Optional[int] = None,
                workers: int = 8) -> Union[ImageSet, dict]:
    """An ImageSet (ADM .npz or image folder) or, for a statistics .npz, the dict of `load_stats`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return FolderImages(path, limit=limit, workers=workers)
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: no such file or folder")
    if not path.endswith(".npz"):
        raise EvalInputError(f"{path}: expected {_NPZ_EXPECTED}, or a folder of images")
    members = npz_members(path)
    if "arr_0" in members:
        return NpzImages(path, limit=limit)
    if all(k in members for k in STATS_KEYS):
        return load_stats(path)
    raise EvalInputError(f"{path}: expected {_NPZ_EXPECTED}; it holds {sorted(members)}")


def save_stats(path: Union[str, os.PathLike], mu: np.ndarray, sigma: np.ndarray,
               features: Optional[np.ndarray] = None, extractor: Optional[str] = None) -> None:
    """Write `mu`, `sigma` (float64), optionally `features` (float32 [N, D]) and the extractor tag."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
        arrays["num_images"] = np.int64(len(features))
    if extractor is not None:
        arrays["extractor"] = np.array(extractor)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:   # a file object: numpy must not append ".npz" to the name
        np.savez(f, **arrays)


def load_stats(path: Union[str, os.PathLike]) -> dict:
    """{'mu', 'sigma', 'features' (or None), 'extractor' (or None), 'path'} from a statistics .npz."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in STATS_KEYS if k not in z.files]
            if missing:
                raise EvalInputError(f"{path}: statistics file without {missing}; expected 'mu' [D] and "
                                     f"'sigma' [D, D] (found {sorted(z.files)})")
            out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64),
                   "features": z["features"] if "features" in z.files else None,
                   "extractor": str(z["extractor"][()]) if "extractor" in z.files else None, "path": path}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, EvalInputError):
            raise
        raise EvalInputError(f"{path}: not a readable statistics .npz ({e})") from e
    d = out["mu"].shape
    if out["mu"].ndim != 1 or out["sigma"].shape != d * 2:
        raise EvalInputError(f"{path}: 'mu' {out['mu'].shape} and 'sigma' {out['sigma'].shape} are not "
                             "[D] and [D, D]")
    if out["features"] is not None and (out["features"].ndim != 2 or out["features"].shape[1] != d[0]):
        raise EvalInputError(f"{path}: 'features' {out['features'].shape} do not match 'mu' {d}")
    return out


def extract_features(extractor: FeatureExtractor, images: ImageSet, batch_size: int = 50,
                     want_logits: bool = True, desc: str = "features"
                     ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Run `extractor` over an ImageSet -> (features [N, D] fp32, logits [N, K] fp32 or None)."""
    from tqdm import tqdm

    want_logits = want_logits and extractor.has_logits
    feats, logits = [], []
    total = math.ceil(images.num / batch_size)
    for batch in tqdm(images.batches(batch_size), total=total, desc=desc, unit="batch", disable=None):
        x = torch.from_numpy(batch).to(extractor.device)             # [B, H, W, 3] uint8
        x = x.permute(0, 3, 1, 2).float().div_(255.0)                 # [B, 3, H, W] in [0, 1]
        with torch.no_grad():
            f, lg = extractor.features_and_logits(x, want_logits)
        if f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(f"extractor {extractor.name!r} returned features {tuple(f.shape)} for "
                             f"{x.shape[0]} images; expected [N, D]")
        feats.append(f.float().cpu().numpy())
        if want_logits:
            logits.append(lg.float().cpu().numpy())
    return np.concatenate(feats), (np.concatenate(logits) if want_logits else None)


# ---------------------------------------------------------------------------------------------------
# dd eval
# ---------------------------------------------------------------------------------------------------


def _fmt(v: Optional[float], std: Optional[float] = None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" + (f" ± {std:.4f}" if std is not None else "")


@click.command("eval")
@click.argument("samples", type=click.Path(exists=True))
@click.option("--ref", "ref", type=click.Path(exists=True),
              help="Reference: images (ADM .npz / folder) or a statistics .npz (mu, sigma[, features]).")
@click.option("--ref-stats", "ref_stats_out", type=click.Path(dir_okay=False),
              help="Save the reference statistics (of --ref, or of SAMPLES when --ref is not given) here.")
@click.option("--extractor", default=None,
              help="Feature extractor: a registered name (e.g. digits), 'inception:PATH' or "
                   "'pkg.module:factory'.")
@click.option("--inception", "inception_path", type=click.Path(dir_okay=False),
              help=f"pytorch-fid Inception weights ({INCEPTION_FILE}); used by default when found in the "
              "torch hub cache.")
@click.option("--batch-size", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto = cuda when available, else cpu.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
@click.option("--k", "k", default=3, show_default=True, type=click.IntRange(min=1),
              help="Neighbourhood size of precision/recall.")
@click.option("--splits", default=10, show_default=True, type=click.IntRange(min=1),
              help="Inception Score splits.")
@click.option("--limit", type=click.IntRange(min=2), help="Use only the first N images of each image set.")
@click.option("--features/--no-features", "save_features", default=True, show_default=True,
              help="Store features in --ref-stats (precision/recall against it needs them).")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(min=1),
              help="Threads decoding image files.")
def eval_cmd(samples, ref, ref_stats_out, extractor, inception_path, batch_size, device, json_out, k,
             splits, limit, save_features, workers):
    """FID, Inception Score and precision/recall (k-NN, default k=3) of SAMPLES against --ref.

    SAMPLES: an ADM-format .npz ('arr_0', uint8 [N, H, W, 3]) or a folder of images. Without --ref only
    the Inception Score is reported; with --ref-stats and no --ref, SAMPLES is taken as the reference
    set and its statistics are saved.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:   # shown as notes, not as source lines
            warnings.simplefilter("always")
            result = run_eval(samples, ref=ref, ref_stats_out=ref_stats_out, extractor=extractor,
                              inception_path=inception_path, batch_size=batch_size, device=device, k=k,
                              splits=splits, limit=limit, save_features=save_features, workers=workers)
    except (EvalInputError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    for w in caught:
        if str(w.message) not in result["notes"]:
            result["notes"].append(str(w.message))
    click.echo(f"samples:   {result['samples']} ({result['num_samples']} images)")
    if result.get("ref"):
        click.echo(f"reference: {result['ref']} ({result['num_ref'] or 'statistics only'}"
                   f"{' images' if result['num_ref'] else ''})")
    click.echo(f"extractor: {result['extractor']}")
    if result.get("ref_stats_out"):
        click.echo(f"wrote reference statistics: {result['ref_stats_out']}")
    rows = [("FID", _fmt(result["fid"])),
            ("IS", _fmt(result["inception_score"], result["inception_score_std"])),
            (f"precision (k={k})", _fmt(result["precision"])),
            (f"recall (k={k})", _fmt(result["recall"]))]
    width = max(len(r[0]) for r in rows)
    click.echo(f"{'metric':<{width}}  value")
    for name, val in rows:
        click.echo(f"{name:<{width}}  {val}")
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    if json_out:
        parent = os.path.dirname(json_out)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
        click.echo(f"wrote {json_out}")


def _resolve_extractor(extractor: Optional[str], inception_path: Optional[str], device) -> FeatureExtractor:
    if extractor and inception_path:
        raise ValueError("pass either --extractor or --inception, not both")
    if inception_path:
        extractor = f"inception:{inception_path}"
    if extractor is None:
        found = default_inception_path()
        if found is None:
            raise ValueError(f"no feature extractor: pass --inception PATH to pytorch-fid's {INCEPTION_FILE} "
                             f"(looked in {os.path.join(torch.hub.get_dir(), 'checkpoints')}) "
                             "or --extractor NAME "
                             f"(registered: {', '.join(sorted(EXTRACTORS)) or 'none'})")
        extractor = f"inception:{found}"
    return get_extractor(extractor, device)


def run_eval(samples: str, ref: Optional[str] = None, ref_stats_out: Optional[str] = None,
             extractor: Optional[str] = None, inception_path: Optional[str] = None, batch_size: int = 50,
             device: str = "auto", k: int = 3, splits: int = 10, limit: Optional[int] = None,
             save_features: bool = True, workers: int = 8) -> dict:
    """Everything `dd eval` does except printing; returns the JSON-able result dict."""
    device = default_device() if device == "auto" else device
    notes: List[str] = []
    sample_src = open_source(samples, limit=limit, workers=workers)
    if not isinstance(sample_src, ImageSet):
        raise EvalInputError(f"{samples}: SAMPLES must be images (ADM .npz with 'arr_0' or a folder), "
                             "not a statistics file")
    ref_src = open_source(ref, limit=limit, workers=workers) if ref else None
    if ref_stats_out and isinstance(ref_src, dict):
        raise EvalInputError(f"{ref}: --ref is already a statistics file; --ref-stats needs reference images")
    if ref and isinstance(ref_src, ImageSet) and _npz_has_stats(ref):
        notes.append(f"{ref} also holds mu/sigma; they were ignored and recomputed from its images "
                     "with this extractor")

    ext = _resolve_extractor(extractor, inception_path, device)
    if isinstance(ref_src, dict):   # checked before any feature is computed
        if ref_src["extractor"] is None:
            notes.append(f"{ref} does not say which extractor made it; assuming {ext.name}")
        elif ref_src["extractor"] != ext.name:
            raise EvalInputError(f"{ref}: statistics were made with extractor {ref_src['extractor']!r}, "
                                 f"not {ext.name!r}; features of different extractors are not comparable")
    result = {"samples": os.fspath(samples), "num_samples": len(sample_src), "ref": ref, "num_ref": None,
              "extractor": ext.name, "fid": None, "inception_score": None, "inception_score_std": None,
              "precision": None, "recall": None, "k": k, "splits": splits, "ref_stats_out": None}

    fake, logits = extract_features(ext, sample_src, batch_size, want_logits=True, desc="samples")
    if logits is None:
        notes.append(f"extractor {ext.name!r} gives no logits: no Inception Score")
    else:
        n_splits = min(splits, len(logits))
        if n_splits < splits:
            notes.append(f"only {len(logits)} samples: Inception Score over {n_splits} splits")
        result["inception_score"], result["inception_score_std"] = inception_score(logits, n_splits, "logits")
        result["splits"] = n_splits

    if ref_src is None and ref_stats_out:   # SAMPLES is the reference set: save its statistics
        mu, sigma = feature_stats(fake)
        save_stats(ref_stats_out, mu, sigma, fake if save_features else None, ext.name)
        result["ref_stats_out"] = ref_stats_out
    elif ref_src is None:
        notes.append("no --ref: FID and precision/recall need reference images or statistics")
    else:
        if isinstance(ref_src, ImageSet):
            real, _ = extract_features(ext, ref_src, batch_size, want_logits=False, desc="reference")
            result["num_ref"] = len(real)
            mu_r, sigma_r = feature_stats(real)
            if ref_stats_out:
                save_stats(ref_stats_out, mu_r, sigma_r, real if save_features else None, ext.name)
                result["ref_stats_out"] = ref_stats_out
        else:
            if ref_src["mu"].shape[0] != fake.shape[1]:
                raise EvalInputError(f"{ref}: statistics are {ref_src['mu'].shape[0]}-d but extractor "
                                     f"{ext.name!r} gives {fake.shape[1]}-d features")
            mu_r, sigma_r, real = ref_src["mu"], ref_src["sigma"], ref_src["features"]
            result["num_ref"] = None if real is None else len(real)
            if real is None:
                notes.append(f"{ref} holds only mu/sigma: precision/recall need reference features; rebuild "
                             f"it with `dd eval REF_IMAGES --ref-stats OUT` (features are kept by default)")
        mu_f, sigma_f = feature_stats(fake)
        result["fid"] = frechet_distance(mu_f, sigma_f, mu_r, sigma_r)
        if real is not None:
            if min(len(real), len(fake)) <= k:
                notes.append(f"precision/recall need more than k={k} images per set")
            else:
                result["precision"], result["recall"] = precision_recall(real, fake, k=k, device=device)
    result["notes"] = notes
    return result


def _npz_has_stats(path: str) -> bool:
    return os.path.isfile(path) and all(k in npz_members(path) for k in STATS_KEYS)
