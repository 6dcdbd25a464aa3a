"""Text-to-image LlamaGen through the pipeline (issue 18): prompts + official caption-feature files into
`dd build-dataset` (bad inputs refused in one line, writing nothing; byte-identical resume; verify)."""
import os

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

import json

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
    import re
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
    import hashlib
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
    # other prompts: refused, naming the condition setting
    prompts.write_text("x\ny\nz\n")
    r = build_cli(spec, out, prompts, feats)
    assert r.exit_code != 0 and "condition.prompts_sha256" in r.output
