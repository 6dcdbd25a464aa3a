"""Issue 19, data safety: nothing a user has is overwritten, and nothing silently wrong is accepted.
Every case runs the real CLI; a refusal must meet the bad-input contract (`dd_process.assert_refused`:
rc != 0, one stderr line naming the fault, no traceback, watched folders byte-identical)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from distilled_decoding import sample_store
from distilled_decoding.adm_npz import write_adm_npz
from distilled_decoding.images import save_png
from distilled_decoding.shard_store import LOCK_FILE, shard_name
from distilled_decoding.student import build_student
from distilled_decoding.student_run import save_run
from dd_process import assert_refused, run_dd, tree_digest

NFE = 4
BUILD = ["--num-samples", 12, "--shard-size", 4, "--batch-size", 4, "--seed", 3, "--device", "cpu", "--no-progress"]


def teacher_args(spec):
    return ["--teacher", spec.teacher, "--config", json.dumps(spec.config), "--checkpoint", spec.checkpoint,
            "--tokenizer-config", json.dumps(spec.tokenizer_config), "--tokenizer-checkpoint",
            spec.tokenizer_checkpoint, "--nfe", NFE]


def ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def ds(tiny_teachers, tmp_path_factory):
    """(spec, path) of one small LlamaGen data set built by the CLI (12 pairs, 3 shards); tests copy it
    before changing anything."""
    spec, _ = tiny_teachers("llamagen")
    path = tmp_path_factory.mktemp("safety") / "ds"
    ok(run_dd("build-dataset", "--out", path, *BUILD, *teacher_args(spec)))
    return spec, path


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def train_args(data, out, *more):
    return ("train", "--data", data, "--out", out, "--max-steps", 2, "--batch-size", 4, "--ckpt-every", 1,
            "--log-every", 1, "--num-workers", 0, "--device", "cpu", "--no-progress", *more)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- 1. nothing existing is overwritten --------------------------------------------------------------
def test_eval_never_writes_over_an_input_or_an_existing_file(tmp_path):
    x, r = tmp_path / "x.npz", tmp_path / "R.npz"
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    write_adm_npz(str(x), 4, (8, 8, 3), [imgs])
    write_adm_npz(str(r), 4, (8, 8, 3), [imgs[::-1].copy()])
    (tmp_path / "old.json").write_text("{}")
    w = [tmp_path]
    assert_refused("eval", x, "--ref-stats", x, names="--ref-stats", watch=w)
    assert_refused("eval", x, "--json", x, names="--json", watch=w)
    assert_refused("eval", x, "--ref", r, "--ref-stats", r, "--overwrite", names="--ref-stats", watch=w)
    line = assert_refused("eval", x, "--json", tmp_path / "old.json", names="--json", watch=w)
    assert "--overwrite" in line


def test_train_into_an_existing_run_dir_needs_resume_or_overwrite(ds, tmp_path):
    _, data = ds
    run = tmp_path / "run"                          # a run whose checkpoints were pruned away
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(15)))
    (run / "student.safetensors").write_bytes(b"weights of the earlier run")
    assert_refused(*train_args(data, run), names="--out", watch=[run])
    other = tmp_path / "notes"                     # --overwrite never removes what is not a run
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    assert_refused(*train_args(data, other, "--overwrite"), names="--out", watch=[other])
    ok(run_dd(*train_args(data, run, "--overwrite")))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [1, 2]
    assert (run / "student.safetensors").read_bytes() != b"weights of the earlier run"


def test_sample_png_is_whole_and_never_stale_and_tmp_files_are_cleaned(ds, tmp_path, monkeypatch):
    _, data = ds
    out = tmp_path / "s"
    args = ("sample", "--data", data, "--baseline", "onestep", "--out", out, "--shard-size", 4, "--device", "cpu",
            "--no-progress")
    ok(run_dd(*args, "--num-samples", 4, "--png"))
    assert sorted(os.listdir(out / "png")) == [f"{i:06d}.png" for i in range(4)]
    # what a killed run leaves: temporaries of dead writers (a png folder, a half samples.npz)
    gone = dead_pid()
    (out / f"png.tmp.{gone}").mkdir()
    (out / f"png.tmp.{gone}" / "000000.png").write_bytes(b"half")
    (out / f"samples.npz.tmp.{gone}").write_bytes(b"half")
    ok(run_dd(*args, "--num-samples", 8))          # extended without --png: png/ follows, all 8
    assert sorted(os.listdir(out / "png")) == [f"{i:06d}.png" for i in range(8)]
    assert not [f for f in os.listdir(out) if ".tmp." in f]
    assert ok(run_dd("sample", "--out", out, "--verify")).stdout.strip().endswith("OK")
    # a run that dies while writing the PNGs leaves no png/ that could pass for an image set
    shutil.rmtree(out / "png")
    written = []

    def dies_after_two(array, path, atomic=True):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        save_png(array, path, atomic)

    monkeypatch.setattr(sample_store, "save_png", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample_store.assemble_outputs(str(out), sample_store.sample_store(str(out)).read_manifest(), png=True)
    assert not (out / "png").exists() and len(written) == 2 and ".tmp." in written[0]
    assert not (out / f"samples.npz.tmp.{os.getpid()}").exists()
    monkeypatch.undo()


# ---- 2. shard hashes and manifest settings -------------------------------------------------------------
def test_a_flipped_byte_is_named_by_train_and_rebuilt_by_build_dataset(ds, tmp_path):
    spec, data = ds
    bad = copy(data, tmp_path / "bad")
    good = (bad / shard_name(1)).read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0x01                             # a token byte: same size, still parses
    (bad / shard_name(1)).write_bytes(bytes(flipped))
    assert_refused(*train_args(bad, tmp_path / "run"), names=shard_name(1), watch=[bad, tmp_path / "run"])
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")
    r = ok(run_dd("build-dataset", "--out", bad, *BUILD, *teacher_args(spec)))
    assert shard_name(1) in r.stdout and "nothing to build" not in r.stdout
    shards = lambda d: {k: v for k, v in tree_digest(d).items() if k.startswith("shard-")}  # noqa: E731
    assert shards(bad) == shards(data)
    assert ok(run_dd("dataset", "verify", bad)).stdout.strip().endswith("OK")


def test_a_manifest_edited_to_other_settings_is_refused_and_old_sets_still_read(ds, tmp_path):
    _, data = ds
    edited = copy(data, tmp_path / "edited")
    m = json.loads((edited / "manifest.json").read_text())
    m["settings"]["sampling"]["cfg_scale"] = 7.5
    (edited / "manifest.json").write_text(json.dumps(m, indent=1))
    assert_refused("dataset", "verify", edited, names="manifest.json", watch=[edited])
    assert_refused(*train_args(edited, tmp_path / "run"), names="manifest.json", watch=[edited])
    old = copy(data, tmp_path / "old")             # written before settings_sha256 existed
    m = json.loads((old / "manifest.json").read_text())
    del m["settings_sha256"]
    (old / "manifest.json").write_text(json.dumps(m, indent=1))
    assert ok(run_dd("dataset", "verify", old)).stdout.strip().endswith("OK")


# ---- 3. the teacher of --checkpoint ------------------------------------------------------------------
def test_train_refuses_a_checkpoint_of_another_teacher(ds, tiny_teachers, tmp_path):
    _, data = ds
    other, _ = tiny_teachers("llamagen", seed=1)   # same shapes, other weights
    assert_refused(*train_args(data, tmp_path / "run", "--checkpoint", other.checkpoint), names="--checkpoint",
                   watch=[data, tmp_path / "run"])


# ---- 4. one builder at a time ------------------------------------------------------------------------
def test_a_second_build_into_the_same_dir_is_refused_and_a_stale_lock_is_taken_over(ds, tmp_path):
    spec, data = ds
    d = copy(data, tmp_path / "d")
    (d / LOCK_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")   # a live builder: this process
    line = assert_refused("build-dataset", "--out", d, *BUILD, *teacher_args(spec), names=LOCK_FILE, watch=[d])
    assert str(os.getpid()) in line
    (d / LOCK_FILE).write_text(f"{socket.gethostname()} {dead_pid()}\n")   # its builder was killed
    r = ok(run_dd("build-dataset", "--out", d, *BUILD, *teacher_args(spec)))
    assert "nothing to build" in r.stdout and not (d / LOCK_FILE).exists()


# ---- 5. samplers on the wrong data -------------------------------------------------------------------
def test_onestep_on_an_incomplete_set_and_a_run_with_another_teachers_data(ds, tiny_teachers, tmp_path):
    _, data = ds
    part = copy(data, tmp_path / "part")
    m = json.loads((part / "manifest.json").read_text())
    m["complete"], m["shards"] = False, m["shards"][:1]
    (part / "manifest.json").write_text(json.dumps(m, indent=1))
    out = tmp_path / "out"
    assert_refused("sample", "--data", part, "--baseline", "onestep", "--out", out, "--device", "cpu",
                   names="incomplete", watch=[part, out])
    vspec, var = tiny_teachers("var")
    student = build_student(var)
    run = tmp_path / "var-run"
    save_run(str(run), student, None, student.config, {"teacher": vspec.to_dict()})
    assert_refused("sample", "--run", run, "--data", data, "--out", out, "--num-samples", 2, "--device", "cpu",
                   names="--data", watch=[run, data, out])
