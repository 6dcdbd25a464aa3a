"""Train the tiny digits zoo (teachers/zoo): two tokenizers, two AR teachers and a classifier.

    python tools/train_digits_zoo.py --device cuda --only vq gpt --probe 1000 --eval-per-class 100
    python tools/train_digits_zoo.py --device cuda --only vqvae var --probe 1000 --eval-per-class 100
    python tools/train_digits_zoo.py                       # everything (classifier too), on the CPU
    python tools/train_digits_zoo.py --eval-only --samples-png /tmp/zoo_samples.png
    python tools/train_digits_zoo.py --only t2i --probe 1000 --sweep 1.0 3.0     # digits-t2i (CPU, ~20 min)

The two `--device cuda` lines made the shipped teachers (each JSON records its command and device;
they ran at once on one H200, each in its own copy of the tree); the shipped classifier is the
earlier CPU one (`--only` loads the phases it does not train from teachers/zoo).

Data: scikit-learn's bundled digits (`teachers.zoo.digits_data`): 8x8 images scaled to [0, 1],
upscaled bilinearly to 16x16 and replicated to 3 channels; train = the first 1500 images of
`load_digits()` in its bundled order, held-out test = the last 297. Augmentation: integer pixel
shifts (zero fill) of the 16x16 images, up to --gpt-shift (1) / --var-shift (2) pixels.

What is trained, in order (each phase reseeds from --seed, so phases are reproducible on their own):
  1. classifier   DigitsClassifier CNN, random shifts of up to 2 px; FID features = its 128-d
                  pre-activation penultimate layer, class accuracy = its logits.
  2. vq           LlamaGen-layout VQ (`VQModel`): 16x16 -> 8x8 = 64 tokens, l2-normalised codebook
                  (C = 8), MSE + codebook/commitment losses with a straight-through estimator,
                  unused codes restarted from encoder outputs; random shifts up to --gpt-shift.
  3. vqvae        VAR-layout multi-scale VQ-VAE (`VQVAE`): 16x16 -> f 8x8, patch_nums (1,2,3,4,6,8);
                  the official `VectorQuantizer2` training forward (residual quantisation over the
                  scales, beta-weighted f_hat losses, straight-through), unused codes restarted;
                  random shifts up to --var-shift.
  4. gpt          LlamaGen-layout class-conditional GPT on the VQ tokens of the train split under
                  every shift in [-1, 1]^2 (9 copies), class dropout 0.1 (null class = 10) so CFG works.
  5. var          VAR-layout transformer on the VQ-VAE tokens of every shift in [-2, 2]^2 (25 copies),
                  cond drop 0.1.
  6. t2i          digits-t2i: a LlamaGen-layout text-to-image GPT (8 caption slots) and a small text
                  encoder (teachers/text_encoder.py), trained jointly on the digits-llamagen VQ's tokens
                  (the VQ is reused, not retrained) of every shift in [-1, 1]^2. Captions from attributes
                  measured on each image's VQ reconstruction (teachers/digit_captions.py: "a thick,
                  slanted seven"); each attribute word left out with p 0.1, the caption replaced by the
                  null caption with p 0.1 (CFG). Scored by tools/dependence_probe.py's probe_t2i (digit
                  accuracy, caption agreement, floor, onestep*) on the 40 full captions.
Then samples of both teachers (their default sampling) are classified and, with --probe N,
tools/dependence_probe.py measures how much each teacher needs its inter-token dependence
(onestep*'s FID vs an independent teacher draw, over the teacher-vs-teacher floor); everything is
written to teachers/zoo/: digits-{llamagen,var,classifier}.{safetensors,json}.

Why the VAR teacher sees +-2 px shifts (issue 12): trained like the LlamaGen one (+-1 px), the VAR
teacher's coarse scales (1, 4, 9, 16 tokens) already fix the digit given its class, so sampling
every token from its class-conditional marginal (onestep*) came within 2-3x of the teacher's own
floor (FID 10.5 vs 5.1). With +-2 px the position of the strokes varies within a class; each
token's marginal then blends strokes of differently shifted digits and onestep* fails (FID 128 vs
floor 6.3, 20x) while the teacher stays good. Other candidates measured on the GPU (same probe,
cfg 2.0): patch_nums (1,2,4,8) 13.6x but FID vs held-out digits 99; code dim 4: 21x, FID 93; 4-layer
GPT: 18.9x, FID 72. VAR samples at cfg 1.0 (see VAR_SAMPLING).

Cost: on one H200 (`--device cuda`, the two runs above at once) 105 s (LlamaGen: VQ 25 s, GPT
4000 steps 73 s) and 73 s (VAR: VQ-VAE 31 s, VAR 1500 steps 37 s); on the CPU (1 thread, quiet
machine) the earlier 1600/500-step settings took 543 s in all, so these ~2x more. Results of the
shipped teachers: held-out reconstruction MSE 8.6e-4 (VQ, 30.7 dB) and 1.3e-3 (VQ-VAE, 28.7 dB);
held-out NLL 1.83 (GPT) and 1.57 (VAR) nats/token; samples classified as their label 96.5%
(LlamaGen, cfg 2.0) and 97.1% (VAR, cfg 1.0), 1000 each; onestep* over floor 13.9x and 20.1x.

Determinism: fixed seeds, `torch.use_deterministic_algorithms(True)` and a fixed thread count
(--threads, default 1: on a shared 2-core machine two OpenMP threads spin-wait and run
3-10x slower). Bit-identical weights need the same torch build and thread count; on CUDA some
backward kernels have no deterministic version (best effort: the GPT run repeated bit for bit, the
VAR run did not).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from teachers import llamagen, var                                      # noqa: E402
from teachers.base import SamplingConfig                                # noqa: E402
from teachers.llamagen import GPT, GPTConfig                            # noqa: E402
from teachers.llamagen_vq import VQConfig, VQModel                      # noqa: E402
from teachers.var import VAR, VARConfig                                 # noqa: E402
from teachers.var_vqvae import VQVAE, VQVAEConfig                       # noqa: E402
from teachers import zoo                                                # noqa: E402
from teachers.zoo import DATA_RULE, DigitsClassifier, digits_data       # noqa: E402

PATCH_NUMS = (1, 2, 3, 4, 6, 8)
# Where tensors live. Generators stay on the CPU (same random streams on every device); what they
# draw is moved here.
DEVICE = torch.device("cpu")

# ---- configs (official hyper-parameter names) ---------------------------------------------------
CLASSIFIER_CONFIG = dict(c1=32, c2=64, feature_dim=128, num_classes=10)
VQ_CONFIG = dict(codebook_size=128, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                 commit_loss_beta=0.25, entropy_loss_ratio=0.0, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1],
                 z_channels=32, dropout_p=0.0, ch=32, num_res_blocks=1)
GPT_CONFIG = dict(dim=64, n_layer=3, n_head=4, multiple_of=32, vocab_size=128, block_size=64,
                  num_classes=10, class_dropout_prob=0.1, cls_token_num=1, model_type="c2i",
                  token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
# digits-t2i: the c2i GPT's size, 8 caption slots of the small text encoder's 32-d features.
T2I_CONFIG = dict(dim=64, n_layer=3, n_head=4, multiple_of=32, vocab_size=128, block_size=64,
                  num_classes=0, class_dropout_prob=0.1, cls_token_num=8, caption_dim=32, model_type="t2i",
                  token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
T2I_TEXT_CONFIG = dict(vocab_size=17, slots=8, dim=32, n_layer=2, n_head=2, out_dim=32)
VAE_CONFIG = dict(V=64, Cvae=8, ch=32, ch_mult=[1, 1], num_res_blocks=1, using_sa=True, using_mid_sa=True,
                  using_znorm=False, quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4,
                  patch_nums=list(PATCH_NUMS))
VAR_CONFIG = dict(depth=3, embed_dim=64, num_heads=4, mlp_ratio=4.0, norm_eps=1e-6, shared_aln=False,
                  attn_l2_norm=True, cond_drop_rate=0.1, num_classes=10, patch_nums=list(PATCH_NUMS),
                  V=64, Cvae=8)

# DD's teacher sampling on these teachers (see the JSON's "sampling_note").
LLAMAGEN_SAMPLING = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)
T2I_SAMPLING = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)
# VAR: guidance 1.0 under VAR's linear ramp (1 at the first scale, 2 at the last). On the +-2 px shifted
# data the paper's 2.0 collapses samples toward a few centred modes (FID vs held-out digits 92 vs 71,
# measured by tools/dependence_probe.py on the same weights).
VAR_SAMPLING = SamplingConfig(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=0.95)


def log(*a):
    print(*a, flush=True)


class Timer:
    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 1), "cpu_s": round(time.process_time() - self.cpu, 1)}


def seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift images [N, C, H, W] by (dy, dx) pixels, zero fill."""
    if dy == 0 and dx == 0:
        return x
    H, W = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Per-image random integer shift in [-max_shift, max_shift]^2."""
    if max_shift == 0:
        return x
    s = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=g).to(x.device)
    out = torch.empty_like(x)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            m = (s[:, 0] == dy) & (s[:, 1] == dx)
            if m.any():
                out[m] = shift(x[m], dy, dx)
    return out


def all_shifts(x: torch.Tensor, y: torch.Tensor, r: int = 1):
    xs, ys = [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            xs.append(shift(x, dy, dx))
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def batches(n: int, bs: int, g: torch.Generator):
    """Endless shuffled index batches of size bs (last partial batch of an epoch dropped)."""
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            yield perm[i:i + bs]


# ---- 1. classifier ------------------------------------------------------------------------------
def train_classifier(args, xtr, ytr, xte, yte):
    g = seed_all(args.seed + 1)
    model = DigitsClassifier(**CLASSIFIER_CONFIG).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    it = batches(len(xtr), 64, g)
    for step in range(args.clf_steps):
        set_lr(opt, cosine_lr(step, args.clf_steps, 2e-3, 50))
        idx = next(it)
        x = random_shift(xtr[idx], 2, g)
        x = (x + 0.05 * torch.randn(x.shape, generator=g).to(x.device)).clamp(0, 1)
        loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
        acc_train = (model(xtr).argmax(1) == ytr).float().mean().item()
    return model, {"test_accuracy": acc, "train_accuracy": acc_train}


# ---- 2. LlamaGen VQ ----------------------------------------------------------------------------
def vq_forward(vq: VQModel, x: torch.Tensor, beta: float):
    """Training forward of the LlamaGen VQ: x in [-1, 1] -> (rec, vq loss, indices, normalised z)."""
    z = vq.quant_conv(vq.encoder(x))                                         # [B, C, h, w]
    B, C, h, w = z.shape
    zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, C), dim=-1)          # [N, C]
    e = vq.quantize.codebook()                                              # [V, C] normalised
    with torch.no_grad():
        idx = vq.quantize.nearest(zf)
    zq = e[idx]
    loss = F.mse_loss(zq, zf.detach()) + beta * F.mse_loss(zf, zq.detach())
    zst = zf + (zq - zf).detach()
    rec = vq.decoder(vq.post_quant_conv(zst.view(B, h, w, C).permute(0, 3, 1, 2)))
    return rec, loss, idx, zf


def restart_dead(weight: torch.Tensor, counts: torch.Tensor, pool: torch.Tensor, g: torch.Generator) -> int:
    """Replace never-hit codebook rows by random rows of `pool` (plus a little noise)."""
    dead = (counts == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pick = torch.randint(0, pool.shape[0], (len(dead),), generator=g).to(pool.device)
    with torch.no_grad():
        noise = torch.randn(len(dead), pool.shape[1], generator=g).to(pool.device)
        weight[dead] = pool[pick] + 0.01 * pool.std() * noise
    return len(dead)


def train_vq(args, xtr, xte):
    g = seed_all(args.seed + 2)
    cfg = VQConfig.from_dict(VQ_CONFIG)
    vq = VQModel(cfg)
    with torch.no_grad():   # official init: uniform(-1/V, 1/V), then l2-normalised
        vq.quantize.embedding.weight.uniform_(-1 / cfg.codebook_size, 1 / cfg.codebook_size, generator=g)
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=-1))
    vq.to(DEVICE)
    opt = torch.optim.Adam(vq.parameters(), lr=args.vq_lr, betas=(0.9, 0.95))
    it = batches(len(xtr), args.vq_batch, g)
    counts = torch.zeros(cfg.codebook_size, device=DEVICE)
    restarted = 0
    for step in range(args.vq_steps):
        set_lr(opt, cosine_lr(step, args.vq_steps, args.vq_lr, 20))
        x = random_shift(xtr[next(it)], args.gpt_shift, g) * 2 - 1
        rec, vq_loss, idx, zf = vq_forward(vq, x, cfg.commit_loss_beta)
        loss = F.mse_loss(rec, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        counts += torch.bincount(idx, minlength=cfg.codebook_size).float()
        if (step + 1) % 25 == 0 and step < 0.8 * args.vq_steps:
            restarted += restart_dead(vq.quantize.embedding.weight, counts, zf.detach(), g)
            counts.zero_()
        if step % 100 == 0:
            log(f"  vq step {step}: rec mse {F.mse_loss(rec, x).item() / 4:.5f} (in [0,1]^2 units)")
    vq.eval()
    with torch.no_grad():
        rec = ((vq.decode_code(vq.encode(xte * 2 - 1)) + 1) / 2).clamp(0, 1)
        used = vq.encode(xtr * 2 - 1).unique().numel()
    mse = F.mse_loss(rec, xte).item()
    return vq, {"test_mse": mse, "test_psnr_db": 10 * math.log10(1 / mse), "codes_used_train": used,
                "codes_restarted": restarted}


# ---- 3. VAR VQ-VAE ------------------------------------------------------------------------------
def vqvae_forward(vae: VQVAE, x: torch.Tensor, beta: float = 0.25):
    """The official VQVAE training forward (VectorQuantizer2.forward without the usage statistic):
    x in [-1, 1] -> (rec, vq loss, all indices, residual pool for restarts)."""
    q = vae.quantize
    f = vae.quant_conv(vae.encoder(x))
    B, C, H, W = f.shape
    f_no_grad = f.detach()
    f_rest = f_no_grad.clone()
    f_hat = torch.zeros_like(f_rest)
    vq_loss = 0.0
    S = len(q.patch_nums)
    all_idx, pool = [], []
    for si, pn in enumerate(q.patch_nums):
        last = si == S - 1
        rest = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
        rest_NC = rest.permute(0, 2, 3, 1).reshape(-1, C)
        idx = q.nearest(rest_NC)
        all_idx.append(idx)
        pool.append(rest_NC)
        h = q.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2)
        h = h.contiguous() if last else F.interpolate(h, size=(H, W), mode="bicubic", align_corners=False).contiguous()
        h = q.phi(si)(h)
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f) * beta + F.mse_loss(f_hat, f_no_grad)
    vq_loss = vq_loss / S
    f_hat = (f_hat.detach() - f_no_grad) + f
    rec = vae.decoder(vae.post_quant_conv(f_hat))
    return rec, vq_loss, torch.cat(all_idx), torch.cat(pool).detach()


def train_vqvae(args, xtr, xte):
    g = seed_all(args.seed + 3)
    cfg = VQVAEConfig.from_dict(VAE_CONFIG)
    vae = VQVAE(cfg)
    with torch.no_grad():   # codebook init uniform(-1/V, 1/V) (the official eini < 0 form); restarts do the rest
        vae.quantize.embedding.weight.uniform_(-1 / cfg.V, 1 / cfg.V, generator=g)
    vae.to(DEVICE)
    opt = torch.optim.Adam(vae.parameters(), lr=args.vq_lr, betas=(0.9, 0.95))
    it = batches(len(xtr), args.vq_batch, g)
    counts = torch.zeros(cfg.V, device=DEVICE)
    restarted = 0
    for step in range(args.vq_steps):
        set_lr(opt, cosine_lr(step, args.vq_steps, args.vq_lr, 20))
        x = random_shift(xtr[next(it)], args.var_shift, g) * 2 - 1
        rec, vq_loss, idx, pool = vqvae_forward(vae, x)
        loss = F.mse_loss(rec, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        counts += torch.bincount(idx, minlength=cfg.V).float()
        if (step + 1) % 25 == 0 and step < 0.8 * args.vq_steps:
            restarted += restart_dead(vae.quantize.embedding.weight, counts, pool, g)
            counts.zero_()
        if step % 100 == 0:
            log(f"  vqvae step {step}: rec mse {F.mse_loss(rec, x).item() / 4:.5f} (in [0,1]^2 units)")
    vae.eval()
    with torch.no_grad():
        rec = (vae(xte * 2 - 1) + 1) / 2
        used = torch.cat(vae.img_to_idx(xtr * 2 - 1), 1).unique().numel()
    mse = F.mse_loss(rec, xte).item()
    return vae, {"test_mse": mse, "test_psnr_db": 10 * math.log10(1 / mse), "codes_used_train": used,
                 "codes_restarted": restarted}


# ---- 4./5. the AR transformers ------------------------------------------------------------------
@torch.no_grad()
def encode_all(fn, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def train_ar(args, name, model, loss_fn, n, num_classes, g, steps, lr):
    """Generic AR training loop: loss_fn(idx, labels) -> mean CE; class dropout 0.1 -> null class."""
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in pname and "pos_" not in pname else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    it = batches(n, args.ar_batch, g)
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, lr, 50))
        idx = next(it)
        loss = loss_fn(idx, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (step + 1) / (step + 10))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d) if v.is_floating_point() else ema[k].copy_(v)
        if step % 200 == 0:
            log(f"  {name} step {step}: train CE {loss.item():.4f}")
    model.load_state_dict(ema)
    return model.eval()


def drop_labels(y: torch.Tensor, num_classes: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(y.shape, generator=g).to(y.device) < p, torch.full_like(y, num_classes), y)


def train_gpt(args, vq, xtr, ytr, xte, yte):
    g = seed_all(args.seed + 4)
    xa, ya = all_shifts(xtr, ytr, args.gpt_shift)
    toks = encode_all(lambda x: vq.encode(x * 2 - 1), xa)                     # [9*1500, 64]
    toks_te = encode_all(lambda x: vq.encode(x * 2 - 1), xte)
    cfg = GPTConfig.from_dict(GPT_CONFIG)
    gpt = GPT(cfg).to(DEVICE)

    def loss_fn(idx, g):
        t = toks[idx]
        lab = drop_labels(ya[idx], cfg.num_classes, cfg.class_dropout_prob, g)
        return F.cross_entropy(gpt(lab, t).flatten(0, 1), t.flatten())

    train_ar(args, "gpt", gpt, loss_fn, len(toks), cfg.num_classes, g, args.gpt_steps, args.gpt_lr)
    with torch.no_grad():
        nll = F.cross_entropy(gpt(yte, toks_te).flatten(0, 1), toks_te.flatten()).item()
        c = (2 * args.gpt_shift + 1) ** 2 // 2                                   # the unshifted copy
        nll_tr = F.cross_entropy(gpt(ytr, toks[c * len(xtr):(c + 1) * len(xtr)]).flatten(0, 1),
                                 toks[c * len(xtr):(c + 1) * len(xtr)].flatten()).item()
    return gpt, {"test_nll_nats_per_token": nll, "train_nll_nats_per_token": nll_tr,
                 "train_sequences": len(toks)}


def train_var(args, vae, xtr, ytr, xte, yte):
    g = seed_all(args.seed + 5)
    xa, ya = all_shifts(xtr, ytr, args.var_shift)
    enc = lambda x: torch.cat(vae.img_to_idx(x * 2 - 1), dim=1)              # noqa: E731
    toks = encode_all(enc, xa)                                              # [N, 130]
    toks_te = encode_all(enc, xte)
    with torch.no_grad():
        var_in = vae.quantize.idx_to_var_input(vae.split_scales(toks))      # [N, 129, Cvae]
        var_in_te = vae.quantize.idx_to_var_input(vae.split_scales(toks_te))
    cfg = VARConfig.from_dict(VAR_CONFIG)
    model = VAR(cfg)
    model.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    model.to(DEVICE)

    def loss_fn(idx, g):
        lab = drop_labels(ya[idx], cfg.num_classes, cfg.cond_drop_rate, g)
        return F.cross_entropy(model(lab, var_in[idx]).flatten(0, 1), toks[idx].flatten())

    train_ar(args, "var", model, loss_fn, len(toks), cfg.num_classes, g, args.var_steps, args.var_lr)
    with torch.no_grad():
        logits = model(yte, var_in_te)
        nll = F.cross_entropy(logits.flatten(0, 1), toks_te.flatten()).item()
        offs = [0]
        for pn in VAR_CONFIG["patch_nums"]:
            offs.append(offs[-1] + pn * pn)
        per_scale = [F.cross_entropy(logits[:, a:b].flatten(0, 1), toks_te[:, a:b].flatten()).item()
                     for a, b in zip(offs[:-1], offs[1:])]
    return model, {"test_nll_nats_per_token": nll, "test_nll_per_scale": per_scale, "train_sequences": len(toks)}


# ---- 6. the text-to-image GPT and its text encoder ----------------------------------------------
def t2i_captions(vq, xtr, ytr):
    """Captions of the train images from attributes measured on their VQ reconstructions (what the GPT
    models and what a sample's measurement sees). -> (thresholds, per image the ids [N, 4, slots] and
    masks of its four caption variants: full, no thickness, no slant, digit only)."""
    from teachers.digit_captions import AttributeThresholds, CaptionAttributes, VOCABULARY, caption_text
    from teachers.text_encoder import WordTokenizer

    with torch.no_grad():
        rec = encode_all(lambda x: ((vq.decode_code(vq.encode(x * 2 - 1)) + 1) / 2).clamp(0, 1), xtr)
    th = AttributeThresholds.fit(rec.cpu(), ytr.cpu())
    tok = WordTokenizer(VOCABULARY, T2I_TEXT_CONFIG["slots"])
    texts = []
    for c in th.captions(rec.cpu(), ytr.cpu()):
        texts += [caption_text(c), caption_text(CaptionAttributes(c.label, None, c.slanted)),
                  caption_text(CaptionAttributes(c.label, c.thick, None)), caption_text(CaptionAttributes(c.label))]
    ids, mask = tok(texts)
    S = T2I_TEXT_CONFIG["slots"]
    return th, ids.view(-1, 4, S).to(DEVICE), mask.view(-1, 4, S).to(DEVICE), rec


def train_t2i(args, vq, xtr, ytr, xte, yte):
    """The t2i GPT and the text encoder, jointly, on the VQ tokens of every shift in [-s, s]^2. Each
    attribute word is left out with probability --t2i-attr-drop (so "a seven" is a prompt too), and
    the whole caption is replaced by the null caption with probability 0.1 (CFG)."""
    from teachers.text_encoder import TextEncoder, TextEncoderConfig

    g = seed_all(args.seed + 6)
    th, ids, masks, rec = t2i_captions(vq, xtr, ytr)
    n0 = len(xtr)
    xa, _ = all_shifts(xtr, ytr, args.gpt_shift)
    toks = encode_all(lambda x: vq.encode(x * 2 - 1), xa)                     # [9*1500, 64]
    cfg = GPTConfig.from_dict(T2I_CONFIG)
    gpt = GPT(cfg).to(DEVICE)
    enc = TextEncoder(TextEncoderConfig.from_dict(T2I_TEXT_CONFIG)).to(DEVICE)
    model = torch.nn.ModuleDict({"gpt": gpt, "text": enc})
    p_drop = args.t2i_attr_drop
    # variant probabilities: full, no thickness, no slant, digit only
    pv = torch.tensor([(1 - p_drop) ** 2, p_drop * (1 - p_drop), (1 - p_drop) * p_drop, p_drop ** 2])

    def condition(img, variant, g):
        i, m = ids[img, variant], masks[img, variant]
        f = enc(i, m)
        drop = torch.rand(len(img), generator=g).to(DEVICE) < 0.1
        f = torch.where(drop[:, None, None], gpt.null_condition(len(img)).to(f.dtype), f)
        return f, m

    def loss_fn(idx, g):
        t = toks[idx]
        variant = torch.multinomial(pv, len(idx), replacement=True, generator=g).to(DEVICE)
        f, m = condition(idx % n0, variant, g)
        return F.cross_entropy(gpt(f, t, m).flatten(0, 1), t.flatten())

    train_ar(args, "t2i", model, loss_fn, len(toks), 0, g, args.t2i_steps, args.gpt_lr)
    with torch.no_grad():
        c = (2 * args.gpt_shift + 1) ** 2 // 2                                   # the unshifted copy
        t_tr = toks[c * n0:(c + 1) * n0]
        f = enc(ids[:, 0], masks[:, 0])
        nll_tr = F.cross_entropy(gpt(f, t_tr, masks[:, 0]).flatten(0, 1), t_tr.flatten()).item()
        fn = gpt.null_condition(n0)
        nll_null = F.cross_entropy(gpt(fn, t_tr, masks[:, 0]).flatten(0, 1), t_tr.flatten()).item()
        # held-out: captions of the test images measured with the train thresholds
        from teachers.digit_captions import VOCABULARY, caption_text
        from teachers.text_encoder import WordTokenizer
        rec_te = ((vq.decode_code(vq.encode(xte * 2 - 1)) + 1) / 2).clamp(0, 1)
        i_te, m_te = WordTokenizer(VOCABULARY, T2I_TEXT_CONFIG["slots"])(
            [caption_text(c) for c in th.captions(rec_te.cpu(), yte.cpu())])
        i_te, m_te = i_te.to(DEVICE), m_te.to(DEVICE)
        toks_te = vq.encode(xte * 2 - 1)
        nll_te = F.cross_entropy(gpt(enc(i_te, m_te), toks_te, m_te).flatten(0, 1), toks_te.flatten()).item()
    return gpt, enc, th, {"test_nll_nats_per_token": nll_te, "train_nll_nats_per_token": nll_tr,
                          "train_nll_null_caption": nll_null, "train_sequences": len(toks)}


# ---- evaluation of the teachers -----------------------------------------------------------------
@torch.no_grad()
def sample_accuracy(teacher, clf, sampling, per_class: int, seed: int):
    g = torch.Generator(device=teacher.device).manual_seed(seed)
    labels = torch.arange(10, device=teacher.device).repeat_interleave(per_class)
    imgs = teacher.decode(teacher.sample(labels, sampling, generator=g))
    acc = (clf(imgs).argmax(1) == labels).float().mean().item()
    return acc, imgs


def save_grid(path, rows, labels_per_row):
    """rows: list of [10, 3, 16, 16] tensors (one per row); written as a PNG scaled 4x."""
    from PIL import Image
    import numpy as np

    pad = 2
    n = rows[0].shape[0]
    H = W = 16
    grid = torch.ones(3, len(rows) * (H + pad) + pad, n * (W + pad) + pad) * 0.5
    for r, imgs in enumerate(rows):
        for c in range(n):
            grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = imgs[c]
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * 4, arr.shape[0] * 4), Image.NEAREST)
    img.save(path)
    log(f"sample grid -> {path} (rows: {', '.join(labels_per_row)})")


def evaluate(args, teachers: dict, clf, xte, yte, per_class: int):
    out = {}
    rows, names = [], []
    # one real held-out example per class, then teachers' samples for classes 0..9
    first = torch.stack([xte[(yte == c).nonzero()[0, 0]] for c in range(10)])
    rows.append(first)
    names.append("real held-out")
    for name, t in teachers.items():
        acc, imgs = sample_accuracy(t, clf, t.default_sampling, per_class, args.seed + 100)
        res = {"default_sampling": t.default_sampling.to_dict(), "class_accuracy": acc, "num_samples": len(imgs)}
        log(f"{name}: classifier accuracy on {len(imgs)} samples ({t.default_sampling}) = {acc:.3f}")
        if args.probe:
            from dependence_probe import probe

            res["dependence"] = probe(t, clf, t.default_sampling, n=args.probe, pool=4 * args.probe,
                                      seed=args.seed + 200)
            log(f"  {name} dependence: {res['dependence']}")
        if args.sweep:
            for cfg in args.sweep:
                sp = dataclasses.replace(t.default_sampling, cfg_scale=cfg)
                a, _ = sample_accuracy(t, clf, sp, per_class, args.seed + 100)
                log(f"  {name} cfg {cfg}: accuracy {a:.3f}")
                res[f"class_accuracy_cfg{cfg}"] = a
        out[name] = res
        for k in range(2):
            rows.append(imgs[torch.arange(10) * per_class + k].cpu())
            names.append(f"{name} #{k}")
    if args.samples_png:
        save_grid(args.samples_png, rows, names)
    return out


# ---- saving -------------------------------------------------------------------------------------
def save(out: str, stem: str, tensors: dict, meta: dict):
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, stem)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, base + ".safetensors")
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    for ext in (".safetensors", ".json"):
        os.chmod(base + ext, 0o644)
    log(f"wrote {base}.safetensors ({os.path.getsize(base + '.safetensors') / 1e6:.2f} MB) and .json")


def prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clf-steps", type=int, default=600)
    ap.add_argument("--vq-steps", type=int, default=500)
    ap.add_argument("--vq-batch", type=int, default=32)
    ap.add_argument("--vq-lr", type=float, default=2e-3)
    ap.add_argument("--gpt-steps", type=int, default=4000)
    ap.add_argument("--gpt-lr", type=float, default=3e-3)
    ap.add_argument("--var-steps", type=int, default=1500)
    ap.add_argument("--var-lr", type=float, default=3e-3)
    ap.add_argument("--t2i-steps", type=int, default=4000)
    ap.add_argument("--t2i-attr-drop", type=float, default=0.1,
                    help="digits-t2i: probability of leaving each attribute word out of a training caption")
    ap.add_argument("--t2i-cfg", type=float, default=T2I_SAMPLING.cfg_scale, help="digits-t2i teacher's default CFG")
    ap.add_argument("--ar-batch", type=int, default=64)
    ap.add_argument("--gpt-dim", type=int, default=GPT_CONFIG["dim"])
    ap.add_argument("--var-dim", type=int, default=VAR_CONFIG["embed_dim"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU run is recorded in the JSON)")
    ap.add_argument("--gpt-shift", type=int, default=1,
                    help="LlamaGen augmentation: GPT data = every integer shift in [-s, s]^2, VQ random shifts up to s")
    ap.add_argument("--var-shift", type=int, default=2,
                    help="VAR augmentation (same rule). 2: the class-conditional token marginals blend "
                         "shifted strokes, so onestep* fails (issue 12)")
    ap.add_argument("--var-cfg", type=float, default=VAR_SAMPLING.cfg_scale, help="VAR teacher's default CFG")
    ap.add_argument("--patch-nums", type=int, nargs="+", default=list(PATCH_NUMS), help="VAR scales")
    ap.add_argument("--gpt-layers", type=int, default=GPT_CONFIG["n_layer"])
    ap.add_argument("--var-depth", type=int, default=VAR_CONFIG["depth"])
    ap.add_argument("--vae-cvae", type=int, default=VAE_CONFIG["Cvae"], help="VAR tokenizer code dimension")
    ap.add_argument("--vae-v", type=int, default=VAE_CONFIG["V"], help="VAR codebook size")
    ap.add_argument("--probe", type=int, default=0,
                    help="also run tools/dependence_probe.py on each teacher with this many samples")
    ap.add_argument("--out", default=zoo.ZOO_DIR, help="where to write the zoo files (default teachers/zoo)")
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--eval-per-class", type=int, default=50, help="teacher samples per class for class accuracy")
    ap.add_argument("--eval-only", action="store_true", help="load the shipped zoo and evaluate it")
    ap.add_argument("--sweep", type=float, nargs="*", default=None, help="also report accuracy at these cfg scales")
    ap.add_argument("--samples-png", default=None, help="write a grid of real vs sampled digits here")
    ap.add_argument("--only", nargs="*", default=None,
                    help="train only these phases (classifier vq vqvae gpt var); others are loaded from the zoo")
    args = ap.parse_args()

    global DEVICE
    GPT_CONFIG["dim"], VAR_CONFIG["embed_dim"] = args.gpt_dim, args.var_dim
    GPT_CONFIG["n_layer"], VAR_CONFIG["depth"] = args.gpt_layers, args.var_depth
    VAE_CONFIG["patch_nums"] = VAR_CONFIG["patch_nums"] = list(args.patch_nums)
    VAE_CONFIG["Cvae"] = VAR_CONFIG["Cvae"] = args.vae_cvae
    VAE_CONFIG["V"] = VAR_CONFIG["V"] = args.vae_v
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if DEVICE.type == "cuda":
        # cuBLAS needs this for deterministic matmuls; some CUDA backward kernels (area interpolation)
        # have no deterministic version, so on the GPU determinism is best effort.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    total = Timer()
    xtr, ytr = (t.to(DEVICE) for t in digits_data("train"))
    xte, yte = (t.to(DEVICE) for t in digits_data("test"))
    log(f"digits: train {tuple(xtr.shape)}, test {tuple(xte.shape)}; threads {args.threads}, torch {torch.__version__}")

    common = {"data": DATA_RULE, "seed": args.seed,
              "augmentation": "integer pixel shifts, zero fill: AR data every shift in [-s, s]^2, tokenizer "
                              "random shifts up to s px (s: train.shift)",
              "threads": args.threads, "torch": torch.__version__, "trained_by": "tools/train_digits_zoo.py",
              "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
              "command": "python tools/train_digits_zoo.py " + " ".join(sys.argv[1:])}

    if args.eval_only:
        teachers = {n: zoo.load(n, device=DEVICE) for n in zoo.ZOO}
        clf = zoo.load_classifier(DEVICE)
        acc = (clf(xte).argmax(1) == yte).float().mean().item()
        log(f"classifier held-out accuracy {acc:.4f}")
        evaluate(args, teachers, clf, xte, yte, args.eval_per_class)
        return

    phases = args.only or ["classifier", "vq", "vqvae", "gpt", "var", "t2i"]
    times = {}

    if "classifier" in phases:
        t = Timer()
        clf, clf_res = train_classifier(args, xtr, ytr, xte, yte)
        times["classifier"] = t.read()
        log(f"classifier: held-out accuracy {clf_res['test_accuracy']:.4f} (train {clf_res['train_accuracy']:.4f}) "
            f"[{times['classifier']}]")
        save(args.out, zoo.CLASSIFIER_STEM, clf.state_dict(),
             {"config": CLASSIFIER_CONFIG, "features": "128-d pre-activation of fc (penultimate layer)",
              "input": "[N, 3, 16, 16] in [0, 1]", "train": {"steps": args.clf_steps, "batch": 64,
                                                              "augmentation": "shifts up to 2 px, gaussian noise 0.05"},
              "metrics": clf_res, "time": times["classifier"], **common})
    else:
        clf = zoo.load_classifier(DEVICE)

    if "vq" in phases:
        t = Timer()
        vq, vq_res = train_vq(args, xtr, xte)
        times["vq"] = t.read()
        log(f"LlamaGen VQ: held-out rec MSE {vq_res['test_mse']:.5f} (PSNR {vq_res['test_psnr_db']:.2f} dB), "
            f"codes used {vq_res['codes_used_train']}/{VQ_CONFIG['codebook_size']} [{times['vq']}]")
    else:
        old = zoo.load("digits-llamagen", device=DEVICE)
        vq, vq_res = old.vq, zoo.read_meta("digits-llamagen")["tokenizer_metrics"]
    if "vqvae" in phases:
        t = Timer()
        vae, vae_res = train_vqvae(args, xtr, xte)
        times["vqvae"] = t.read()
        log(f"VAR VQ-VAE: held-out rec MSE {vae_res['test_mse']:.5f} (PSNR {vae_res['test_psnr_db']:.2f} dB), "
            f"codes used {vae_res['codes_used_train']}/{VAE_CONFIG['V']} [{times['vqvae']}]")
    else:
        old = zoo.load("digits-var", device=DEVICE)
        vae, vae_res = old.vae, zoo.read_meta("digits-var")["tokenizer_metrics"]

    if "gpt" in phases:
        t = Timer()
        gpt, gpt_res = train_gpt(args, vq, xtr, ytr, xte, yte)
        times["gpt"] = t.read()
        log(f"LlamaGen GPT: held-out NLL {gpt_res['test_nll_nats_per_token']:.4f} nats/token "
            f"(train {gpt_res['train_nll_nats_per_token']:.4f}) [{times['gpt']}]")
    else:
        gpt, gpt_res = zoo.load("digits-llamagen", device=DEVICE).gpt, zoo.read_meta("digits-llamagen")["metrics"]
    if "var" in phases:
        t = Timer()
        vmodel, var_res = train_var(args, vae, xtr, ytr, xte, yte)
        times["var"] = t.read()
        log(f"VAR: held-out NLL {var_res['test_nll_nats_per_token']:.4f} nats/token, per scale "
            f"{[round(v, 3) for v in var_res['test_nll_per_scale']]} [{times['var']}]")
    else:
        vmodel, var_res = zoo.load("digits-var", device=DEVICE).var, zoo.read_meta("digits-var")["metrics"]

    if "t2i" in phases:
        run_t2i(args, vq, vq_res, clf, xtr, ytr, xte, yte, common)
        if not {"vq", "vqvae", "gpt", "var"} & set(phases):
            return

    teachers = {"digits-llamagen": llamagen.load(GPT_CONFIG, gpt.state_dict(), tokenizer_config=VQ_CONFIG,
                                                 tokenizer_checkpoint=vq.state_dict(), device=DEVICE),
                "digits-var": var.load(VAR_CONFIG, vmodel.state_dict(), tokenizer_config=VAE_CONFIG,
                                       tokenizer_checkpoint=vae.state_dict(), device=DEVICE)}
    teachers["digits-llamagen"].default_sampling = LLAMAGEN_SAMPLING
    var_sampling = dataclasses.replace(VAR_SAMPLING, cfg_scale=args.var_cfg)
    teachers["digits-var"].default_sampling = var_sampling
    trained = {"digits-llamagen": {"vq", "gpt"}, "digits-var": {"vqvae", "var"}}
    teachers = {n: t for n, t in teachers.items() if trained[n] & set(phases)}
    t = Timer()
    ev = evaluate(args, teachers, clf, xte, yte, args.eval_per_class)
    times["eval"] = t.read()
    times["total"] = total.read()
    log(f"times: {times}")

    note = ("DD's teacher sampling for these teachers: {}; no top-k (the small codebook makes the "
            "paper's top-k a no-op anyway){}.")
    # an untouched family keeps its files (and their metadata)
    if {"vq", "gpt"} & set(phases):
        save(args.out, "digits-llamagen", {**prefixed("gpt.", gpt.state_dict()), **prefixed("vq.", vq.state_dict())},
             {"family": "llamagen", "config": GPT_CONFIG, "tokenizer_config": VQ_CONFIG,
              "default_sampling": LLAMAGEN_SAMPLING.to_dict(),
              "sampling_note": note.format("the paper's cfg 2.0", ", top-p off"),
              "image_size": 16, "num_tokens": 64,
              "train": {"steps": args.gpt_steps, "batch": args.ar_batch, "lr": args.gpt_lr, "ema": args.ema,
                        "shift": args.gpt_shift,
                        "tokenizer_steps": args.vq_steps, "tokenizer_batch": args.vq_batch},
              "tokenizer_metrics": vq_res, "metrics": gpt_res, "samples": ev["digits-llamagen"],
              "time": {k: times.get(k) for k in ("vq", "gpt")}, **common})
    if {"vqvae", "var"} & set(phases):
        save(args.out, "digits-var", {**prefixed("var.", vmodel.state_dict()), **prefixed("vae.", vae.state_dict())},
             {"family": "var", "config": VAR_CONFIG, "tokenizer_config": VAE_CONFIG,
              "default_sampling": var_sampling.to_dict(),
              "sampling_note": note.format(f"cfg {args.var_cfg} under VAR's linear ramp (the paper's 2.0 collapses "
                                           "the shifted digits toward centred modes)", ", VAR's top-p 0.95 kept"),
              "image_size": 16, "num_tokens": sum(p * p for p in VAR_CONFIG["patch_nums"]),
              "train": {"steps": args.var_steps, "batch": args.ar_batch, "lr": args.var_lr, "ema": args.ema,
                        "shift": args.var_shift,
                        "tokenizer_steps": args.vq_steps, "tokenizer_batch": args.vq_batch},
              "tokenizer_metrics": vae_res, "metrics": var_res, "samples": ev["digits-var"],
              "time": {k: times.get(k) for k in ("vqvae", "var")}, **common})


def run_t2i(args, vq, vq_res, clf, xtr, ytr, xte, yte, common):
    """Phase t2i: train, evaluate and save digits-t2i (its VQ is digits-llamagen's, reused as is)."""
    from teachers.digit_captions import VOCABULARY
    from teachers.text_encoder import PromptEncoder, TextEncoder, TextEncoderConfig, WordTokenizer

    t = Timer()
    gpt, enc, th, res = train_t2i(args, vq, xtr, ytr, xte, yte)
    t_train = t.read()
    log(f"t2i GPT: held-out NLL {res['test_nll_nats_per_token']:.4f} nats/token (train "
        f"{res['train_nll_nats_per_token']:.4f}, null caption {res['train_nll_null_caption']:.4f}) [{t_train}]")
    teacher = llamagen.load(T2I_CONFIG, gpt.state_dict(), tokenizer_config=VQ_CONFIG,
                            tokenizer_checkpoint=vq.state_dict(), device=DEVICE)
    sampling = dataclasses.replace(T2I_SAMPLING, cfg_scale=args.t2i_cfg)
    teacher.default_sampling = sampling
    enc_cpu = TextEncoder(TextEncoderConfig.from_dict(T2I_TEXT_CONFIG))
    enc_cpu.load_state_dict({k: v.cpu() for k, v in enc.state_dict().items()})
    teacher.prompt_encoder = PromptEncoder(WordTokenizer(VOCABULARY, T2I_TEXT_CONFIG["slots"]), enc_cpu)
    t = Timer()
    from dependence_probe import probe_t2i
    ev = probe_t2i(teacher, clf, th, sampling, n=args.probe or 1000, seed=args.seed + 200,
                   sweep=args.sweep or (), samples_png=args.samples_png)
    log(f"digits-t2i: {ev}")
    t_eval = t.read()
    save(args.out, "digits-t2i", {**prefixed("gpt.", gpt.state_dict()), **prefixed("vq.", vq.state_dict()),
                                   **prefixed("text.", enc.state_dict())},
         {"family": "llamagen", "config": T2I_CONFIG, "tokenizer_config": VQ_CONFIG,
          "text_encoder_config": T2I_TEXT_CONFIG, "vocabulary": list(VOCABULARY),
          "attribute_thresholds": th.to_dict(),
          "captions": "teachers/digit_captions.py: 'a [thin|thick][,] [upright|slanted] DIGIT'; attributes "
                      "measured on the VQ reconstruction of each unshifted train image (ink mass and slant vs "
                      "the per-digit medians = attribute_thresholds); every shift of an image keeps its caption",
          "default_sampling": sampling.to_dict(),
          "sampling_note": "cfg 2.0 like digits-llamagen; no top-k, top-p off.",
          "image_size": 16, "num_tokens": 64,
          "tokenizer": "the digits-llamagen VQ, copied unchanged (same 16x16 -> 64 tokens); not retrained",
          "train": {"steps": args.t2i_steps, "batch": args.ar_batch, "lr": args.gpt_lr, "ema": args.ema,
                    "shift": args.gpt_shift, "attribute_drop": args.t2i_attr_drop, "caption_drop": 0.1,
                    "joint": "GPT and text encoder trained together on the token cross-entropy"},
          "tokenizer_metrics": vq_res, "metrics": res, "samples": ev,
          "time": {"t2i": t_train, "eval": t_eval}, **common})


if __name__ == "__main__":
    main()
