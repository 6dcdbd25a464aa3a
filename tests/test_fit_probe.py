"""tools/fit_probe.py: the class-marginal cross-entropy and the per-position fit of a student."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from tiny_teachers import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _probe():
    spec = importlib.util.spec_from_file_location("fit_probe", os.path.join(ROOT, "tools", "fit_probe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_marginal_ce_is_the_plug_in_entropy_and_grows_off_the_reference():
    fp = _probe()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    # class 0: position 0 always token 3; class 1: uniform over 4 tokens; position 1 uniform over 8
    tokens = torch.stack([torch.where(labels == 0, 3, torch.randint(0, 4, (400,), generator=g)),
                          torch.randint(0, 8, (400,), generator=g)], 1)
    ce = fp.marginal_ce(tokens, labels, 16, tokens, labels, alpha=1e-6)
    assert ce[0].item() == pytest.approx(0.5 * torch.log(torch.tensor(4.0)).item(), abs=0.05)
    assert ce[1].item() == pytest.approx(torch.log(torch.tensor(8.0)).item(), abs=0.05)
    # scored under the marginals of the other class, the deterministic position costs far more
    swapped = fp.marginal_ce(tokens, labels, 16, tokens, 1 - labels, alpha=0.1)
    assert swapped[0] > ce[0] + 1.0


def test_fit_matches_the_students_logits_on_the_noise_positions():
    from distilled_decoding.schedule import make_xt
    from distilled_decoding.student import build_student
    from distilled_decoding.teacher_spec import TeacherSpec
    fp = _probe()
    cfg, tok_cfg, _ = TINY["var"]
    torch.manual_seed(0)
    teacher = TeacherSpec("var", cfg, tokenizer_config=tok_cfg).load("cpu")
    student = build_student(teacher, timesteps=(1, 2), split=3).eval()
    n, C = teacher.num_tokens, teacher.embed_dim
    pairs = {"noise": torch.randn(6, n, C), "tokens": torch.randint(0, 64, (6, n)), "label": torch.arange(6)}
    r = fp.fit(student, pairs, 2, batch=4)
    assert r["noise"].tolist() == [False] + [True] * (n - 1)        # t = 2: the 1x1 scale is data
    t = torch.full((6,), 2)
    with torch.no_grad():
        logits, _ = student(make_xt(student.codebook[pairs["tokens"]], pairs["noise"], t, student.step_offsets),
                            pairs["label"], t)
    assert torch.allclose(r["acc"], (logits.argmax(-1) == pairs["tokens"]).float().mean(0))
    assert torch.allclose(r["ce"], F.cross_entropy(logits.permute(0, 2, 1), pairs["tokens"], reduction="none").mean(0),
                          atol=1e-5)
