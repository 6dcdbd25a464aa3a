"""`dd eval`: FID / IS / precision / recall of an image set against a reference (images or
statistics), on any feature extractor (`extractors.py`, metrics in `metrics.py`)."""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import List, Optional

import click
import torch

from .distributed import default_device, device_option_check
from .adm_npz import npz_members
from .errors import DDError
from .fileio import atomic_write, check_outputs
from .extractors import (EXTRACTORS, INCEPTION_FILE, FeatureExtractor, default_inception_path, extract_features,
                         get_extractor)
from .image_sets import STATS_KEYS, EvalInputError, ImageSet, open_source, save_stats
from .metrics import feature_stats, frechet_distance, inception_score, precision_recall


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
@click.option("--device", default="auto", callback=device_option_check, show_default=True, help="auto = cuda when available, else cpu.")
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
@click.option("--overwrite", is_flag=True, default=False,
              help="Replace an existing --ref-stats / --json file (an input is never overwritten).")
@click.option("--caption-agreement", "caption_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="digits-t2i samples: the prompts.txt `dd sample --prompts` wrote beside them; also report the "
                   "digit accuracy and caption agreement (digit, thickness and slant; needs --extractor digits).")
def eval_cmd(samples, ref, ref_stats_out, extractor, inception_path, batch_size, device, json_out, k,
             splits, limit, save_features, workers, overwrite, caption_file):
    """FID, Inception Score and precision/recall (k-NN, default k=3) of SAMPLES against --ref.

    SAMPLES: an ADM-format .npz ('arr_0', uint8 [N, H, W, 3]) or a folder of images. Without --ref only
    the Inception Score is reported; with --ref-stats and no --ref, SAMPLES is taken as the reference
    set and its statistics are saved.
    """
    if ref_stats_out and json_out and os.path.realpath(ref_stats_out) == os.path.realpath(json_out):
        raise DDError(f"--ref-stats and --json are the same file {json_out}; give them different paths")
    check_outputs({"--ref-stats": ref_stats_out, "--json": json_out},
                  {"SAMPLES": samples, "--ref": ref, "--inception": inception_path}, overwrite)
    try:
        with warnings.catch_warnings(record=True) as caught:   # shown as notes, not as source lines
            warnings.simplefilter("always")
            result = run_eval(samples, ref=ref, ref_stats_out=ref_stats_out, extractor=extractor,
                              inception_path=inception_path, batch_size=batch_size, device=device, k=k,
                              splits=splits, limit=limit, save_features=save_features, workers=workers,
                              caption_file=caption_file)
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
    if result.get("caption_agreement"):
        a = result["caption_agreement"]
        rows += [("digit accuracy", _fmt(a["digit"])), ("caption agreement", _fmt(a["caption"])),
                 ("thickness agreement", _fmt(a["thickness"])), ("slant agreement", _fmt(a["slant"]))]
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
        atomic_write(json_out, json.dumps(result, indent=2).encode())
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


def _check_finite(feats, logits, source, ext: FeatureExtractor) -> None:
    """NaN/inf features would make every number NaN (FID nan, exit 0): refuse them, naming the source."""
    for what, x in (("features", feats), ("logits", logits)):
        if x is not None and not bool(torch.isfinite(torch.as_tensor(x)).all()):
            raise EvalInputError(f"{source}: extractor {ext.name!r} gave NaN/inf {what} (are its weights finite?)")


def run_eval(samples: str, ref: Optional[str] = None, ref_stats_out: Optional[str] = None,
             extractor: Optional[str] = None, inception_path: Optional[str] = None, batch_size: int = 50,
             device: str = "auto", k: int = 3, splits: int = 10, limit: Optional[int] = None,
             save_features: bool = True, workers: int = 8, caption_file: Optional[str] = None) -> dict:
    """Everything `dd eval` does except printing; returns the JSON-able result dict. caption_file: a
    digits-t2i sample set's prompts.txt (adds "caption_agreement")."""
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
    _check_finite(fake, logits, samples, ext)
    if caption_file:
        result["caption_agreement"] = _caption_agreement(caption_file, sample_src, logits, ext)
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
            _check_finite(real, None, ref, ext)
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
        if not math.isfinite(result["fid"]):
            raise EvalInputError(f"FID of {samples} against {ref} is {result['fid']}: not a number to report")
        if real is not None:
            if min(len(real), len(fake)) <= k:
                notes.append(f"precision/recall need more than k={k} images per set")
            else:
                result["precision"], result["recall"] = precision_recall(real, fake, k=k, device=device)
    result["notes"] = notes
    return result


def _caption_agreement(path: str, images: ImageSet, logits, ext: FeatureExtractor) -> dict:
    """The digits-t2i caption agreement of an image set whose prompts (in order) are in `path`."""
    import numpy as np
    from teachers.zoo import attribute_thresholds
    from .t2i_scores import agreement_of

    if ext.name != "digits" or logits is None or logits.shape[1] != 10:
        raise EvalInputError(f"--caption-agreement needs --extractor digits (the digits classifier), not {ext.name!r}")
    with open(path, encoding="utf-8") as f:
        prompts = [ln.split("\t", 1)[-1] for ln in f.read().splitlines() if ln.strip()]
    if len(prompts) < images.num:
        raise EvalInputError(f"{path}: {len(prompts)} prompts for {images.num} images")
    x = np.concatenate(list(images.batches(500)))
    try:
        return agreement_of(prompts[:images.num], x, logits, attribute_thresholds("digits-t2i"))
    except ValueError as e:
        raise EvalInputError(f"{path}: {e}") from e


def _npz_has_stats(path: str) -> bool:
    return os.path.isfile(path) and all(k in npz_members(path) for k in STATS_KEYS)
