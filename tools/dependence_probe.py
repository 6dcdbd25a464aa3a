"""Does a digits teacher need its inter-token dependence? A teacher-only check, no student.

    python tools/dependence_probe.py --teacher digits-var [--n 1000] [--cfg 2.0 --top-p 0.95]

Draws, from the teacher alone: a reference set A, an independent set B (another seed) and a pool of
pairs for the token marginals; onestep* takes every position independently from its class-conditional
marginal in the pool (`TokenMarginals`, as `dd sample --baseline onestep`). On the digits classifier's
features it reports the floor FID(B, A), FID(onestep*, A), their ratio (issue 12 asks for >= 10), and
the teacher's class accuracy and FID vs the held-out real digits. `probe()` is what
tools/train_digits_zoo.py calls on freshly trained teachers.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@torch.no_grad()
def _images(teacher, labels, sampling, seed: int, batch: int = 500, condition=None) -> torch.Tensor:
    """Token samples [N, n] for labels [N]; condition: labels -> the teacher's condition (captions)."""
    g = torch.Generator(device=teacher.device).manual_seed(seed)
    out = []
    for i in range(0, len(labels), batch):
        lab = labels[i:i + batch]
        cond = lab.to(teacher.device) if condition is None else condition(lab)
        out.append(teacher.sample(cond, sampling, generator=g).cpu())
    return torch.cat(out)


@torch.no_grad()
def probe(teacher, clf, sampling=None, n: int = 1000, pool: int = 4000, seed: int = 0) -> dict:
    """teacher: a zoo teacher; clf: the digits classifier (same device). -> {floor, onestep, ratio,
    acc, fid_real, recall_floor, ...} with FIDs on the classifier's 128-d features."""
    from distilled_decoding.metrics import feature_stats, frechet_distance
    from distilled_decoding.sampling import TokenMarginals
    from teachers.zoo import digits_data

    sampling = sampling or teacher.default_sampling
    labels = torch.arange(10).repeat_interleave(n // 10)
    pool_labels = torch.arange(10).repeat_interleave(pool // 10)
    tok_a = _images(teacher, labels, sampling, seed + 1)
    tok_b = _images(teacher, labels, sampling, seed + 2)
    tok_pool = _images(teacher, pool_labels, sampling, seed + 3)
    one = TokenMarginals(tok_pool, pool_labels, 10).sample(labels, torch.Generator().manual_seed(seed + 4))
    dev = next(clf.parameters()).device

    def feats(tok):
        fs, lg = [], []
        for i in range(0, len(tok), 500):
            img = teacher.decode(tok[i:i + 500].to(teacher.device)).to(dev)
            f, l = clf.features_and_logits(img)
            fs.append(f.cpu())
            lg.append(l.cpu())
        return torch.cat(fs), torch.cat(lg)

    fa, la = feats(tok_a)
    fb, _ = feats(tok_b)
    fo, lo = feats(one)
    real, _ = digits_data("test")
    fr, _ = clf.features_and_logits(real.to(dev))
    st = {k: feature_stats(v.double().numpy()) for k, v in {"a": fa, "b": fb, "one": fo, "real": fr.cpu()}.items()}
    fid = lambda x, y: max(0.0, frechet_distance(*st[x], *st[y]))   # noqa: E731
    floor, onestep = fid("b", "a"), fid("one", "a")
    return {"sampling": dataclasses.asdict(sampling), "num_samples": n, "marginal_pool": pool,
            "floor_fid": floor, "onestep_fid": onestep, "ratio": onestep / max(floor, 1e-9),
            "class_accuracy": float((la.argmax(1) == labels).float().mean()),
            "onestep_class_accuracy": float((lo.argmax(1) == labels).float().mean()),
            "fid_real": fid("a", "real"), "onestep_fid_real": fid("one", "real")}


@torch.no_grad()
def probe_t2i(teacher, clf, thresholds, sampling=None, n: int = 1000, seed: int = 0, sweep=(),
              samples_png=None) -> dict:
    """`probe` for the text-to-image digits teacher (with its `prompt_encoder`): the conditions are
    the 40 full captions of `teachers.digit_captions.all_captions()`, balanced; onestep* takes each
    position from its caption-conditional marginal. Adds the digit accuracy and the caption agreement
    (`caption_agreement`) of the teacher and of onestep*, and with `sweep` both at other CFG scales."""
    from distilled_decoding.metrics import feature_stats, frechet_distance
    from distilled_decoding.sampling import TokenMarginals
    from teachers.digit_captions import all_captions, caption_agreement, parse_caption
    from teachers.zoo import digits_data

    sampling = sampling or teacher.default_sampling
    prompts = all_captions()
    P = len(prompts)
    table = teacher.prompt_encoder(prompts)
    attrs = [parse_caption(p) for p in prompts]
    condition = lambda idx: table[idx.cpu()].to(teacher.device)      # noqa: E731
    idx = torch.arange(P).repeat(n // P)
    pool_idx = torch.arange(P).repeat(4 * n // P)
    dev = next(clf.parameters()).device

    def images(tok):
        return torch.cat([teacher.decode(tok[i:i + 500].to(teacher.device)).cpu() for i in range(0, len(tok), 500)])

    def scores(img, ids):
        f, lg = clf.features_and_logits(img.to(dev))
        agr = caption_agreement([attrs[i] for i in ids.tolist()], lg.argmax(1).cpu(), img, thresholds)
        return f.cpu(), agr

    img_a = images(_images(teacher, idx, sampling, seed + 1, condition=condition))
    fa, agr_a = scores(img_a, idx)
    fb, _ = scores(images(_images(teacher, idx, sampling, seed + 2, condition=condition)), idx)
    tok_pool = _images(teacher, pool_idx, sampling, seed + 3, condition=condition)
    one = TokenMarginals(tok_pool, pool_idx, P).sample(idx, torch.Generator().manual_seed(seed + 4))
    fo, agr_o = scores(images(one), idx)
    real, _ = digits_data("test")
    fr, _ = clf.features_and_logits(real.to(dev))
    st = {k: feature_stats(v.double().numpy()) for k, v in {"a": fa, "b": fb, "one": fo, "real": fr.cpu()}.items()}
    fid = lambda x, y: max(0.0, frechet_distance(*st[x], *st[y]))   # noqa: E731
    floor, onestep = fid("b", "a"), fid("one", "a")
    out = {"sampling": dataclasses.asdict(sampling), "num_samples": len(idx), "prompts": P,
           "marginal_pool": len(pool_idx), "floor_fid": floor, "onestep_fid": onestep,
           "ratio": onestep / max(floor, 1e-9), "class_accuracy": agr_a["digit"], "caption_agreement": agr_a,
           "onestep_class_accuracy": agr_o["digit"], "onestep_caption_agreement": agr_o,
           "fid_real": fid("a", "real"), "onestep_fid_real": fid("one", "real")}
    for cfg in sweep:
        sp = dataclasses.replace(sampling, cfg_scale=cfg)
        img = images(_images(teacher, idx, sp, seed + 1, condition=condition))
        out[f"caption_agreement_cfg{cfg}"] = scores(img, idx)[1]
    if samples_png:
        from PIL import Image
        import numpy as np
        k = 4                                   # columns: samples of each prompt; rows: the 40 prompts
        pick = torch.stack([torch.nonzero(idx == p).flatten()[:k] for p in range(P)])      # [P, k]
        grid = img_a[pick.flatten()].view(P // 4, 4 * k, 3, 16, 16)
        arr = grid.permute(0, 3, 1, 4, 2).reshape(P // 4 * 16, 4 * k * 16, 3).numpy()
        Image.fromarray((arr * 255).round().astype(np.uint8)).resize((arr.shape[1] * 4, arr.shape[0] * 4),
                                                                    Image.NEAREST).save(samples_png)
    return out


def main() -> None:
    from teachers.base import SamplingConfig
    from teachers.zoo import load, load_classifier, ZOO_DIR as zoo_default

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="digits-var")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--zoo-dir", default=None, help="read the teacher from this folder (a train_digits_zoo.py --out)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.zoo_dir:
        from teachers import zoo
        zoo.ZOO_DIR = args.zoo_dir
    t = load(args.teacher)
    s = t.default_sampling
    s = SamplingConfig(cfg_scale=s.cfg_scale if args.cfg is None else args.cfg,
                       temperature=s.temperature if args.temperature is None else args.temperature,
                       top_k=s.top_k, top_p=s.top_p if args.top_p is None else args.top_p)
    from teachers import zoo
    zoo.ZOO_DIR = zoo_default
    r = probe(t, load_classifier(), s, args.n, args.pool, args.seed)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
