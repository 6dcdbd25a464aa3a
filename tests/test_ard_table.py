"""tools/run_ard_table.py's own parts (the sampling and scoring are ard_demo's, tested by the tiny demo in
test_ard_cli.py): the done-when checks on known rows, the row labels, and the exposure diagnostic on a
one-step student (step 1 sees the same input either way; later steps differ)."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runner():
    spec = importlib.util.spec_from_file_location("run_ard_table", os.path.join(ROOT, "tools", "run_ard_table.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_ard_table"] = mod          # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def _row(fid, mse=None):
    return {"values": {"fid_teacher": list(fid)}, "mse_teacher_endpoint": list(mse or [0.0] * len(fid))}


def test_done_when_checks_and_labels():
    mod = _runner()
    rows = {"m4": _row([10, 11, 12], [0.001, 0.001, 0.001]), "m1": _row([14, 15, 16], [0.002, 0.002, 0.002]),
            "m4-s2": _row([30, 30, 30]), "m1-s2": _row([20, 20, 20]), "ddim4": _row([9, 9, 9])}
    lines = mod.criteria(rows)
    assert lines[0].endswith("11.00 ± 1.00 vs 15.00 ± 1.00 -> yes")
    assert lines[1].endswith("-> yes")
    assert lines[2].endswith("19.00 vs 5.00 -> yes")
    assert lines[3].endswith("-> no")
    rows["m1"] = _row([11.5, 11.5, 11.5])
    assert mod.criteria(rows)[0].endswith("-> yes (within one sd)")
    assert len(mod.criteria({"m4": rows["m4"]})) == 0          # nothing to compare with
    reg = mod.student_rows(1)
    assert reg["m1"].label() == "step distillation 4-step (M1)"
    assert reg["m4-n2"].label() == "ARD 4-step (M4, N = 2)" and reg["m4-s2"].train_args()[:2] == ["--steps", 2]
    assert set(mod.DEFAULT_ROWS) <= set(reg)
    assert reg["m4-d-l0.1"].label(200, 10.0) == "ARD 4-step (M4, N = 1) + 200 steps R + D (λ 0.1)"    # λ sweep row
    assert reg["m4-d"].label(200, 10.0).endswith("R + D (λ 10)") and reg["m1-d-l1"].base == "m1"
    lam = mod.criteria({"m4-d-l1": _row([20, 21, 22]), "m4-ft": _row([13, 13, 13])})
    assert lam == ["- ARD-4 + D (λ 1) beats ARD-4 fine-tuned as long without D on FID vs teacher: "
                   "21.00 ± 1.00 vs 13.00 ± 0.00 -> no"]


def test_exposure_errors_teacher_forced_vs_own(tmp_path):
    from distilled_decoding.ard_train import ARDTrainArgs, train_ard
    from distilled_decoding.teacher_spec import TeacherSpec
    from distilled_decoding.trajectories import build_trajectories
    spec = TeacherSpec("digits-dit")
    build_trajectories(str(tmp_path / "data"), spec.load("cpu", diffusion=True), spec, num_samples=4, steps=4,
                       num_steps=2, batch_size=4, show_progress=False, log=lambda s: None)
    train_ard(ARDTrainArgs(data=str(tmp_path / "data"), out=str(tmp_path / "run"), batch_size=4, max_steps=1,
                           num_workers=0, device="cpu", progress=False), log=lambda s: None)
    e = _runner().exposure_errors(str(tmp_path / "run"), str(tmp_path / "data"))
    assert len(e["forced"]) == len(e["own"]) == 2
    assert e["forced"][0] == pytest.approx(e["own"][0], rel=1e-5)     # step 1's input is the noise either way
    assert e["forced"][1] != e["own"][1]
