"""`dd sample` and `distilled_decoding.sampling`: DD 1/2-step, teacher-mixed, baselines, outputs.

Tiny random teachers of both families (weights in checkpoint files, so the CLI loads exactly the
teacher used in-process) and a freshly built, untrained student saved as a run directory. Nothing
here checks image quality: only shapes, determinism, batch independence and the algorithms' exact
identities (empty --regen range = 2-step, skip-0 = teacher sampling, onestep = data marginals).
"""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from distilled_decoding import samplers as S
from distilled_decoding.images import to_uint8
from distilled_decoding.sampling import default_regen, parse_regen
from distilled_decoding.cli import main
from distilled_decoding.dataset_build import build_dataset
from distilled_decoding.seeding import sample_generators, sample_labels, sample_noise
from distilled_decoding.flowmap import FlowMapConfig
from distilled_decoding.student import build_student
from distilled_decoding.student_run import save_run
from distilled_decoding.teacher_spec import resolve_sampling
from dd_process import kill_after, run_dd

FM = FlowMapConfig(nfe=4)


class Tiny:
    def __init__(self, family, spec, teacher, student, run):
        self.family, self.spec, self.teacher, self.student, self.run = family, spec, teacher, student, run
        ts = student.config.timesteps
        self.b = ts[-1]
        self.regen = (max(2, self.b - 1), self.b)      # a non-empty range: LlamaGen 5:6, VAR 2:3


@pytest.fixture(scope="module")
def tiny(tiny_teacher, tmp_path_factory):
    """Per family (see `tiny_teacher`): the saved tiny teacher, an untrained student and its run dir."""
    spec, teacher = tiny_teacher
    family = teacher.family
    d = tmp_path_factory.mktemp(f"sample-{family}")
    student = build_student(teacher).eval()
    run = d / "run"
    save_run(str(run), student, None, student.config, {"teacher": spec.to_dict()})
    return Tiny(family, spec, teacher, student, str(run))


def inputs(t, idx, seed=0):
    return (sample_noise(seed, idx, t.teacher.num_tokens, t.teacher.embed_dim),
            sample_labels(seed, idx, t.teacher.num_classes, True))


def sample(*args):
    r = CliRunner().invoke(main, ["sample", "--no-progress", *map(str, args)])
    return r


# ---- Algorithm 3 -------------------------------------------------------------------------------------
def test_dd_sample_shapes_determinism_and_batch_independence(tiny):
    st, te = tiny.student, tiny.teacher
    noise, labels = inputs(tiny, range(5))
    ts = st.config.timesteps
    for steps in (ts[:1], ts[:2]):
        x, idx = S.dd_sample(st, noise, labels, steps)
        assert x.shape == noise.shape and x.dtype == torch.float32
        assert idx.shape == (5, te.num_tokens) and idx.dtype == torch.long
        assert int(idx.min()) >= 0 and int(idx.max()) < te.vocab_size
        x2, idx2 = S.dd_sample(st, noise, labels, steps)
        assert torch.equal(x, x2) and torch.equal(idx, idx2)
        parts = [S.dd_sample(st, noise[a:b], labels[a:b], steps) for a, b in ((0, 2), (2, 5))]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), idx)
    # 2-step: the first t2-1 steps of the input of step 2 are the step-1 output; a different seed differs
    x1, _ = S.dd_sample(st, noise, labels, ts[:1])
    xs, _ = S.dd_sample(st, noise, labels, ts[:2])
    m = st.step_offsets[ts[1] - 1]
    assert torch.equal(xs[:, :m], x1[:, :m])
    other, _ = inputs(tiny, range(5), seed=1)
    assert not torch.equal(S.dd_sample(st, other, labels, ts[:1])[0], x1)
    # snap: every position is a codebook row
    xs, idx = S.dd_sample(st, noise, labels, ts[:1], snap=True)
    assert torch.equal(xs, st.codebook[idx])


# ---- Algorithm 4 -------------------------------------------------------------------------------------
def test_regen_empty_range_equals_two_step(tiny):
    st, te = tiny.student, tiny.teacher
    noise, labels = inputs(tiny, range(4))
    x2, i2 = S.dd_sample(st, noise, labels, st.config.timesteps[:2])
    xr, ir = S.regen_sample(st, te, noise, labels, (tiny.b, tiny.b), resolve_sampling(te), None)
    assert torch.equal(xr, x2) and torch.equal(ir, i2)


def test_regen_prefix_teacher_part_and_batch_independence(tiny):
    st, te = tiny.student, tiny.teacher
    a, b = tiny.regen
    offs = st.step_offsets
    idx = list(range(5))
    noise, labels = inputs(tiny, idx)
    s = resolve_sampling(te)
    x, tok = S.regen_sample(st, te, noise, labels, (a, b), s, sample_generators(0, idx, "draw"))
    assert x.shape == noise.shape and tok.shape == (5, te.num_tokens)
    # the kept prefix is the snapped first DD step's
    _, first = S.dd_sample(st, noise, labels, (1,), snap=True)
    assert torch.equal(tok[:, :offs[a - 1]], first[:, :offs[a - 1]])
    # everything before offsets[b-1] is data (codebook rows) in the final output
    assert torch.equal(x[:, :offs[b - 1]], st.codebook[tok[:, :offs[b - 1]]])
    # same seed -> same; per-sample generators -> independent of the batch split
    again = S.regen_sample(st, te, noise, labels, (a, b), s, sample_generators(0, idx, "draw"))
    assert torch.equal(again[1], tok) and torch.equal(again[0], x)
    parts = [S.regen_sample(st, te, noise[i:j], labels[i:j], (a, b), s, sample_generators(0, idx[i:j], "draw"))
             for i, j in ((0, 3), (3, 5))]
    assert torch.equal(torch.cat([p[1] for p in parts]), tok) and torch.equal(torch.cat([p[0] for p in parts]), x)
    # a = 1: no first DD step, the teacher makes all of steps 0 .. b-2 (equal to its own sampler's draws)
    x1, tok1 = S.regen_sample(st, te, noise, labels, (1, b), s, torch.Generator().manual_seed(3))
    ref = te.sample(labels, s, generator=torch.Generator().manual_seed(3), stop_step=b - 1)
    assert torch.equal(tok1[:, :offs[b - 1]], ref)


def test_regen_range_checks():
    assert parse_regen("41:81") == (41, 81)
    S.check_regen(41, 81, (1, 81), 256)
    S.check_regen(81, 81, (1, 81), 256)
    for a, b in ((41, 80), (82, 81), (0, 81), (1, 90)):
        with pytest.raises(ValueError) as e:
            S.check_regen(a, b, (1, 81), 256)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        parse_regen("41-81")
    assert default_regen((1, 81)) == (41, 81) and default_regen((1, 6)) == (4, 6)
    assert default_regen((1,)) is None


# ---- baselines -----------------------------------------------------------------------------------
def test_skip_zero_is_teacher_sampling_and_skip_shapes(tiny):
    te = tiny.teacher
    s = resolve_sampling(te)
    labels = sample_labels(0, range(4), te.num_classes, True)
    ref = te.sample(labels, s, generator=torch.Generator().manual_seed(5))
    got = S.skip_sample(te, labels, s, 0, torch.Generator().manual_seed(5))
    assert torch.equal(got, ref)
    S_ = te.num_steps
    idx = list(range(4))
    full = S.skip_sample(te, labels, s, 0, sample_generators(0, idx, "draw"))
    sk = S.skip_sample(te, labels, s, 1, sample_generators(0, idx, "draw"))
    assert sk.shape == (4, te.num_tokens)
    m = te.step_offsets[S_ - 1]
    assert torch.equal(sk[:, :m], full[:, :m])          # same per-sample streams for the computed steps
    parts = torch.cat([S.skip_sample(te, labels[i:j], s, 1, sample_generators(0, idx[i:j], "draw"))
                       for i, j in ((0, 1), (1, 4))])
    assert torch.equal(parts, sk)
    drop = S.skip_sample(te, labels, s, S_ - 1, sample_generators(0, idx, "draw"), fill="drop")
    assert drop.shape == (4, te.step_offsets[1])
    with pytest.raises(ValueError):
        S.skip_sample(te, labels, s, S_, None)


def test_resample_probs_nearest_grid():
    p = torch.softmax(torch.randn(2, 1, 7), -1)
    assert torch.equal(S.resample_probs(p, 9), p.expand(2, 9, 7))
    q = torch.arange(4.0).view(1, 4, 1)                   # 2x2 grid [[0, 1], [2, 3]]
    r = S.resample_probs(q, 16).view(4, 4)                # nearest upsampling to 4x4
    assert r.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert S.resample_probs(torch.arange(4.0).view(1, 4, 1), 9).view(3, 3).tolist() == \
        [[0, 0, 1], [0, 0, 1], [2, 2, 3]]
    with pytest.raises(ValueError):
        S.resample_probs(torch.ones(1, 2, 3), 5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_teachers):
    """A 30-pair data set of the tiny LlamaGen teacher (its own checkpoint files)."""
    fam = "llamagen"
    d = tmp_path_factory.mktemp("onestep")
    spec, teacher = tiny_teachers(fam, seed=1)
    root = d / "pairs"
    build_dataset(str(root), teacher, spec, num_samples=30, sampling=resolve_sampling(teacher), fm_config=FM,
                  seed=0, labels="balanced", shard_size=16, batch_size=16, show_progress=False, log=lambda s: None)
    return str(root), teacher


def test_onestep_matches_data_marginals(tiny_data):
    """Total variation per position between M draws and the data set's marginal, against the bound
    E[TV] <= 1/2 sum_j sqrt(p_j (1 - p_j) / M) (Jensen per cell): the mean over positions must stay
    below that bound and the max below twice it (fixed seed, so this is deterministic)."""
    root, te = tiny_data
    V = te.vocab_size
    glob = S.TokenMarginals.from_dataset(root, conditional=False)
    assert glob.tokens.shape == (30, te.num_tokens)
    M = 3000
    labels = torch.zeros(M, dtype=torch.long)
    draws = glob.sample(labels, torch.Generator().manual_seed(0))
    emp = torch.zeros(te.num_tokens, V, dtype=torch.float64)
    emp.scatter_add_(1, draws.t(), torch.ones(te.num_tokens, M, dtype=torch.float64))
    emp /= M
    p = glob.frequencies(V)
    assert torch.allclose(p.sum(1), torch.ones(te.num_tokens, dtype=torch.float64))
    tv = 0.5 * (emp - p).abs().sum(1)
    bound = 0.5 * (p * (1 - p) / M).sqrt().sum(1)
    assert float(tv.mean()) <= float(bound.mean())
    assert bool((tv <= 2 * bound + 1e-12).all())
    assert bool(((emp > 0) <= (p > 0)).all())               # never a token the data lacks at that position
    # class-conditional: only tokens the class's pairs have at that position
    cond = S.TokenMarginals.from_dataset(root, conditional=True)
    for c in (0, 3):
        d = cond.sample(torch.full((400,), c), sample_generators(0, range(400), "onestep"))
        pool = cond.pool(c)
        for i in range(te.num_tokens):
            assert set(d[:, i].tolist()) <= set(pool[:, i].tolist())


# ---- the CLI ---------------------------------------------------------------------------------------
def read_npz(path):
    with np.load(path) as z:
        return z["arr_0"], z["arr_1"]


def test_cli_dd_outputs_and_batch_independence(tiny, tmp_path):
    te, st = tiny.teacher, tiny.student
    o1, o2 = tmp_path / "b2", tmp_path / "b5"
    r = sample("--run", tiny.run, "--out", o1, "--num-samples", 5, "--batch-size", 2, "--png", "--device", "cpu")
    assert r.exit_code == 0, r.output
    imgs, labels = read_npz(o1 / "samples.npz")
    H = te.image_size
    assert imgs.shape == (5, H, H, 3) and imgs.dtype == np.uint8
    assert labels.tolist() == sample_labels(0, range(5), te.num_classes, True).tolist()
    tokens = np.load(o1 / "tokens.npy")
    assert tokens.shape == (5, te.num_tokens)
    assert sorted(os.listdir(o1 / "png")) == [f"{i:06d}.png" for i in range(5)]
    with Image.open(o1 / "grid.png") as g:
        assert g.size[0] > H and g.mode == "RGB"
    with Image.open(o1 / "png" / "000003.png") as im:
        assert np.array_equal(np.asarray(im), imgs[3])
    timing = json.loads((o1 / "timing.json").read_text())
    for k in ("images_per_second", "seconds_per_image", "model_seconds", "decode_seconds", "total_seconds",
              "num_samples", "batch_size", "device", "mode"):
        assert k in timing
    assert timing["num_samples"] == 5 and timing["model_seconds"] > 0
    assert "images/s" in r.output
    # the CLI is the function: same noise, labels, 2-step
    noise, lab = inputs(tiny, range(5))
    x, idx = S.dd_sample(st, noise, lab, st.config.timesteps[:2])
    assert np.array_equal(tokens, idx.numpy())
    assert np.array_equal(imgs, to_uint8(te.decode(x)))
    # batch size does not change a sample
    r = sample("--run", tiny.run, "--out", o2, "--num-samples", 5, "--batch-size", 5, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert np.array_equal(read_npz(o2 / "samples.npz")[0], imgs)
    assert np.array_equal(np.load(o2 / "tokens.npy"), tokens)
    # --steps 1 is the 1-step sample
    r = sample("--run", tiny.run, "--out", tmp_path / "s1", "--num-samples", 5, "--steps", 1, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s1" / "sample.json").read_text())["timesteps"] == [1]
    assert np.array_equal(np.load(tmp_path / "s1" / "tokens.npy"), S.dd_sample(st, noise, lab, (1,))[1].numpy())


def test_cli_regen_batch_independent_and_range_error(tiny, tmp_path):
    a, b = tiny.regen
    outs = []
    for bs in (2, 5):
        o = tmp_path / f"r{bs}"
        r = sample("--run", tiny.run, "--out", o, "--num-samples", 5, "--batch-size", bs, "--regen", f"{a}:{b}",
                   "--device", "cpu")
        assert r.exit_code == 0, r.output
        outs.append((read_npz(o / "samples.npz")[0], np.load(o / "tokens.npy")))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    for bad in (f"1:{b + 1}", f"{b + 1}:{b}", "x"):
        r = sample("--run", tiny.run, "--out", tmp_path / "bad", "--regen", bad)
        assert r.exit_code != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dd sample: error: --regen"), r.stderr


def test_cli_baselines_and_compare(tiny, tmp_path):
    te = tiny.teacher
    r = sample("--run", tiny.run, "--out", tmp_path / "skip", "--num-samples", 3, "--baseline", "skip-1",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "skip" / "tokens.npy").shape == (3, te.num_tokens)
    r = sample("--run", tiny.run, "--out", tmp_path / "cmp", "--num-samples", 3, "--compare", "--device", "cpu")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "cmp" / "compare.png") as im:
        assert im.size[1] == 4 * (te.image_size + 4) and im.size[0] > 3 * te.image_size   # 4 rows
    assert "teacher, DD-1, DD-2, mixed" in r.output
    r = sample("--run", tiny.run, "--out", tmp_path / "x", "--baseline", "skip-99")
    assert r.exit_code != 0 and len(r.stderr.strip().splitlines()) == 1


def test_cli_onestep(tiny_data, tmp_path):
    root, te = tiny_data
    r = sample("--data", root, "--out", tmp_path / "o", "--num-samples", 4, "--baseline", "onestep",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    tok = np.load(tmp_path / "o" / "tokens.npy")
    imgs, labels = read_npz(tmp_path / "o" / "samples.npz")
    assert tok.shape == (4, te.num_tokens) and imgs.shape[0] == 4
    pool = S.TokenMarginals.from_dataset(root)
    for t, c in zip(tok, labels):
        p = pool.pool(int(c)).numpy()
        assert all(t[i] in p[:, i] for i in range(te.num_tokens))


# ---- the sample store: kill/resume, torchrun ranks, verify ------------------------------------------
def outputs(d):
    """The bytes of everything `dd sample` writes that must not depend on ranks or interruptions."""
    names = sorted(f for f in os.listdir(d) if f.startswith("shard-")) + ["samples.npz", "tokens.npy", "grid.png"]
    out = {f: (d / f).read_bytes() for f in names}
    out.update({f"png/{f}": (d / "png" / f).read_bytes() for f in sorted(os.listdir(d / "png"))})
    return out


@pytest.mark.parametrize("tiny_teacher", ["var"], indirect=True)   # the store is family-blind; VAR has draws and scales
def test_torchrun_two_ranks_write_the_same_bytes_as_one(tiny, tmp_path):
    args = ["sample", "--run", tiny.run, "--num-samples", 7, "--shard-size", 2, "--batch-size", 2, "--png",
            "--regen", "{}:{}".format(*tiny.regen), "--device", "cpu", "--no-progress"]
    r = run_dd(*args, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    r = run_dd(*args, "--out", tmp_path / "two", torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on 2 ranks" in r.stdout
    one, two = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert len(one) == 4 + 3 + 7 and one == two
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["complete"] and m["build"]["world_size"] == 2 and m["num_samples"] == 7
    imgs, labels = read_npz(tmp_path / "one" / "samples.npz")       # and it is the in-process sampler
    noise, lab = inputs(tiny, range(7))
    x, idx = S.regen_sample(tiny.student, tiny.teacher, noise, lab, tiny.regen, resolve_sampling(tiny.teacher),
                            sample_generators(0, range(7), "draw"))
    assert np.array_equal(np.load(tmp_path / "one" / "tokens.npy"), idx.numpy())
    assert np.array_equal(imgs, to_uint8(tiny.teacher.decode(x))) and labels.tolist() == lab.tolist()


@pytest.mark.parametrize("tiny_teacher", ["llamagen"], indirect=True)
def test_killed_sample_run_resumes_to_the_same_bytes(tiny, tmp_path):
    args = ["sample", "--run", tiny.run, "--num-samples", 40, "--shard-size", 1, "--batch-size", 1,
            "--baseline", "teacher", "--device", "cpu", "--no-progress", "--png"]
    r = run_dd(*args, "--out", tmp_path / "ref")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    proc = kill_after(out / ".progress" / "shard-00000.json", *args, "--out", out)
    done = os.listdir(out / ".progress")
    assert 1 <= len(done) < 40, f"the kill did not land mid-run ({len(done)} shards): {proc.stderr.read()}"
    assert not (out / "samples.npz").exists()
    r = run_dd(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} done" in r.stdout
    assert outputs(out) == outputs(tmp_path / "ref")
    assert not [f for f in os.listdir(out) if ".tmp." in f]
    r = run_dd("sample", "--out", out, "--verify")
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    # other settings into the same directory are refused, naming the setting
    r = run_dd(*args[:-1], "--seed", 1, "--out", out)
    assert r.returncode != 0 and "seed" in r.stderr and "other settings" in r.stderr
    # a changed image is found by --verify
    npz = bytearray((out / "samples.npz").read_bytes())
    npz[-200] ^= 0x40                                   # inside arr_1 or the last image: either is caught
    (out / "samples.npz").write_bytes(bytes(npz))
    r = run_dd("sample", "--out", out, "--verify")
    assert r.returncode == 1 and "FAIL" in r.stderr, r.stdout + r.stderr


def test_decodes_prefix_capability_matches_the_decoder(tiny, tmp_path):
    """`Teacher.decodes_prefix` (not the family name) says whether skip-N may drop the skipped steps."""
    te = tiny.teacher
    prefix = torch.zeros(2, te.step_offsets[te.num_steps - 1], dtype=torch.long)     # all steps but the last
    if te.decodes_prefix:
        assert te.decode(prefix).shape == (2, 3, te.image_size, te.image_size)
    else:
        with pytest.raises(Exception):
            te.decode(prefix)
    r = sample("--run", tiny.run, "--out", tmp_path / "d", "--num-samples", 2, "--baseline", "skip-1",
               "--skip-fill", "drop", "--device", "cpu")
    assert (r.exit_code == 0) == te.decodes_prefix, r.output
    if not te.decodes_prefix:
        assert "cannot decode a partial token sequence" in r.stderr
    else:
        assert np.load(tmp_path / "d" / "tokens.npy").shape == (2, te.step_offsets[te.num_steps - 1])
