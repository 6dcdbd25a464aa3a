"""ARD's optional second stage (R + D): a discriminator on the student's final output, trained beside it.

The discriminator is the frozen teacher trunk (its patch embedder, time/label embedders and every
DiT block, run at time label `timestep` on a clean sample) with one light head per block; head i
reads block i's tokens [B, L, D] and scores each token, projection-conditioned on the trunk's
c = t_emb + y_emb. Loss: hinge, averaged over heads and tokens,

    L_D = E_real[relu(1 − D)] + E_fake[relu(1 + D)]        (the heads' update, its own optimizer)
    L_G = −E_fake[D]                                         (the student's adversarial term)

the student minimising L_R + λ·w·L_G with the adaptive weight w = ‖∇_W L_R‖ / (‖∇_W L_G‖ + 1e-4),
clamped to [0, 1e4] and detached, W the last head's output linear (the layer that writes the final
state), and w = 0 before `start_step` while the heads already learn (the public ARD code: λ 10,
start 3000, heads' lr 1e-3, a fine-tune of the regression checkpoint; VQGAN's adaptive weight).
Reals are the data the teacher models, in its space (`teacher.encode`: the digits in [-1, 1] for the
pixel-space digits-dit, SD-VAE latents for DiT-XL/2).

A head (ours; the public code's heads are 1-D convolutions with local batch norm over the token
axis): spectral-normalised token-wise linear D→D, LeakyReLU(0.2), spectral-normalised linear D→P,
dotted with a linear P-map of c, / √P. Only the heads are state (`disc.safetensors` in a checkpoint,
loaded strictly); the trunk is the teacher, reloaded from the run's teacher spec.

    stage = DiscriminatorStage(teacher.model, real_x, real_y, DiscSettings(weight=10.0), seed=0)
    loss, parts = stage.generator_loss(student, out_last, loss_r, labels)   # inside the loss function
    second = stage.second_model()                                           # trainer.train_loop(second=...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from teachers.dit import DiT

from .distributed import mean_over_ranks
from .trainer import SecondModel

WEIGHT_EPS = 1e-4           # the adaptive weight's denominator guard (VQGAN, the public ARD code)
WEIGHT_MAX = 1e4
STAGE_NAMES = ("d_loss", "d_real", "d_fake")       # logged after each discriminator update


@dataclass(frozen=True)
class DiscSettings:
    """weight: λ, the adversarial term's scale on the adaptive weight (0 = no discriminator stage);
    start_step: updates before which the student's adversarial weight is 0 (the heads learn from
    step 0); lr: the heads' AdamW learning rate; timestep: the trunk's time label for the clean sample;
    proj_dim: P, the heads' projection width."""

    weight: float = 10.0
    start_step: int = 3000
    lr: float = 1e-3
    timestep: int = 0
    proj_dim: int = 64


# ---- losses -----------------------------------------------------------------------------------------
def hinge_d_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-head logits [B, L] of reals and fakes -> mean over heads of E[relu(1 − D(real))] + E[relu(1 + D(fake))]."""
    terms = [F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def hinge_g_loss(fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-head logits [B, L] of fakes -> [B]: −D(fake) averaged over heads and tokens, per sample."""
    return -torch.stack([f.float().mean(-1) for f in fake]).mean(0)


def adaptive_weight(loss_r: torch.Tensor, loss_g: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """‖∇_layer L_R‖ / (‖∇_layer L_G‖ + 1e-4), clamped to [0, 1e4], detached (both graphs kept)."""
    g_r, = torch.autograd.grad(loss_r, layer, retain_graph=True)
    g_g, = torch.autograd.grad(loss_g, layer, retain_graph=True)
    return (g_r.norm() / (g_g.norm() + WEIGHT_EPS)).clamp(0.0, WEIGHT_MAX).detach()


# ---- the discriminator --------------------------------------------------------------------------------
def trunk_features(trunk: DiT, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
                   ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """The teacher's blocks on x [B, C, H, W] at times t [B] -> ([depth] x tokens [B, L, D] after each
    block, conditioning c [B, D])."""
    h = trunk.x_embedder(x.to(trunk.pos_embed.dtype)) + trunk.pos_embed
    c = trunk.t_embedder(t) + trunk.y_embedder(labels)
    feats = []
    for block in trunk.blocks:
        h = block(h, c)
        feats.append(h)
    return feats, c


class DiscHead(nn.Module):
    """tokens [B, L, D], c [B, D] -> per-token logits [B, L]."""

    def __init__(self, width: int, proj_dim: int):
        super().__init__()
        self.hidden = spectral_norm(nn.Linear(width, width))
        self.out = spectral_norm(nn.Linear(width, proj_dim))
        self.cmap = nn.Linear(width, proj_dim)
        self.proj_dim = proj_dim

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = self.out(F.leaky_relu(self.hidden(h), 0.2))                    # [B, L, P]
        return (z * self.cmap(c)[:, None]).sum(-1) / math.sqrt(self.proj_dim)


class DiscHeads(nn.Module):
    """One DiscHead per teacher block: what the discriminator stage trains and checkpoints."""

    def __init__(self, width: int, depth: int, proj_dim: int = 64):
        super().__init__()
        self.heads = nn.ModuleList([DiscHead(width, proj_dim) for _ in range(depth)])

    def forward(self, feats: Sequence[torch.Tensor], c: torch.Tensor) -> List[torch.Tensor]:
        return [head(h, c) for head, h in zip(self.heads, feats)]


def frozen_trunk(teacher_model: DiT) -> DiT:
    """The teacher's DiT as the discriminator's trunk: eval mode, no parameter requires grad (its
    final layer is never run)."""
    return teacher_model.eval().requires_grad_(False)


# ---- the stage: the student's adversarial term and the heads' update -------------------------------------
class DiscriminatorStage:
    """The R + D stage of one training run (one rank).

    trunk: the teacher's DiT (frozen here); real_x [N, C, H, W], real_y [N]: real data in the teacher's
    space; seed, rank: the real batch of update k is drawn by a generator seeded (seed, k, rank), so a
    resumed run draws what an uninterrupted one would."""

    def __init__(self, trunk: DiT, real_x: torch.Tensor, real_y: torch.Tensor, settings: DiscSettings,
                 seed: int = 0, rank: int = 0, world: int = 1, device: str = "cpu"):
        self.trunk = frozen_trunk(trunk).to(device)
        self.settings = settings
        cfg = trunk.cfg
        self.heads = DiscHeads(cfg.hidden_size, cfg.depth, settings.proj_dim).to(device).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.heads.parameters(), lr=settings.lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.real_x, self.real_y = real_x, real_y
        self.seed, self.rank, self.world, self.device = seed, rank, world, device
        self.step = 0
        self.kept: List[Tuple[torch.Tensor, torch.Tensor]] = []        # this update's fakes and labels

    def active(self) -> bool:
        """Whether the student's adversarial term is on at the current update."""
        return self.settings.weight > 0 and self.step >= self.settings.start_step

    def logits(self, x: torch.Tensor, labels: torch.Tensor) -> List[torch.Tensor]:
        t = torch.full((x.shape[0],), self.settings.timestep, device=x.device, dtype=torch.long)
        feats, c = trunk_features(self.trunk, x, t, labels)
        return self.heads(feats, c)

    def generator_loss(self, student: nn.Module, fake: torch.Tensor, loss_r: torch.Tensor, labels: torch.Tensor
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """fake [B, C, H, W]: the student's final output (with its graph), loss_r: its regression loss.
        Keeps the fakes for this update's heads step. -> (loss_r + λ·w·L_G, {"gan_g": [B], "d_weight": [B]});
        before start_step the loss is loss_r and both parts 0."""
        self.kept.append((fake.detach(), labels.detach()))
        B = fake.shape[0]
        if not self.active():
            zero = torch.zeros(B, device=fake.device)
            return loss_r, {"gan_g": zero, "d_weight": zero}
        per = hinge_g_loss(self.logits(fake, labels))                  # [B]
        loss_g = per.mean()
        layer = getattr(student, "module", student).heads[-1].linear.weight
        w = self.settings.weight * adaptive_weight(loss_r, loss_g, layer)
        return loss_r + w * loss_g, {"gan_g": per.detach(), "d_weight": w.expand(B)}

    def real_batch(self, step: int, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """n real items for update `step` on this rank (a pure function of seed, step, rank)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + self.rank)
        idx = torch.randint(0, self.real_x.shape[0], (n,), generator=g)
        return self.real_x[idx].to(self.device), self.real_y[idx].to(self.device)

    def begin(self, step: int) -> None:
        self.step = step
        self.kept.clear()

    def update(self, step: int) -> torch.Tensor:
        """One AdamW step of the heads on this update's fakes and as many reals -> [d_loss, mean D(real),
        mean D(fake)]."""
        fake = torch.cat([f for f, _ in self.kept])
        fake_y = torch.cat([y for _, y in self.kept])
        self.kept.clear()
        real, real_y = self.real_batch(step, fake.shape[0])
        x, y = torch.cat([real, fake.to(real.dtype)]), torch.cat([real_y, fake_y])
        params = list(self.heads.parameters())
        self.heads.train().requires_grad_(True)
        try:
            with torch.no_grad():          # the trunk is frozen: only the heads need a graph
                t = torch.full((x.shape[0],), self.settings.timestep, device=x.device, dtype=torch.long)
                feats, c = trunk_features(self.trunk, x, t, y)
            logits = self.heads([f.float() for f in feats], c.float())       # one pass: one power iteration
            n = real.shape[0]
            loss = hinge_d_loss([z[:n] for z in logits], [z[n:] for z in logits])
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = mean_over_ranks(g, self.world) if self.world > 1 else g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.heads.eval().requires_grad_(False)
        d_real = torch.stack([z[:n].mean() for z in logits]).mean()
        d_fake = torch.stack([z[n:].mean() for z in logits]).mean()
        return torch.stack([loss.detach(), d_real.detach(), d_fake.detach()])

    def second_model(self) -> SecondModel:
        return SecondModel("disc", self.optimizer, STAGE_NAMES, self.begin, self.update)


# ---- real data ----------------------------------------------------------------------------------------
def load_real_data(source: str, teacher, batch_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real data in the teacher's space -> (x [N, C, H, W] float32, labels [N] int64). source: "digits"
    (the zoo's training digits, what digits-dit was trained on) or an ADM-style .npz (arr_0 uint8 images
    [N, H, W, 3], arr_1 labels), encoded with teacher.encode in batches."""
    import numpy as np
    if source == "digits":
        from teachers.zoo import digits_data
        images, labels = digits_data("train")
    else:
        with np.load(source) as f:
            if "arr_1" not in f:
                raise ValueError(f"--real-data {source}: no labels (arr_1) in the .npz")
            images = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).float().div(255)
            labels = torch.from_numpy(f["arr_1"]).long()
    side = teacher.image_size
    if tuple(images.shape[-2:]) != (side, side):
        raise ValueError(f"--real-data {source}: images are {tuple(images.shape[-2:])}, the teacher's are {side}x{side}")
    device = next(teacher.model.parameters()).device
    g = torch.Generator(device).manual_seed(0)          # a VAE's posterior sample: drawn once, fixed
    with torch.no_grad():
        x = torch.cat([teacher.encode(b.to(device), generator=g).float().cpu() for b in images.split(batch_size)])
    return x, labels
