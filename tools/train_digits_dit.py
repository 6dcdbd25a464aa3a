"""Train the zoo's `digits-dit`: a small pixel-space DiT on the scikit-learn digits (teachers/zoo).

    python tools/train_digits_dit.py                        # train, evaluate, write teachers/zoo/digits-dit.*
    python tools/train_digits_dit.py --eval-only            # re-measure the shipped weights
    python tools/train_digits_dit.py --eval-only --cfg 3 --write-json   # ... and make cfg 3 its default

Data: `teachers.zoo.digits_data` (train = first 1500 images, 16x16, grey in 3 channels); the DiT sees
one grey channel in [-1, 1] (the other two are copies) and the teacher decodes it back to 3 channels.
Augmentation: random integer shifts up to --shift px (zero fill), as the AR zoo teachers.
Pixel space, not a tiny AutoencoderKL latent: the digits are 8x8 images upscaled to 16x16, so a
patch-2 DiT on pixels already has 64 tokens, one per original pixel; an autoencoder would add a
second training run and its reconstruction error for no saving (not measured: CPU time was short).

Model: DiT (official layout, `teachers.dit.DiT`) with input 16, patch 2, 1 channel, width 64, depth 4,
4 heads, no learned sigma, class dropout 0.1 (null class 10). Loss: ε-MSE on the linear VP schedule
(t uniform over 1000 steps), AdamW, cosine lr, EMA of the weights (what is shipped).
Evaluation: DDIM-25 at --cfg on `--eval-per-class` samples per class; class accuracy by the zoo's
digits classifier, FID on its 128-d features against the 297 held-out digits (and the train digits'
FID against the held-out ones, the floor).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from distilled_decoding.metrics import feature_stats, frechet_distance  # noqa: E402
from teachers import vp_diffusion as vp                                   # noqa: E402
from teachers import zoo                                                  # noqa: E402
from teachers.dit import DiT, DiTConfig, load                             # noqa: E402

STEM = "digits-dit"
CONFIG = dict(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=4, mlp_ratio=4.0,
              class_dropout_prob=0.1, num_classes=10, learn_sigma=False)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def random_shift(x: torch.Tensor, r: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image [N, C, H, W] by integers in [-r, r]^2, zero (= -1 here) fill."""
    if r == 0:
        return x
    N, _, H, W = x.shape
    pad = F.pad(x, (r, r, r, r), value=-1.0)
    d = torch.randint(0, 2 * r + 1, (N, 2), generator=g)
    return torch.stack([pad[i, :, d[i, 0]:d[i, 0] + H, d[i, 1]:d[i, 1] + W] for i in range(N)])


def train(args, x: torch.Tensor, y: torch.Tensor) -> DiT:
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = DiT(DiTConfig(**CONFIG))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    a = vp.linear_alphas_cumprod(1000)
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=g)
        x0 = random_shift(x[idx], args.shift, g)
        labels = torch.where(torch.rand(args.batch, generator=g) < CONFIG["class_dropout_prob"],
                             torch.full_like(y[idx], CONFIG["num_classes"]), y[idx])
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model(vp.q_sample(x0, t, noise, a), t, labels), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        if step % 200 == 0 or step == args.steps - 1:
            log(f"step {step} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - t0:.0f} s)")
    return ema


@torch.no_grad()
def evaluate(teacher, per_class: int, cfg: float, steps: int, seed: int) -> dict:
    clf = zoo.load_classifier()
    xte, _ = zoo.digits_data("test")
    xtr, _ = zoo.digits_data("train")
    labels = torch.arange(10).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    imgs = torch.cat([teacher.decode(teacher.sample(lab, steps=steps, cfg_scale=cfg, generator=g))
                      for lab in labels.split(250)])
    feats, logits = clf.features_and_logits(imgs)
    acc = (logits.argmax(1) == labels).float().mean().item()
    ref = feature_stats(clf.features(xte).numpy())
    fid = frechet_distance(*feature_stats(feats.numpy()), *ref)
    floor = frechet_distance(*feature_stats(clf.features(xtr).numpy()), *ref)
    return {"sampler": f"DDIM-{steps} (eta 0)", "cfg_scale": cfg, "num_samples": len(labels),
            "class_accuracy": round(acc, 4), "fid_vs_heldout_digits_features": round(float(fid), 3),
            "fid_train_digits_vs_heldout (floor)": round(float(floor), 3)}, imgs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--shift", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--sweep", type=float, nargs="*", default=[], help="also measure these CFG scales")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--write-json", action="store_true",
                    help="with --eval-only: record these measurements and --cfg as the default in the JSON")
    ap.add_argument("--out", default=zoo.ZOO_DIR)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.eval_only:
        teacher = zoo.load(STEM)
        meta = zoo.read_meta(STEM)
    else:
        x, y = zoo.digits_data("train")
        model = train(args, x[:, :1].mul(2).sub(1), y)
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        teacher = load(CONFIG, sd, pixel_space=True, cfg_channels=None)
        meta = None
    train_s = time.time() - t0
    res, _ = evaluate(teacher, args.eval_per_class, args.cfg, args.sample_steps, args.seed + 100)
    log(json.dumps(res))
    for cfg in args.sweep:
        other, _ = evaluate(teacher, args.eval_per_class, cfg, args.sample_steps, args.seed + 100)
        log(json.dumps(other))
        res.setdefault("sweep", []).append(other)
    if args.eval_only:
        if args.write_json:
            meta["default_sampling"] = {"steps": args.sample_steps, "cfg_scale": args.cfg}
            meta["samples"] = res
            meta["eval_command"] = "python tools/train_digits_dit.py " + " ".join(sys.argv[1:])
            path = os.path.join(zoo.ZOO_DIR, STEM + ".json")
            with open(path, "w") as f:
                json.dump(meta, f, indent=2)
                f.write("\n")
            log(f"updated {path}")
        return
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, STEM)
    save_file({"dit." + k: v.float() for k, v in sd.items()}, base + ".safetensors")
    meta = {"family": "dit", "config": CONFIG, "pixel_space": True, "cfg_channels": None,
            "default_sampling": {"steps": args.sample_steps, "cfg_scale": args.cfg},
            "image_size": zoo.IMAGE_SIZE, "data": zoo.DATA_RULE + "; the DiT sees channel 0 mapped to [-1, 1]",
            "train": {k: getattr(args, k) for k in ("steps", "batch", "lr", "ema", "shift", "seed", "threads")},
            "command": "python tools/train_digits_dit.py " + " ".join(sys.argv[1:]),
            "device": "cpu", "threads": args.threads, "train_seconds": round(train_s, 1), "samples": res}
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    log(f"wrote {base}.safetensors ({os.path.getsize(base + '.safetensors') / 1e6:.2f} MB) and .json")


if __name__ == "__main__":
    main()
