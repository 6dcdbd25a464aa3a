"""The paper's training recipe (issue 13): the perceptual embedding loss (digits-classifier features of
images decoded by the teacher's VQ decoder, perceptual.py), the lpips path's refusal, and the shared
loop's optimizer options (lr per 256, warm-up, cosine, epochs). Resume exactness with a warm-up is
checked in tests/test_student.py."""
import json
import sys

import click
import pytest
import torch

from distilled_decoding.dataset_build import build_dataset
from distilled_decoding.dd_loss import dd_loss, make_emb_loss
from distilled_decoding.errors import DDError
from distilled_decoding.flowmap import FlowMapConfig
from distilled_decoding.perceptual import DigitsPerceptualLoss, feature_distance
from distilled_decoding.student import build_student
from distilled_decoding.teacher_spec import TeacherSpec, resolve_sampling
from distilled_decoding.train import TrainArgs, train
from distilled_decoding.trainer import LoopArgs, describe_recipe, lr_at, resolve_recipe


@pytest.fixture(scope="module")
def digits():
    """(teacher, spec) of the zoo's digits-llamagen (16x16 images: the perceptual loss's)."""
    spec = TeacherSpec("digits-llamagen")
    teacher = spec.load("cpu")
    return teacher, spec


@pytest.fixture(scope="module")
def digits_pairs(digits, tmp_path_factory):
    teacher, spec = digits
    data = tmp_path_factory.mktemp("digits") / "pairs"
    build_dataset(str(data), teacher, spec, num_samples=96, sampling=resolve_sampling(teacher),
                  fm_config=FlowMapConfig(nfe=4), seed=0, shard_size=96, batch_size=96, show_progress=False,
                  log=lambda s: None)
    return str(data)


def _batch(teacher, seed=0, B=4):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, teacher.codebook.shape[0], (B, teacher.num_tokens), generator=g)
    return tokens, teacher.codebook[tokens].float()


# ---- the perceptual loss -------------------------------------------------------------------------
def test_perceptual_zero_on_identical_and_grows_with_the_perturbation(digits):
    teacher, _ = digits
    fn, desc = make_emb_loss("perceptual", teacher)
    assert desc.startswith("perceptual") and "uniform" in desc
    assert not any(p.requires_grad for p in fn.net.parameters()) and not fn.net.training
    _, target = _batch(teacher)
    mask = torch.ones(target.shape[:2], dtype=torch.bool)
    assert torch.equal(fn(target, target, mask), torch.zeros(4))
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(target.shape, generator=g)
    d = [fn(target + s * direction, target, mask) for s in (0.05, 0.2, 0.8)]
    assert (d[0] > 0).all() and (d[1] > d[0]).all() and (d[2] > d[1]).all(), d
    # only the mask's positions take the prediction: elsewhere the target rows are decoded
    assert torch.equal(fn(target + direction, target, torch.zeros_like(mask)), torch.zeros(4))


def test_feature_distance_is_lpips_style():
    """Unit-normalised over channels: a positive rescaling of a map changes nothing; identical maps
    give 0; each layer contributes its spatial mean of Σ_C squared differences, layers uniformly."""
    g = torch.Generator().manual_seed(0)
    a = [torch.rand(2, 5, 4, 4, generator=g) + 0.1, torch.rand(2, 7, 2, 2, generator=g) + 0.1]
    b = [torch.rand(2, 5, 4, 4, generator=g) + 0.1, torch.rand(2, 7, 2, 2, generator=g) + 0.1]
    torch.testing.assert_close(feature_distance(a, [3 * x for x in a]), torch.zeros(2))
    n = [[x / x.norm(dim=1, keepdim=True) for x in m] for m in (a, b)]
    want = sum((x - y).pow(2).sum(1).mean((1, 2)) for x, y in zip(*n)) / 2
    torch.testing.assert_close(feature_distance(a, b), want)


def test_perceptual_gradient_reaches_the_embedding_head_through_the_vq_decoder(digits):
    teacher, _ = digits
    fn, _ = make_emb_loss("perceptual", teacher)
    s = build_student(teacher, seed=0)
    tokens, _ = _batch(teacher, B=2)
    noise = torch.randn(2, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 2])
    # λ_ce = 0: only the image loss can move the embedding head
    loss, parts = dd_loss(s, noise, tokens, t, t, codebook=s.codebook, step_offsets=s.step_offsets,
                          lambda_ce=0.0, lambda_emb=1.0, emb_loss=fn)
    loss.backward()
    assert (parts["emb"] > 0).all()
    head = s.backbone.final_layer_conti.linear
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in fn.net.parameters())          # frozen: no gradient kept
    assert all(p.grad is None for p in teacher.vq.parameters())


def test_perceptual_refuses_other_image_sizes_and_lpips_names_the_extra(tiny_teachers, monkeypatch):
    _, tiny = tiny_teachers("llamagen")                                # 8x8 images
    with pytest.raises(DDError, match=r"^--emb-loss perceptual .*8x8.*--emb-loss lpips \(pip install -e '\.\[lpips\]'\)"):
        DigitsPerceptualLoss(tiny)
    monkeypatch.setitem(sys.modules, "lpips", None)                  # import lpips fails
    with pytest.raises(click.ClickException) as e:
        make_emb_loss("lpips", tiny)
    assert "\n" not in e.value.message and "pip install -e '.[lpips]'" in e.value.message


@pytest.mark.parametrize("emb_loss", ["mse", "perceptual"])
def test_a_short_run_lowers_the_loss(digits_pairs, tmp_path, emb_loss):
    run = tmp_path / "run"
    args = TrainArgs(data=digits_pairs, out=str(run), emb_loss=emb_loss, batch_size=8, max_steps=36, log_every=4,
                     ckpt_every=100, num_workers=0, lr=3e-3, progress=False, device="cpu", ema_decay=0.9,
                     warmup_steps=4)
    lines = []
    train(args, log=lines.append)
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"{emb_loss}: loss {rec[0]['loss']:.4f} -> {rec[-1]['loss']:.4f}, emb {rec[0]['emb']:.4f} -> {rec[-1]['emb']:.4f}")
    assert rec[-1]["loss"] < 0.8 * rec[0]["loss"] and rec[-1]["emb"] < 0.9 * rec[0]["emb"]
    info = json.loads((run / "config.json").read_text())["train"]
    assert info["emb_loss"] == emb_loss and info["emb_loss_desc"].startswith(emb_loss)
    assert info["warmup_steps"] == 4 and "warm-up over 4 steps" in info["recipe"]
    assert any(f"embedding loss: {emb_loss}" in x for x in lines)


# ---- the optimizer recipe ------------------------------------------------------------------------
def test_warmup_then_constant_or_cosine():
    W, lr = 4, 2e-3
    assert [lr_at(s, lr, W) for s in range(W + 2)] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3])
    assert [lr_at(s, lr) for s in range(3)] == [lr] * 3                   # no warm-up: today's constant lr
    cos = [lr_at(s, lr, W, "cosine", 12) for s in range(12)]
    assert cos[:W + 1] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3])
    assert cos[W + 4] == pytest.approx(lr / 2) and all(a > b for a, b in zip(cos[W:], cos[W + 1:])) and cos[-1] > 0


def test_lr_per_256_and_epochs_resolve():
    a = resolve_recipe(LoopArgs(batch_size=32, lr_per_256=1e-4, epochs=2.5), num_items=1000)
    assert a.lr == pytest.approx(1e-4 * 32 / 256) and a.max_steps == round(2.5 * 31)       # 31 batches per epoch
    assert "per 256 x batch 32" in describe_recipe(a) and "(= 2.5 epochs)" in describe_recipe(a)
    b = resolve_recipe(LoopArgs(batch_size=32, lr=3e-3, max_steps=7), num_items=1000)
    assert (b.lr, b.max_steps) == (3e-3, 7)
    with pytest.raises(ValueError, match="--epochs"):
        resolve_recipe(LoopArgs(batch_size=64, epochs=1), num_items=10)


def test_cli_options_exclude_each_other(digits_pairs, tmp_path):
    from distilled_decoding.train import train_command
    for extra, msg in ((["--lr", "1e-3", "--lr-per-256", "1e-4"], "--lr and --lr-per-256"),
                       (["--max-steps", "5", "--epochs", "1"], "--max-steps and --epochs")):
        with pytest.raises(click.UsageError, match=msg):
            train_command.main(["--data", digits_pairs, "--out", str(tmp_path / "x")] + extra, standalone_mode=False)
    assert not (tmp_path / "x").exists()
