"""Feature extractors for the metrics: images [N, 3, H, W] in [0, 1] -> features [N, D] fp32, optionally
logits [N, K] for IS. `get_extractor(spec, device)` resolves a spec:
    "inception:PATH"   pytorch-fid's Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth);
    "NAME"             a factory registered with `register_extractor(NAME, factory)` ("digits":
                       the tiny zoo's classifier, `DigitsExtractor`);
    "pkg.module:attr"  any importable factory `attr(device=...) -> FeatureExtractor`.
`extract_features` runs one over an `image_sets.ImageSet`.
"""
from __future__ import annotations

import importlib
import math
import os
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .image_sets import ImageSet


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
                        what=f"pytorch-fid InceptionV3 ({INCEPTION_FILE} layout)", unsafe_hint=None)
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
