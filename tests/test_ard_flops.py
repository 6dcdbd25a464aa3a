"""ARD FLOPs: the paper's Table 1 at DiT-XL/2 sizes, the overhead formula per mask, and the analytic
count against the multiply-adds the models really run (torch's FLOP counter + the attention calls)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from distilled_decoding.ard_flops import (ard_config_gflops, ard_gflops, dit_gflops, forward_macs,
                                          step_distillation_gflops, table)
from distilled_decoding.ard_student import ARDConfig, ard_sample, build_ard_student
from teachers.dit import DiT, DiTConfig


def close(a: float, b: float, rel: float = 0.005) -> bool:
    return abs(a - b) <= rel * b


def test_paper_table1_at_dit_xl2():
    assert close(dit_gflops("DiT-XL/2"), 118.6)                              # the DiT paper's Gflops
    assert close(step_distillation_gflops("DiT-XL/2", 4), 474.4)
    assert close(ard_gflops("DiT-XL/2", 4, 6, "M4"), 479.9)
    overhead = ard_gflops("DiT-XL/2", 4, 6, "M4") / step_distillation_gflops("DiT-XL/2", 4) - 1
    assert 0.010 < overhead < 0.012                                         # "+1.1%"
    assert "479.9" in table() and "118.6" in table()


@pytest.mark.parametrize("mask,extra_blocks", [("M1", 0), ("M2", 3), ("M3", 3), ("M4", 6)])
@pytest.mark.parametrize("lower", [0, 1, 6, 28])
def test_overhead_is_n_2l2d_per_extra_visible_block(mask, lower, extra_blocks):
    L, D = 256, 1152
    delta = ard_gflops("DiT-XL/2", 4, lower, mask) - step_distillation_gflops("DiT-XL/2", 4)
    assert delta == pytest.approx(lower * 2 * L * L * D * extra_blocks / 1e9, rel=1e-9)


class AttentionMacs:
    """Counts QKᵀ + AV multiply-adds of every SDPA call (torch's FLOP counter skips the CPU kernel)."""

    def __init__(self, monkeypatch):
        self.macs = 0
        sdpa = F.scaled_dot_product_attention

        def counted(q, k, v, *args, **kwargs):
            B, h, T, d = q.shape
            self.macs += 2 * B * h * T * k.shape[2] * d
            return sdpa(q, k, v, *args, **kwargs)
        monkeypatch.setattr(F, "scaled_dot_product_attention", counted)


def run_macs(fn, attention: AttentionMacs) -> float:
    attention.macs = 0
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2 + attention.macs


TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                 num_classes=10, learn_sigma=True)


@pytest.mark.parametrize("mask", ["M1", "M2", "M3", "M4"])
@pytest.mark.parametrize("lower", [0, 2])
def test_analytic_count_is_what_the_models_run(monkeypatch, mask, lower):
    attention = AttentionMacs(monkeypatch)
    teacher = DiT(TINY).eval()
    x, y = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with torch.no_grad():
        assert run_macs(lambda: teacher(x, torch.tensor([500]), y), attention) == forward_macs(TINY)
    config = ARDConfig(TINY.to_dict(), 4, lower, mask, (999, 749, 499, 249))
    student = build_ard_student(teacher, config)
    assert run_macs(lambda: ard_sample(student, x, y), attention) == pytest.approx(ard_config_gflops(config) * 1e9,
                                                                                   rel=1e-12)
