"""dd ard train on a tiny DiT teacher's trajectories: the loss falls, a resume reproduces the next
losses of an uninterrupted run exactly, load_ard_run gives the EMA student, nested --steps, refusals."""
from __future__ import annotations

import json
import pytest
import torch
from click.testing import CliRunner

from distilled_decoding.ard_student import ARDStudent, ard_sample
from distilled_decoding.ard_train import (ARDTrainArgs, ard_loss, default_lower_layers, load_ard_run,
                                          read_ard_run_config, train, train_ard)
from distilled_decoding.cli import DDGroup
from distilled_decoding.run_dir import latest_checkpoint
from teachers.checkpoint import load_safetensors

DEPTH = 4          # digits-dit's


@pytest.fixture(scope="module")
def data(ard_trajectories):
    return ard_trajectories


def args(data, out, **kw) -> ARDTrainArgs:
    base = dict(data=str(data / "traj"), out=str(out), batch_size=8, lr=1e-3, max_steps=6, ckpt_every=3,
                log_every=1, num_workers=0, ema_decay=0.9, progress=False, threads=1, device="cpu")
    return ARDTrainArgs(**{**base, **kw})


def losses(out) -> dict:
    with open(out / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_default_lower_layers_scale_the_papers_6_of_28():
    assert [default_lower_layers(d) for d in (28, 24, 12, 4, 1)] == [6, 5, 3, 1, 1]


def test_ard_loss_is_the_sum_over_steps_of_the_mean_squared_error():
    states, labels = torch.randn(3, 4, 2, 2, 2), torch.zeros(3, dtype=torch.long)
    shift = torch.tensor([0.0, 1.0, 2.0])[None, :, None, None, None]
    loss, parts = ard_loss(lambda x, y: x + shift, states, labels)
    expected = sum(((states[:, k] + k - states[:, k + 1]) ** 2).mean() for k in range(3))
    assert torch.allclose(loss, expected) and sorted(parts) == ["step0", "step1", "step2"]
    assert parts["step1"].shape == (3,)


def test_training_lowers_the_loss_and_resume_reproduces_the_next_losses(data, tmp_path):
    whole = tmp_path / "whole"
    train_ard(args(data, whole), log=lambda s: None)
    rec = losses(whole)
    assert sorted(rec) == list(range(1, 7))
    assert rec[6]["loss"] < 0.8 * rec[1]["loss"]
    assert set(rec[1]) >= {"step0", "step1", "step2", "step3"}

    part = tmp_path / "part"
    train_ard(args(data, part, max_steps=3), log=lambda s: None)
    logs = []
    train_ard(args(data, part, resume=True), log=logs.append)     # N, mask, S taken from the run
    assert any("resumed from" in line for line in logs)
    again = losses(part)
    for step in (4, 5, 6):
        assert again[step]["loss"] == rec[step]["loss"], step
        assert again[step]["step3"] == rec[step]["step3"], step
    a, b = load_safetensors(whole / "student.safetensors"), load_safetensors(part / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="mask"):
        train_ard(args(data, part, resume=True, max_steps=9, mask="M2"), log=lambda s: None)


def test_load_ard_run_gives_the_ema_student(data, tmp_path):
    out = tmp_path / "run"
    train_ard(args(data, out, max_steps=3, num_steps=2, mask="M3"), log=lambda s: None)
    info = read_ard_run_config(str(out))
    assert info["student"]["num_steps"] == 2 and info["student"]["mask"] == "M3"
    assert info["student"]["lower_layers"] == default_lower_layers(DEPTH)
    assert info["student"]["timesteps"] == [999, 571]                 # nested: DDIM indices 8, 4 of 8, 4, 0
    student = load_ard_run(str(out))
    assert isinstance(student, ARDStudent) and not student.training
    ema = load_safetensors(f"{latest_checkpoint(str(out))}/ema.safetensors")
    raw = load_ard_run(str(out), ema=False).state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in student.state_dict().items())
    assert not all(torch.equal(v, raw[k]) for k, v in student.state_dict().items())
    traj = ard_sample(student, torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    assert traj.shape == (2, 3, 1, 16, 16) and torch.isfinite(traj).all()


def test_cli_refusals_are_one_line(data, tmp_path):
    """Under the `dd` group's error handling (DDGroup), as `dd ard train` runs."""
    group = DDGroup("dd")
    group.add_command(train)
    runner = CliRunner()
    base = ["train", "--data", str(data / "traj"), "--batch-size", "8", "--max-steps", "1", "--num-workers", "0",
            "--no-progress", "--threads", "1", "--device", "cpu"]
    for extra, words in [(["--steps", "5"], "num_steps 5"), (["--lower-layers", "5"], "lower_layers"),
                         (["--teacher", "no-such-teacher"], "--teacher no-such-teacher"),
                         (["--teacher", str(data / "traj" / "manifest.json")], "has its own weights")]:
        r = runner.invoke(group, base + ["--out", str(tmp_path / extra[1].replace("/", "_"))] + extra)
        assert r.exit_code == 1 and words in r.output, r.output
        assert r.output.startswith("dd train: error:") and len(r.output.strip().splitlines()) == 1, r.output


def test_two_rank_torchrun_matches_one_rank(data, tmp_path, capfd):
    """`dd ard train` under torchrun (gloo, 2 ranks), launched the way `dd ard demo --procs 2` launches it,
    logs the losses and gradient norms of a 1-rank run on the same global batches, to the same weights."""
    import dataclasses

    from distilled_decoding.ard_cli import ard_group
    from distilled_decoding.ard_demo import SIZES, train_student
    size = dataclasses.replace(SIZES["tiny"], batch_size=8)
    verbs, printed = dict(ard_group.commands), []
    for name, procs in (("one", 1), ("two", 2)):
        train_student(verbs, str(data / "traj"), str(tmp_path / name), ["--mask", "M4"], 3, size, 0, "cpu",
                      printed.append, procs=procs)
    out = capfd.readouterr()
    assert printed[0].strip().startswith("$ dd ard train ")
    assert printed[1].strip().startswith("$ torchrun --standalone --nproc_per_node=2 -m distilled_decoding ard train ")
    assert "batch 8 = 2 rank(s) x 1 accum x 4" in out.out + out.err
    assert read_ard_run_config(str(tmp_path / "two"))["train"]["world_size"] == 2
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) >= 2
    for step in one:
        assert one[step]["loss"] == pytest.approx(two[step]["loss"], rel=1e-5)
        assert one[step]["grad_norm"] == pytest.approx(two[step]["grad_norm"], rel=1e-4)
    a, b = load_ard_run(str(tmp_path / "one"), ema=False), load_ard_run(str(tmp_path / "two"), ema=False)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if k.endswith("attn.qkv.bias"):
            # the key bias shifts every score of a query alike, so its true gradient is 0: Adam turns the
            # ranks' different float rounding of that 0 into steps of up to lr each: bounded, not equal
            D = x.shape[0] // 3
            torch.testing.assert_close(x[D:2 * D], y[D:2 * D], rtol=0, atol=3 * size.lr, msg=k)
            x, y = torch.cat([x[:D], x[2 * D:]]), torch.cat([y[:D], y[2 * D:]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=k)


def test_a_failing_ard_verb_on_ranks_is_one_line(data, tmp_path):
    import click

    from distilled_decoding.ard_cli import ard_group
    from distilled_decoding.ard_demo import SIZES, train_student
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(click.ClickException) as e:
        train_student(dict(ard_group.commands), str(data / "traj"), str(tmp_path / "taken"), [], 1, SIZES["tiny"], 0,
                      "cpu", lambda s: None, procs=2)
    assert e.value.message.startswith("dd ard train on 2 local ranks exited with status ") and "\n" not in e.value.message
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"
