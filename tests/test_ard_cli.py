"""`dd ard` on the command line: build-dataset killed and resumed byte-identically, verify naming a
corrupt shard, info, sample (student and teacher baselines) writing a grid and an ADM .npz and refusing
to overwrite, and a tiny `dd ard demo`."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distilled_decoding.ard_cli import ard_group
from distilled_decoding.cli import main
from distilled_decoding.shard_store import shard_name
from distilled_decoding.teacher_spec import TeacherSpec
from distilled_decoding.trajectories import build_trajectories, read_manifest, trajectory_noise
from dd_process import kill_after, tree_digest

SPEC = TeacherSpec("digits-dit")
BUILD = ["--teacher", "digits-dit", "--num-steps", 2, "--seed", 3, "--device", "cpu", "--no-progress"]


def shard_bytes(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d)) if f.startswith("shard-")}


def dd(*args):
    """`dd ARGS` in-process -> click Result (exit_code, stdout, stderr): the real CLI without a new process."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def refused(*args, names: str, watch=()):
    """`dd ARGS` fails with one stderr line naming `names` and changes nothing under `watch`
    (the bad-input contract of dd_process.assert_refused, in-process)."""
    before = [tree_digest(w) for w in watch]
    r = dd(*args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and names in lines[0], (r.exit_code, r.stderr)
    assert [tree_digest(w) for w in watch] == before, "a refused command changed files"


@pytest.fixture(scope="module")
def teacher():
    return SPEC.load("cpu", diffusion=True)


@pytest.fixture(scope="module")
def traj(teacher, tmp_path_factory):
    """A small S = 2 trajectory set (DDIM-6) for the sampling tests."""
    out = tmp_path_factory.mktemp("traj") / "t"
    build_trajectories(str(out), teacher, SPEC, num_samples=16, steps=6, num_steps=2, seed=3, shard_size=8,
                       batch_size=8, show_progress=False, log=lambda s: None)
    return out


def test_build_dataset_kill_resume_is_byte_identical_and_verify_names_a_corrupt_shard(teacher, tmp_path):
    ref = tmp_path / "ref"
    m_ref = build_trajectories(str(ref), teacher, SPEC, num_samples=24, num_steps=2, seed=3, shard_size=2,
                               batch_size=2, show_progress=False, log=lambda s: None)
    out = tmp_path / "out"
    args = ["ard", "build-dataset", "--out", out, "--num-samples", 24, "--shard-size", 2, "--batch-size", 2, *BUILD]
    proc = kill_after(out / ".progress" / "shard-00000.json", *args)     # written right after shard 0 itself
    done = os.listdir(out / ".progress")
    assert 1 <= len(done) < 12, f"the kill did not land mid-run ({len(done)} shards): {proc.stderr.read()}"
    assert not read_manifest(str(out))["complete"]
    r = dd(*args)
    assert r.exit_code == 0, r.stderr
    assert f"{len(done)} done" in r.stdout
    assert shard_bytes(out) == shard_bytes(ref)
    m = read_manifest(str(out))
    assert m["complete"] and m["shards"] == m_ref["shards"] and m["settings"] == m_ref["settings"]
    manifest = (out / "manifest.json").read_bytes()
    r = dd(*args)                                     # complete: nothing to do, nothing changes
    assert r.exit_code == 0 and "nothing to build" in r.stdout
    assert shard_bytes(out) == shard_bytes(ref) and (out / "manifest.json").read_bytes() == manifest
    refused("ard", "build-dataset", "--out", out, "--num-samples", 24, "--shard-size", 2, "--batch-size", 2,
            "--history", "x0", *BUILD, names="history", watch=[out])                         # never overwritten

    r = dd("ard", "info", out, "--json")
    info = json.loads(r.stdout)
    assert info["complete"] and info["num_samples"] == 24 and info["timesteps"] == [999, 500]
    p = out / shard_name(5)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x40
    p.write_bytes(bytes(data))
    r = dd("ard", "verify", out)
    assert r.exit_code == 1 and "shard-00005.safetensors is corrupt" in r.stderr, r.stderr


def test_sample_writes_grid_and_npz_and_refuses_to_overwrite(teacher, traj, tmp_path):
    out = tmp_path / "ddim"
    r = dd("ard", "sample", "--baseline", "ddim-2", "--data", traj, "--out", out, "--num-samples", 6,
           "--batch-size", 4, "--shard-size", 4, "--seed", 9, "--no-progress", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (out / "grid.png").stat().st_size > 0
    with np.load(out / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8 and labels.shape == (6,)
    # the teacher's DDIM-2 from the noise of (seed, index): the same noise as every other sampler
    noise = trajectory_noise(9, range(6), teacher.latent_shape)
    x = teacher.sample(torch.as_tensor(labels), steps=2, cfg_scale=1.5, noise=noise)
    want = (teacher.decode(x).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
    assert dd("ard", "sample", "--out", out, "--verify").exit_code == 0
    refused("ard", "sample", "--baseline", "ddim-3", "--data", traj, "--out", out, "--num-samples", 6,
            "--batch-size", 4, "--shard-size", 4, "--seed", 9, "--device", "cpu", names="steps", watch=[out])
    refused("ard", "sample", "--baseline", "ddim-x", "--data", traj, "--out", tmp_path / "x",
            names="--baseline 'ddim-x'")


def test_sample_with_a_trained_student(teacher, traj, tmp_path):
    from distilled_decoding.ard_student import ard_sample
    from distilled_decoding.ard_train import ARDTrainArgs, load_ard_run, train_ard
    run = tmp_path / "run"
    train_ard(ARDTrainArgs(data=str(traj), out=str(run), max_steps=2, batch_size=4, lr=1e-3, ckpt_every=2,
                           num_workers=0, device="cpu", progress=False), log=lambda s: None)
    out = tmp_path / "smp"
    r = dd("ard", "sample", "--run", run, "--out", out, "--num-samples", 5, "--batch-size", 2, "--seed", 4,
           "--labels", "7,1", "--no-progress", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "ARD 2-step" in r.output and (out / "grid.png").exists()
    with np.load(out / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert labels.tolist() == [7, 1, 7, 1, 7]
    student = load_ard_run(str(run))
    x = ard_sample(student, trajectory_noise(4, range(5), teacher.latent_shape), torch.as_tensor(labels))[:, -1]
    want = (teacher.decode(x).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
    meta = json.loads((out / "sample.json").read_text())
    assert meta["sampler"] == "ard" and meta["ard"]["num_steps"] == 2 and meta["student_sha256"]


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_and_prints_the_table(tmp_path):
    from distilled_decoding import quality
    from distilled_decoding.ard_demo import SIZES, run_ard_demo
    info = run_ard_demo(str(tmp_path), SIZES["tiny"], dict(ard_group.commands), log=lambda s: None)
    keys = [r["key"] for r in info["rows"]]
    assert keys == ["teacher", "floor", "ddimS", "kd", "m1", "ard"]
    table = (tmp_path / "table.md").read_text()
    printed = quality.parse_table(table)
    assert len(printed) == len(keys)
    floor = printed["teacher DDIM-25, independent draws (floor)"]
    assert floor["g ↓"] == "0.000" and floor["MSE to teacher endpoint ↓"] == "0 (itself)"
    assert printed["KD 1-step (S = 1)"]["g ↓"] == "1.000"
    gf = {r["key"]: r["gflops"] for r in info["rows"]}
    assert gf["ard"] > gf["m1"] > gf["kd"] > 0 and gf["floor"] == pytest.approx(25 / 4 * gf["ddimS"])
    assert all(r["mean"]["s_per_image"] > 0 for r in info["rows"])
    assert os.path.getsize(info["compare"]) > 0


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "t"
    for args, names in [(["--teacher", "digits-var"], "not a diffusion teacher"),
                        (["--teacher", "dit", "--config", "DiT-S/2"], "--checkpoint"),
                        (["--teacher", "digits-dit", "--kept", "25,9"], "strictly down from 25"),
                        (["--teacher", "digits-dit", "--kept", "25,9,0", "--num-steps", "4"], "--num-steps"),
                        (["--teacher", "digits-dit", "--kept", "public", "--steps", "20"], "25-step run"),
                        (["--teacher", "digits-dit", "--cfg-channels", "0"], "--cfg-channels")]:
        refused("ard", "build-dataset", "--out", out, "--num-samples", 2, *args, names=names)
        assert not out.exists()
