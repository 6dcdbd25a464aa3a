"""Text-to-image LlamaGen through the pipeline (issue 18): prompts + official caption-feature files into
`dd build-dataset` (bad inputs refused in one line, writing nothing; byte-identical resume; verify)."""
import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distilled_decoding.captions import SIDE_FILE, load_captions, read_side_table
from distilled_decoding.dataset import PairDataset
from distilled_decoding.dataset_check import verify_dataset
from distilled_decoding.dataset_cli import build_dataset_command
from distilled_decoding.pairs import read_manifest
from tiny_teachers import saved_teacher

PROMPTS = ["a red square", "two dots", "a thick slanted seven"]
LENGTHS = [2, 4, 3]          # real caption tokens of each prompt (the tiny teacher has 4 slots of dim 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("t2i")
    spec, teacher = saved_teacher("llamagen-t2i", d)
    return spec, teacher


def write_prompts(d, prompts=PROMPTS, lengths=LENGTHS, dim=8, stem="captions"):
    """A prompt file and its official feature files <d>/feats/<stem>/<i>.npy [1, n, dim]."""
    (d / "feats" / stem).mkdir(parents=True, exist_ok=True)
    path = d / f"{stem}.txt"
    path.write_text("\n".join(prompts) + "\n")
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        np.save(d / "feats" / stem / f"{i}.npy", rng.standard_normal((1, n, dim)).astype(np.float32))
    return path, d / "feats"


def teacher_args(spec):
    return ["--teacher", spec.teacher, "--config", json.dumps(spec.config), "--checkpoint", spec.checkpoint,
            "--tokenizer-config", json.dumps(spec.tokenizer_config), "--tokenizer-checkpoint",
            spec.tokenizer_checkpoint, "--nfe", "2"]


def build_cli(spec, out, prompts, feats, *extra):
    args = ["--out", str(out), "--num-samples", "5", "--shard-size", "2", "--batch-size", "2", "--seed", "1",
            "--device", "cpu", "--no-progress", *teacher_args(spec)]
    if prompts is not None:
        args += ["--prompts", str(prompts), "--caption-features", str(feats)]
    return CliRunner().invoke(build_dataset_command, args + list(extra), catch_exceptions=False)


def test_captions_are_left_padded_as_the_official_data_set(tmp_path):
    prompts, feats = write_prompts(tmp_path)
    t = load_captions(str(prompts), str(feats), slots=4, dim=8)
    assert t.prompts == PROMPTS and t.features.shape == (3, 4, 8)
    assert t.mask.tolist()[0] == [False, False, True, True]
    raw = np.load(feats / "captions" / "0.npy")[0]
    assert torch.equal(t.features[0, 2:], torch.from_numpy(raw)) and not t.features[0, :2].any()


@pytest.mark.parametrize("case, match", [
    ("missing", r"no caption features for prompt 2 \('two dots'\)"),
    ("empty", r"line 2 is an empty prompt"),
    ("long", r"prompt 3 .* has 5 caption tokens, over the teacher's 4 caption slots"),
    ("dim", r"prompt 1 .* dimension 6, the teacher's caption_dim is 8"),
    ("c2i", r"class-conditional"),
    ("none", r"text-to-image: give --prompts"),
])
def test_bad_caption_inputs_one_line_and_nothing_written(tiny, tmp_path, case, match):
    spec, _ = tiny
    prompts, feats = write_prompts(tmp_path)
    if case == "missing":
        os.remove(feats / "captions" / "1.npy")
    elif case == "empty":
        prompts.write_text("a red square\n   \ntwo dots\n")
    elif case == "long":
        np.save(feats / "captions" / "2.npy", np.zeros((1, 5, 8), np.float32))
    elif case == "dim":
        np.save(feats / "captions" / "0.npy", np.zeros((1, 2, 6), np.float32))
    elif case == "c2i":
        spec, _ = saved_teacher("llamagen", tmp_path)
    elif case == "none":
        prompts = None
    out = tmp_path / "D"
    r = build_cli(spec, out, prompts, feats)
    assert r.exit_code != 0
    msg = r.output.strip()
    assert len(msg.splitlines()) == 1 and msg.startswith("Error: "), msg
    assert re.search(match, msg), msg
    assert not out.exists()


def test_build_with_captions_resumes_byte_identically_and_verifies(tiny, tmp_path):
    spec, teacher = tiny
    prompts, feats = write_prompts(tmp_path)
    out = tmp_path / "D"
    assert build_cli(spec, out, prompts, feats).exit_code == 0
    files = {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}
    m = read_manifest(str(out))
    cond = m["settings"]["condition"]
    assert cond["prompts_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert m["settings"]["num_classes"] == 3 and SIDE_FILE in m["side_files"]
    # interrupted: drop the last shard and the final manifest's completeness, resume -> same bytes
    os.remove(out / "shard-00002.safetensors")
    os.remove(out / SIDE_FILE)
    m["complete"] = False
    m["shards"] = m["shards"][:2]
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    r = build_cli(spec, out, prompts, feats)
    assert r.exit_code == 0, r.output
    for f, data in files.items():
        if f != "manifest.json":
            assert (out / f).read_bytes() == data, f
    assert verify_dataset(str(out), recompute=2, log=lambda s: None) == []
    ds = PairDataset(str(out))
    assert read_side_table(str(out)).prompts == PROMPTS
    assert sorted(int(ds[i]["label"]) for i in range(3)) == [0, 1, 2]     # balanced over the prompts
    # a damaged caption table: named by verify, rewritten (same bytes) by a resume
    (out / SIDE_FILE).write_bytes(b"x" + files[SIDE_FILE][1:])
    assert any("side file captions.safetensors is corrupt" in p for p in verify_dataset(str(out), log=lambda s: None))
    r = build_cli(spec, out, prompts, feats)
    assert r.exit_code == 0 and "rewriting it" in r.output
    assert (out / SIDE_FILE).read_bytes() == files[SIDE_FILE]
    # other prompts: refused, naming the condition setting
    prompts.write_text("x\ny\nz\n")
    r = build_cli(spec, out, prompts, feats)
    assert r.exit_code != 0 and "condition.prompts_sha256" in r.output


# ---- the t2i student ----------------------------------------------------------------------------
def padded(features, n, left=True):
    """features [B, T, D] of n real tokens -> Caption left- (real tokens last) or right-padded."""
    from teachers.base import Caption
    B, T, _ = features.shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    f = torch.zeros_like(features)
    sl = slice(T - n, T) if left else slice(0, n)
    f[:, sl], mask[:, sl] = features[:, :n], True
    return Caption(f, mask)


def test_student_handles_padded_captions(tiny):
    from distilled_decoding.student import build_student
    _, teacher = tiny
    student = build_student(teacher, seed=0).eval()
    bb, gpt = student.backbone, teacher.gpt
    assert torch.equal(bb.cls_embedding.cap_proj.fc1.weight, gpt.cls_embedding.cap_proj.fc1.weight)
    assert torch.equal(bb.cls_embedding.uncond_embedding, gpt.cls_embedding.uncond_embedding)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 8, generator=g)
    x = torch.randn(2, 16, student.config.codebook_dim, generator=g)
    t = torch.tensor([1, 5])
    with torch.no_grad():
        left, e_left = student(x, padded(feats, 2), t)
        right, e_right = student(x, padded(feats, 2, left=False), t)
        junk = padded(feats, 2)
        junk.features[:, :2] = 7.0                                        # values under the mask never count
        again, _ = student(x, junk, t)
        full, _ = student(x, padded(feats, 4), t)                         # two more real tokens: a change
    # zero RoPE rows on the caption slots and padded keys blocked: where the padding sits is invisible
    assert torch.allclose(left, right, atol=1e-5) and torch.allclose(e_left, e_right, atol=1e-5)
    assert torch.equal(left, again)
    assert (left - full).abs().max() > 1e-3
    with pytest.raises(ValueError, match="takes a Caption"):
        student(x, torch.tensor([0, 1]), t)


def test_t2i_student_checkpoint_loads_strictly(tiny):
    from distilled_decoding.student import build_backbone_loaded, build_student
    from teachers.checkpoint import CheckpointMismatchError
    from tiny_teachers import TINY
    _, teacher = tiny
    student = build_student(teacher, seed=0)
    state = student.backbone.state_dict()
    assert "cls_embedding.cap_proj.fc2.weight" in state and "cls_embedding.uncond_embedding" in state
    loaded = build_backbone_loaded(student.config, state)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    c2i = type(student.config).from_dict(dict(student.config.to_dict(), model=TINY["llamagen"][0]))
    with pytest.raises(CheckpointMismatchError, match="cls_embedding"):
        build_backbone_loaded(c2i, state)


def test_build_train_sample_eval_with_captions(tiny, tmp_path):
    from distilled_decoding.cli import main
    spec, _ = tiny
    prompts, feats = write_prompts(tmp_path)
    data, run, out = tmp_path / "D", tmp_path / "R", tmp_path / "S"
    assert build_cli(spec, data, prompts, feats).exit_code == 0

    def dd(*args):
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    dd("train", "--data", data, "--out", run, "--max-steps", 2, "--batch-size", 4, "--ckpt-every", 2,
       "--log-every", 1, "--num-workers", 0, "--device", "cpu", "--no-progress")
    dd("sample", "--run", run, "--out", out, "--num-samples", 4, "--batch-size", 4, "--device", "cpu",
       "--no-progress", "--prompts", prompts, "--caption-features", feats)
    assert (out / "grid.png").exists()
    lines = (out / "prompts.txt").read_text().splitlines()
    assert len(lines) == 4 and {ln.split("\t")[1] for ln in lines[:3]} == set(PROMPTS)
    z = np.load(out / "samples.npz")
    assert z["arr_0"].shape[0] == 4 and set(z["arr_1"][:3].tolist()) == {0, 1, 2}
    # a student of a text-to-image teacher needs the captions
    r = CliRunner().invoke(main, ["sample", "--run", str(run), "--out", str(tmp_path / "S2"), "--device", "cpu"])
    assert r.exit_code != 0 and "give --prompts" in r.output and not (tmp_path / "S2").exists()
    res = dd("eval", out / "samples.npz", "--ref", out / "samples.npz", "--extractor", "digits", "--device", "cpu",
             "--k", 1, "--splits", 1, "--workers", 1)
    assert "FID" in res
