"""A miniature of `make demo`: every stage runs on a shipped digits teacher and its outputs parse."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from distilled_decoding import quality
from distilled_decoding.demo import SIZES, run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    return out, run_demo("llamagen", out, SIZES["mini"]["llamagen"], seed=0, log=lambda s: None, dd2=True)


def test_outputs_exist_and_parse(demo):
    out, info = demo
    keys = [r["key"] for r in info["rows"]]
    assert keys == ["teacher", "floor", "dd1", "dd2", "dd1emb", "csd", "mixed", "skip", "onestep"]
    size = SIZES["mini"]["llamagen"]
    n = size.num_samples
    assert len(info["sample_seeds"]) == size.num_seeds and info["reference_seed"] not in info["sample_seeds"]
    for k in keys:
        for s in ([info["reference_seed"]] if k == "teacher" else info["sample_seeds"]):
            d = os.path.join(out, "samples", f"{k}-seed{s}")
            with np.load(os.path.join(d, "samples.npz")) as z:
                assert z["arr_0"].shape == (n, 16, 16, 3) and z["arr_0"].dtype == np.uint8
                assert z["arr_1"].shape == (n,)
            assert np.load(os.path.join(d, "tokens.npy")).shape == (n, 64)
            with open(os.path.join(d, "timing.json")) as f:
                assert json.load(f)["seconds_per_image"] > 0
    for pic in ("compare", "tradeoff", "curves"):
        assert Image.open(info[pic]).size[0] > 0, pic
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["rows"][0]["method"].startswith("teacher")
    table = open(os.path.join(out, "table.md")).read()
    assert table.count("\n|") == 2 + len(keys)           # header, rule, one row per method
    printed = quality.parse_table(table)
    assert printed["onestep* (token marginals)"]["g ↓"] == "1.000"
    assert printed["teacher, independent draws (floor)"]["g ↓"] == "0.000"


def test_steps(demo):
    rows = {r["key"]: r for r in demo[1]["rows"]}
    assert rows["floor"]["steps"] == 64
    assert rows["teacher"]["steps"] == 64 and rows["dd1"]["steps"] == 1 and rows["dd2"]["steps"] == 2
    assert rows["dd1emb"]["steps"] == rows["csd"]["steps"] == 1
    assert rows["mixed"]["steps"] == 12 and rows["skip"]["steps"] == 32


def test_dd_beats_independent_tokens(demo):
    """DD's samples are closer to the teacher's distribution than the best factorised sampler's
    (the paper's Prop. 3.1 baseline), and still show the requested digit (means over the seeds)."""
    # Measured on the zoo teacher of issue 12 (seed 0, 1 thread, mini budget), FID vs teacher / g:
    # floor 13.4 / 0, DD-1 107.8 / 0.90, DD-2 63.1 / 0.48, teacher-mixed 38.6 / 0.24, onestep* 118.1 / 1;
    # FID vs real DD-2 83.1, onestep* 116.9; class accuracy DD-1 99.1%, DD-2 99.6%. At this budget
    # DD-1 only just beats onestep* (the default demo budget: g 0.46).
    rows = {r["key"]: r["mean"] for r in demo[1]["rows"]}
    g = {r["key"]: r["g"] for r in demo[1]["rows"]}
    assert rows["dd1"]["fid_teacher"] < rows["onestep"]["fid_teacher"], rows
    assert g["dd2"] < 0.65 and g["mixed"] < 0.4, g
    assert rows["floor"]["fid_teacher"] < 0.2 * rows["onestep"]["fid_teacher"], rows
    assert rows["dd2"]["fid_real"] < 0.85 * rows["onestep"]["fid_real"], rows
    assert rows["dd1"]["acc"] > 0.9 and rows["dd2"]["acc"] > 0.9


def test_dd2_row_is_a_csd_generator_started_from_the_dd_student(demo):
    """`run_demo(dd2=True)`: the DD2 row samples a `dd csd train` run whose generator started from the demo's
    DD student (--init-run) and trained the size's steps; its start (the student's embedding head) has a row."""
    from distilled_decoding.student_run import read_run_config
    out, info = demo
    size = SIZES["mini"]["llamagen"]
    cfg = read_run_config(os.path.join(out, "csd"))
    assert cfg["method"] == "csd" and cfg["step"] == size.dd2_steps
    assert cfg["train"]["init_run"] == os.path.abspath(os.path.join(out, "run"))
    with open(os.path.join(out, "csd", "metrics.jsonl")) as f:
        assert len([json.loads(line) for line in f]) == size.dd2_steps // 10
    rows = {r["key"]: r for r in info["rows"]}
    assert rows["csd"]["method"].startswith("DD2 1-step") and np.isfinite(rows["csd"]["g"])
    assert info["seconds"]["dd2_train"] > 0
