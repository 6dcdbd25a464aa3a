"""DD2 on the DD backbones (csd_nets.py, csd_train.py): the guidance features of token i see only earlier
AR steps, the velocity generator is x = ε − head, the teacher's teacher-forced probabilities equal its
stepping loop, and `dd csd train` trains, resumes bit for bit, loads strictly and refuses bad options
in one line."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from distilled_decoding.cli import DDGroup
from distilled_decoding.csd_nets import GuidanceNet, generate, shift_steps
from distilled_decoding.csd_train import CSDTrainArgs, csd_group, train_csd
from distilled_decoding.samplers import dd_sample
from distilled_decoding.student import build_student
from distilled_decoding.student_run import load_run
from teachers.base import SamplingConfig, Teacher
from teachers.checkpoint import load_safetensors


def test_guidance_features_of_a_token_see_only_earlier_steps(tiny_teacher):
    _, teacher = tiny_teacher
    torch.manual_seed(0)
    guide = GuidanceNet(build_student(teacher, (1,), 0).backbone, teacher.step_sizes, teacher.embed_dim)
    B, n, C = 2, teacher.num_tokens, teacher.embed_dim
    x0, labels = torch.randn(B, n, C), torch.tensor([1, 2])
    f = guide.features(x0, labels)
    offs = teacher.step_offsets
    for s in range(teacher.num_steps):
        x1 = x0.clone()
        x1[:, offs[s]:offs[s + 1]] += 1.0
        d = (guide.features(x1, labels) - f).abs().amax((0, 2))          # [n]
        assert d[:offs[s + 1]].max() < 1e-5, (s, d)                      # this step and earlier: untouched
        if s + 1 < teacher.num_steps:
            assert d[offs[s + 1]:offs[s + 2]].min() > 1e-6, (s, d)        # the next step reads it
    # the shift: step s's slots hold step s-1's tokens (upsampled), step 0's zeros
    sh = shift_steps(x0, teacher.step_sizes)
    assert torch.equal(sh[:, :offs[1]], torch.zeros_like(sh[:, :offs[1]]))
    assert torch.equal(sh[:, offs[1]:offs[1] + 1], x0[:, :1])


def test_velocity_generator_is_noise_minus_the_head(tiny_teacher):
    _, teacher = tiny_teacher
    emb = build_student(teacher, (1,), 0, seed=3)
    vel = build_student(teacher, (1,), 0, seed=3, output="velocity")
    z, labels = torch.randn(3, teacher.num_tokens, teacher.embed_dim), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.allclose(generate(vel, z, labels), z - generate(emb, z, labels), atol=1e-6)
        x, _ = dd_sample(vel.eval(), z, labels, (1,))                   # split 0: the embedding output everywhere
        assert torch.allclose(x, generate(vel, z, labels), atol=1e-6)


@pytest.mark.parametrize("tiny_teacher", ["llamagen"], indirect=True)
def test_teacher_forced_probs_equal_the_stepping_loop(tiny_teacher):
    _, teacher = tiny_teacher
    labels = torch.tensor([0, 3, 7])
    tokens = torch.randint(0, teacher.vocab_size, (3, teacher.num_tokens), generator=torch.Generator().manual_seed(0))
    for sampling in (SamplingConfig(cfg_scale=2.0), SamplingConfig(cfg_scale=1.0, temperature=0.7, top_k=5)):
        fast = teacher.sequence_probs(labels, tokens, sampling)
        slow = Teacher.sequence_probs(teacher, labels, tokens, sampling)
        assert torch.allclose(fast, slow, atol=1e-5)


def _args(spec, out, **kw) -> CSDTrainArgs:
    base = dict(out=str(out), teacher=spec.to_dict(), batch_size=4, lr=1e-3, guidance_lr=3e-3, guidance_steps=2,
                guidance_warmup=30, head_width=32, max_steps=6, ckpt_every=3, log_every=1, num_workers=0,
                ema_decay=0.5, progress=False, device="cpu", output="embedding")
    return CSDTrainArgs(**{**base, **kw})


def _metrics(out) -> dict:
    with open(out / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.parametrize("tiny_teacher", ["llamagen"], indirect=True)
def test_csd_train_learns_resumes_bit_for_bit_and_loads_strictly(tiny_teacher, tmp_path):
    spec, teacher = tiny_teacher
    whole = tmp_path / "whole"
    train_csd(_args(spec, whole), log=lambda s: None)
    rec = _metrics(whole)
    assert sorted(rec) == list(range(1, 7)) and {"guidance", "gap"} <= set(rec[1])
    # the guidance network fits the generator: its flow-matching loss on fixed draws of the final generator's
    # samples is below the fresh network's (head at zero: v = 0)
    from distilled_decoding.csd import diffuse, guidance_loss
    from distilled_decoding.run_dir import latest_checkpoint
    fresh = GuidanceNet(build_student(teacher, (1,), 0, seed=1).backbone, teacher.step_sizes, teacher.embed_dim, 32)
    trained = GuidanceNet(build_student(teacher, (1,), 0, seed=1).backbone, teacher.step_sizes, teacher.embed_dim, 32)
    trained.load_state_dict(load_safetensors(f"{latest_checkpoint(str(whole))}/guidance.safetensors"), strict=True)
    gen, _ = load_run(str(whole), ema=False)
    g = torch.Generator().manual_seed(5)
    z, eps = (torch.randn(64, teacher.num_tokens, teacher.embed_dim, generator=g) for _ in range(2))
    tau, labels = torch.rand(64, teacher.num_tokens, generator=g) * 0.9 + 0.05, torch.arange(64) % 10
    with torch.no_grad():
        x0 = generate(gen, z, labels)
        fits = [guidance_loss(net(diffuse(x0, tau, eps), tau, x0, labels), x0, eps).item() for net in (fresh, trained)]
    assert fits[1] < 0.9 * fits[0], fits
    start = build_student(teacher, (1,), 0, seed=0).backbone.state_dict()
    raw = load_safetensors(whole / "student_raw.safetensors")
    assert any(not torch.equal(raw[k], v) for k, v in start.items())    # the generator moved

    part = tmp_path / "part"
    train_csd(_args(spec, part, max_steps=3), log=lambda s: None)
    logs = []
    train_csd(_args(spec, part, resume=True), log=logs.append)
    assert any("resumed from" in line for line in logs)
    again = _metrics(part)
    for step in (4, 5, 6):
        assert {k: again[step][k] for k in ("loss", "guidance", "gap")} == \
            {k: rec[step][k] for k in ("loss", "guidance", "gap")}, step
    a, b = load_safetensors(whole / "student.safetensors"), load_safetensors(part / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="guidance_steps"):
        train_csd(_args(spec, part, resume=True, max_steps=9, guidance_steps=3), log=lambda s: None)
    # a run made before the per-item noise (its state.json lacks noise_draw) is refused, not continued on other noise
    from distilled_decoding.run_dir import latest_checkpoint
    state_file = f"{latest_checkpoint(str(part))}/state.json"
    state = json.loads(open(state_file).read())
    del state["train"]["noise_draw"]
    with open(state_file, "w") as f:
        json.dump(state, f)
    with pytest.raises(ValueError, match="noise_draw: 'batch' -> 'item'"):
        train_csd(_args(spec, part, resume=True, max_steps=9), log=lambda s: None)

    # the run directory is a DD student run: `dd sample` loads it strictly (EMA weights, split 0)
    gen, info = load_run(str(whole))
    assert info["method"] == "csd" and gen.config.output == "embedding" and gen.config.split == 0
    assert all(torch.equal(v, a[k]) for k, v in gen.backbone.state_dict().items())
    from safetensors.torch import save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "codebook.safetensors"):
        (bad / f).write_bytes((whole / f).read_bytes())
    save_file({k: v for k, v in list(a.items())[1:]}, str(bad / "student.safetensors"))
    with pytest.raises(Exception, match="missing"):
        load_run(str(bad))


@pytest.mark.parametrize("tiny_teacher", ["llamagen"], indirect=True)
def test_csd_cli_refusals_are_one_line(tiny_teacher, tmp_path):
    spec, _ = tiny_teacher
    group = DDGroup("dd")
    group.add_command(csd_group)
    runner = CliRunner()
    base = ["csd", "train", "--teacher", "llamagen", "--config", json.dumps(spec.config), "--checkpoint",
            spec.checkpoint, "--tokenizer-config", json.dumps(spec.tokenizer_config), "--tokenizer-checkpoint",
            spec.tokenizer_checkpoint, "--batch-size", "2", "--max-steps", "1", "--num-workers", "0",
            "--no-progress", "--device", "cpu"]
    other = tmp_path / "other"
    train_csd(_args(spec, other, max_steps=1), log=lambda s: None)
    for extra, words in [(["--tau-min", "0.9", "--tau-max", "0.5"], "tau_min < tau_max"),
                         (["--init-run", str(other), "--output", "velocity"], "is not a generator"),
                         (["--guidance-steps", "0"], "--guidance-steps")]:
        r = runner.invoke(group, base + ["--out", str(tmp_path / "x")] + extra)
        assert r.exit_code in (1, 2) and words in r.output, r.output
        assert r.output.startswith("dd csd train: error:") and len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize("tiny_teacher", ["llamagen"], indirect=True)
def test_two_rank_torchrun_matches_one_rank(tiny_teacher, tmp_path):
    """`dd csd train` on 2 torchrun ranks (gloo) logs the losses of one process and ends at its weights:
    each item's noise is its own, both networks' gradients are averaged over the ranks (the guidance
    network's in its warm-up and K updates too)."""
    from dd_process import run_dd
    spec, _ = tiny_teacher
    base = ["csd", "train", "--teacher", "llamagen", "--config", json.dumps(spec.config), "--checkpoint",
            spec.checkpoint, "--tokenizer-config", json.dumps(spec.tokenizer_config), "--tokenizer-checkpoint",
            spec.tokenizer_checkpoint, "--batch-size", 4, "--lr", "1e-3", "--guidance-lr", "3e-3",
            "--guidance-steps", 2, "--guidance-warmup", 3, "--head-width", 32, "--max-steps", 3, "--log-every", 1,
            "--num-workers", 0, "--ema-decay", "0.5", "--output", "embedding", "--no-progress", "--device", "cpu"]
    teacher = spec.load("cpu")
    start = {"model.safetensors": build_student(teacher, (1,), 0, seed=0).backbone.state_dict(),
             "guidance.safetensors": GuidanceNet(build_student(teacher, (1,), 0, seed=1).backbone, teacher.step_sizes,
                                                 teacher.embed_dim, 32).state_dict()}
    for name, procs in (("one", 0), ("two", 2)):
        proc = run_dd(*base, "--out", tmp_path / name, torchrun=procs)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch 4 on 2 rank(s)" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "two" / "config.json").read_text())["train"]["world_size"] == 2
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        for key in ("loss", "guidance", "gap", "grad_norm"):
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-4), (step, key)
    from distilled_decoding.run_dir import latest_checkpoint
    for stem in ("model.safetensors", "guidance.safetensors"):
        a, b = (load_safetensors(f"{latest_checkpoint(str(tmp_path / n))}/{stem}") for n in ("one", "two"))
        assert sorted(a) == sorted(b)
        for k in a:
            # Adam divides each entry's step by its own gradient scale: where a gradient is ~0 (the guidance
            # lr is 3e-3) the ranks' other float rounding moves a weight by up to ~1e-5 of a different sign
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=3e-5, msg=f"{stem}: {k}")
        moved = max((a[k] - v).abs().max().item() for k, v in start[stem].items())
        assert moved > 100 * 3e-5, (stem, moved)       # far more than the tolerance: the ranks trained
