"""ARD's discriminator stage (ard_discriminator.py, `dd ard train --disc-weight`): hinge losses on hand
values, the adaptive weight is the ratio of gradient norms at the last layer, the teacher trunk stays
frozen, a resume with the stage on reproduces the next losses exactly, and the heads load strictly."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from distilled_decoding.ard_discriminator import (DiscHeads, DiscriminatorStage, DiscSettings, adaptive_weight,
                                                  hinge_d_loss, hinge_g_loss)
from distilled_decoding.ard_train import ARDTrainArgs, train_ard
from distilled_decoding.run_dir import latest_checkpoint
from teachers.checkpoint import load_safetensors
from teachers.dit import DiT, DiTConfig

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_heads=2,
                 class_dropout_prob=0.1, num_classes=3, learn_sigma=False)


def test_hinge_losses_on_hand_values():
    real = [torch.tensor([[0.5, 2.0, -1.0]]), torch.tensor([[1.0, 1.0, 1.0]])]
    fake = [torch.tensor([[-2.0, 0.5]]), torch.tensor([[-1.0, -3.0]])]
    # head 0: reals relu(0.5, -1, 2) -> 2.5 / 3, fakes relu(-1, 1.5) -> 0.75; head 1: 0 and relu(0, -2) -> 0
    assert torch.allclose(hinge_d_loss(real, fake), torch.tensor((2.5 / 3 + 0.75 + 0.0) / 2))
    # generator: −D(fake) per sample, averaged over tokens then heads: −(−0.75 + −2.0) / 2
    assert torch.allclose(hinge_g_loss(fake), torch.tensor([1.375]))


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_layer():
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    x = torch.tensor([1.0, 2.0])
    loss_r = (w @ x).pow(2).sum()
    loss_g = (3.0 * w).sum()
    got = adaptive_weight(loss_r, loss_g, w)
    grad_r = 2 * torch.outer(w.detach() @ x, x)         # d/dW ||W x||^2
    grad_g = torch.full((2, 2), 3.0)
    assert torch.allclose(got, grad_r.norm() / (grad_g.norm() + 1e-4))
    assert not got.requires_grad
    assert adaptive_weight((w * 0).sum() + (w @ x).sum(), (w * 0).sum(), w).item() == 1e4    # clamped


class LinearStudent(nn.Module):
    """A stand-in student whose last head's `linear` writes the final state [B, 1, 8, 8]."""

    def __init__(self):
        super().__init__()
        head = nn.Module()
        head.linear = nn.Linear(64, 64)
        self.heads = nn.ModuleList([head])

    def forward(self, x):
        return self.heads[-1].linear(x.flatten(1)).view(-1, 1, 8, 8)


def tiny_stage(weight=10.0, start=0):
    torch.manual_seed(0)
    trunk = DiT(TINY)
    with torch.no_grad():           # the official init zeroes the adaLN: re-randomise so the trunk is not trivial
        for p in trunk.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    real_x, real_y = torch.randn(20, 1, 8, 8), torch.randint(0, 3, (20,))
    return trunk, DiscriminatorStage(trunk, real_x, real_y, DiscSettings(weight=weight, start_step=start), seed=0)


def test_generator_term_uses_the_adaptive_weight_and_the_trunk_stays_frozen():
    trunk, stage = tiny_stage(weight=10.0, start=1)
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    heads0 = {k: v.clone() for k, v in stage.heads.state_dict().items()}
    student = LinearStudent()
    x, labels = torch.randn(4, 64), torch.tensor([0, 1, 2, 0])
    target = torch.randn(4, 1, 8, 8)
    for step in range(3):
        stage.begin(step)
        fake = student(x)
        loss_r = (fake - target).pow(2).mean()
        loss, parts = stage.generator_loss(student, fake, loss_r, labels)
        if step == 0:              # before start_step: the regression loss alone
            assert loss is loss_r and parts["d_weight"].abs().sum() == 0
        else:
            layer = student.heads[-1].linear.weight
            logits = stage.logits(fake, labels)
            loss_g = hinge_g_loss(logits).mean()
            g_r, = torch.autograd.grad(loss_r, layer, retain_graph=True)
            g_g, = torch.autograd.grad(loss_g, layer, retain_graph=True)
            w = 10.0 * (g_r.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4)
            assert torch.allclose(parts["d_weight"], w.expand(4))
            assert torch.allclose(loss, loss_r + w * loss_g)
            assert torch.allclose(parts["gan_g"], hinge_g_loss(logits).detach())
        loss.backward()
        values = stage.update(step)
        assert values.shape == (3,) and torch.isfinite(values).all()
        student.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in trunk.parameters())
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())
    assert not all(torch.equal(heads0[k], v) for k, v in stage.heads.state_dict().items())    # the heads learnt
    assert all(p.grad is None for p in stage.heads.parameters())


def test_real_batches_are_a_function_of_seed_step_and_rank():
    _, a = tiny_stage()
    _, b = tiny_stage()
    assert torch.equal(a.real_batch(5, 6)[0], b.real_batch(5, 6)[0])
    assert not torch.equal(a.real_batch(5, 6)[0], a.real_batch(6, 6)[0])


# ---- dd ard train with the stage on -----------------------------------------------------------------
@pytest.fixture(scope="module")
def data(ard_trajectories):
    return ard_trajectories


def args(data, out, **kw) -> ARDTrainArgs:
    base = dict(data=str(data / "traj"), out=str(out), batch_size=8, lr=1e-3, max_steps=6, ckpt_every=3,
                log_every=1, num_workers=0, ema_decay=0.9, progress=False, threads=1, device="cpu",
                disc_weight=10.0, disc_start_step=2, real_data="digits")
    return ARDTrainArgs(**{**base, **kw})


def records(out) -> dict:
    with open(out / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_resume_with_the_disc_stage_reproduces_the_next_losses_and_the_heads_load_strictly(data, tmp_path):
    whole = tmp_path / "whole"
    train_ard(args(data, whole), log=lambda s: None)
    rec = records(whole)
    assert rec[1]["d_weight"] == 0 and rec[3]["d_weight"] > 0 and rec[3]["gan_g"] != 0
    assert {"d_loss", "d_real", "d_fake"} <= set(rec[1])

    part = tmp_path / "part"
    train_ard(args(data, part, max_steps=3), log=lambda s: None)
    train_ard(args(data, part, resume=True), log=lambda s: None)
    again = records(part)
    for step in (4, 5, 6):
        for key in ("loss", "step3", "gan_g", "d_weight", "d_loss", "d_fake"):
            assert again[step][key] == rec[step][key], (step, key)
    ckpts = [latest_checkpoint(str(whole)), latest_checkpoint(str(part))]
    for stem in ("model", "disc"):
        a, b = (load_safetensors(f"{c}/{stem}.safetensors") for c in ckpts)
        assert all(torch.equal(a[k], b[k]) for k in a), stem
    heads = load_safetensors(f"{ckpts[0]}/disc.safetensors")
    DiscHeads(64, 4).load_state_dict(heads, strict=True)                  # digits-dit: width 64, depth 4
    with pytest.raises(RuntimeError, match="Unexpected key"):
        DiscHeads(64, 3).load_state_dict(heads, strict=True)

    with pytest.raises(ValueError, match="disc_lr"):                      # the stage's settings are the stream's
        train_ard(args(data, part, resume=True, max_steps=9, disc_lr=5e-4), log=lambda s: None)
    plain = tmp_path / "plain"
    train_ard(args(data, plain, max_steps=3, disc_weight=0.0), log=lambda s: None)
    with pytest.raises(Exception, match="without it"):
        train_ard(args(data, plain, resume=True), log=lambda s: None)
