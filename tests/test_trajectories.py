"""ARD's trajectory data (distilled_decoding/trajectories.py): the kept sets, the states against the
teacher's own DDIM callback, nested subsampling, and a corrupt shard named by verify and the loader."""
import pytest
import torch

from distilled_decoding.shard_store import StoreError, shard_name
from distilled_decoding.teacher_spec import TeacherSpec
from distilled_decoding.trajectories import (TrajectoryDataset, build_trajectories, kept_indices, kept_timesteps,
                                             parse_kept, read_manifest, teacher_trajectories, trajectory_noise,
                                             verify_trajectories)

SPEC = TeacherSpec("digits-dit")
QUIET = dict(show_progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def teacher():
    return SPEC.load("cpu", diffusion=True)


def test_kept_sets_of_both_readings_and_their_nesting():
    # the paper: states nearest T*s/S (T = 1000) on the DDIM-25 grid; their time labels
    assert kept_indices(25, 4, "paper") == (25, 19, 13, 7, 0)
    assert kept_timesteps(25, (25, 19, 13, 7, 0)) == (999, 749, 500, 250)
    # the public code: indices 25, 15, 10, 5, 0 -> states at 583, 375, 166
    assert kept_indices(25, 4, "public") == (25, 15, 10, 5, 0)
    assert kept_timesteps(25, (25, 15, 10, 5, 0)) == (999, 583, 375, 166)
    for rule in ("paper", "public"):
        four = set(kept_indices(25, 4, rule))
        assert set(kept_indices(25, 2, rule)) <= four and kept_indices(25, 1, rule) == (25, 0)
    assert parse_kept("25,15,10,5,0") == (25, 15, 10, 5, 0) and parse_kept("public") == "public"
    for bad, msg in [((25, 15, 15, 0), "strictly down"), ((24, 10, 0), "strictly down from 25")]:
        with pytest.raises(ValueError, match=msg):
            kept_indices(25, len(bad) - 1, bad)
    with pytest.raises(ValueError, match="too few DDIM steps"):
        kept_indices(3, 4, "paper")
    with pytest.raises(ValueError, match="25-step run"):
        kept_indices(20, 4, "public")


@pytest.mark.parametrize("history", ["state", "x0"])
def test_kept_states_are_the_teachers_own_ddim_states(teacher, history):
    labels = torch.tensor([3, 7, 0])
    noise = trajectory_noise(5, [0, 1, 2], teacher.latent_shape)
    seen = {}

    def record(i, t, x, x0):
        seen[i] = (t, x.clone(), x0.clone())

    final = teacher.sample(labels, steps=25, cfg_scale=1.5, noise=noise, callback=record)
    kept = (25, 15, 10, 5, 0)
    got = teacher_trajectories(teacher, noise, labels, steps=25, cfg_scale=1.5, cfg_channels="default",
                               kept=kept, history=history)
    assert got.shape == (3, 5, 1, 16, 16)
    assert torch.equal(got[:, 0], noise) and torch.equal(got[:, 4], final)
    for k, j in enumerate(kept[1:-1], start=1):
        if history == "state":          # the state after 25 - j steps, where the teacher runs at ts_asc[j - 1]
            t, x, _ = seen[25 - j]
            assert torch.equal(got[:, k], x) and t == kept_timesteps(25, kept)[k]
        else:                           # the x0 of the step landing on it, computed at t = 624, 416, 208
            t, _, x0 = seen[24 - j]
            assert torch.equal(got[:, k], x0) and t == {15: 624, 10: 416, 5: 208}[j]


def test_dataset_items_subsampling_and_manifest(teacher, tmp_path):
    m = build_trajectories(str(tmp_path), teacher, SPEC, num_samples=7, steps=25, num_steps=4, kept="public",
                           seed=2, shard_size=3, batch_size=2, **QUIET)
    st = m["settings"]
    assert st["kept"] == [25, 15, 10, 5, 0] and st["timesteps"] == [999, 583, 375, 166]
    assert st["steps"] == 25 and st["cfg_scale"] == 1.5 and st["history"] == "state" and st["kept_rule"] == "public"
    assert st["teacher"]["zoo"] == "digits-dit" and m["teacher_spec"]["teacher"] == "digits-dit"
    ds = TrajectoryDataset(tmp_path)
    assert len(ds) == 7 and ds.timesteps == (999, 583, 375, 166) and ds.teacher_spec == SPEC
    item = ds[4]
    assert item["states"].shape == (5, 1, 16, 16) and item["states"].dtype == torch.float32
    assert item["labels"].dtype == torch.int64 and item["labels"].dim() == 0
    assert torch.equal(item["states"][0], trajectory_noise(2, [4], teacher.latent_shape)[0])
    ref = teacher_trajectories(teacher, item["states"][None, 0], item["labels"][None], steps=25, cfg_scale=1.5,
                               cfg_channels=None, kept=(25, 15, 10, 5, 0))[0]
    assert torch.allclose(item["states"], ref, atol=1e-5)
    two = TrajectoryDataset(tmp_path, num_steps=2)           # the public S = 2 set: 25, 10, 0
    assert two.kept == (25, 10, 0) and two.timesteps == (999, 375)
    assert torch.equal(two[4]["states"], item["states"][[0, 2, 4]])
    assert TrajectoryDataset(tmp_path, num_steps=1)[4]["states"].shape[0] == 2
    with pytest.raises(StoreError, match="num_steps 3: --kept public"):     # the public code has no S = 3
        TrajectoryDataset(tmp_path, num_steps=3)


def test_paper_sets_nest_and_explicit_lists_refuse_subsampling(teacher, tmp_path):
    build_trajectories(str(tmp_path / "p"), teacher, SPEC, num_samples=2, steps=25, num_steps=4, **QUIET)
    ds = TrajectoryDataset(tmp_path / "p")
    assert ds.kept == kept_indices(25, 4, "paper")
    two = TrajectoryDataset(tmp_path / "p", num_steps=2)
    assert set(two.kept) <= set(ds.kept) and two.kept == kept_indices(25, 2, "paper")
    with pytest.raises(StoreError, match="do not nest") as e:    # paper S = 3 (thirds) is not in S = 4 (quarters)
        TrajectoryDataset(tmp_path / "p", num_steps=3)
    assert "\n" not in str(e.value)
    build_trajectories(str(tmp_path / "e"), teacher, SPEC, num_samples=2, steps=8, num_steps=2, kept=(8, 3, 0),
                       history="x0", **QUIET)
    assert read_manifest(str(tmp_path / "e"))["settings"]["kept_rule"] == "explicit"
    with pytest.raises(StoreError, match="explicit list"):
        TrajectoryDataset(tmp_path / "e", num_steps=1)


def test_a_corrupt_shard_is_named(teacher, tmp_path):
    build_trajectories(str(tmp_path), teacher, SPEC, num_samples=5, steps=4, num_steps=2, kept=(4, 2, 0),
                       shard_size=2, batch_size=2, **QUIET)
    assert verify_trajectories(str(tmp_path), recompute=2, log=lambda s: None) == []
    p = tmp_path / shard_name(1)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01                                         # one bit of one stored state
    p.write_bytes(bytes(data))
    problems = verify_trajectories(str(tmp_path), log=lambda s: None)
    assert len(problems) == 1 and "shard-00001.safetensors" in problems[0] and "sha256" in problems[0]
    with pytest.raises(StoreError, match="shard-00001.safetensors"):
        TrajectoryDataset(tmp_path, verify=True)
    p.write_bytes(bytes(data[:-10]))
    with pytest.raises(StoreError, match="shard-00001.safetensors.*truncated"):
        TrajectoryDataset(tmp_path)
