"""ARD student: the teacher-forced forward equals KV-cached sequential sampling (M1-M4, N in {0, 1,
depth}), N = 0 is S independent DiT passes, heads initialised from the teacher, the mask's reach,
strict loading with one-line errors, and the DiT-XL/2 ARD layout."""
from __future__ import annotations

import math

import pytest
import torch

from distilled_decoding.ard_student import (ARDConfig, ARDStudent, ard_sample, build_ard_student, expected_shapes,
                                            load_ard_state_dict, load_ard_student)
from distilled_decoding.history_mask import block_mask
from teachers.checkpoint import CheckpointMismatchError
from teachers.dit import DiT, DiTConfig, as_dit_config

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                 num_classes=10, learn_sigma=True)
TIMES = (999, 749, 499, 249)
S = len(TIMES)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Unit-gain random weights everywhere (the official init zeroes adaLN and the head, which would
    make every output 0), keeping the fixed sin-cos positions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "pos_embed":
                continue
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            scale = 0.05 if name.endswith("bias") else 1 / math.sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def teacher() -> DiT:
    torch.manual_seed(0)
    t = DiT(TINY)
    randomise(t, 1)
    return t.eval().requires_grad_(False)


def inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, S, 4, 8, 8, generator=g), torch.tensor([3, TINY.num_classes])   # the null label too


def student(teacher, lower: int, mask: str = "M4", seed=None) -> ARDStudent:
    s = build_ard_student(teacher, ARDConfig(TINY.to_dict(), S, lower, mask, TIMES)).eval()
    if seed is not None:
        randomise(s, seed)
    return s


@pytest.mark.parametrize("lower", [0, 1, TINY.depth])
@pytest.mark.parametrize("mask", ["M1", "M2", "M3", "M4"])
def test_teacher_forced_forward_equals_cached_sampling(teacher, mask, lower):
    s = student(teacher, lower, mask, seed=5)
    x, y = inputs()
    with torch.no_grad():
        out = s(x, y)
    traj = ard_sample(s, x[:, 0], y, teacher_forcing=x)
    assert traj.shape == (2, S + 1, 4, 8, 8)
    assert torch.equal(traj[:, 0], x[:, 0])
    assert (out - traj[:, 1:]).abs().max() <= 1e-5


@pytest.mark.parametrize("mask", ["M2", "M4"])
def test_free_sampling_feeds_its_own_outputs(teacher, mask):
    s = student(teacher, 2, mask, seed=6)
    x, y = inputs()
    seen = []
    traj = ard_sample(s, x[:, 0], y, callback=lambda k, state: seen.append((k, state.clone())))
    assert [k for k, _ in seen] == list(range(1, S + 1))
    assert all(torch.equal(state, traj[:, k]) for k, state in seen)
    with torch.no_grad():
        again = s(traj[:, :S], y)              # teacher-forced on the student's own trajectory
    assert (again - traj[:, 1:]).abs().max() <= 1e-5


def test_n0_is_s_independent_passes(teacher):
    """With N = 0, out[:, k] is the DiT forward of input k alone at time timesteps[k] through head k."""
    s = student(teacher, 0, "M4", seed=7)       # heads and trunk all differ from the teacher's now
    x, y = inputs()
    with torch.no_grad():
        out = s(x, y)
        sd = s.state_dict()
        for k in range(S):
            one = DiT(DiTConfig.from_dict(dict(TINY.to_dict(), learn_sigma=False)))
            trunk = {n: v for n, v in sd.items() if not n.startswith("heads.")}
            head = {"final_layer." + n[len(f"heads.{k}."):]: v for n, v in sd.items() if n.startswith(f"heads.{k}.")}
            one.load_state_dict({**trunk, **head}, strict=True)
            ref = one(x[:, k], torch.full((2,), TIMES[k]), y)
            assert (out[:, k] - ref).abs().max() <= 1e-5, k


@pytest.mark.parametrize("lower,mask", [(0, "M4"), (TINY.depth, "M1"), (1, "M4")])
def test_initialised_heads_are_the_teachers_eps_channels(teacher, lower, mask):
    """A fresh student is the teacher: each head outputs the teacher's ε (first C channels) wherever
    an input sees only itself (every input for N = 0 or M1; input 0 under any mask)."""
    s = student(teacher, lower, mask)
    x, y = inputs()
    with torch.no_grad():
        out = s(x, y)
        ref = torch.stack([teacher(x[:, k], torch.full((2,), TIMES[k]), y)[:, :4] for k in range(S)], 1)
    ks = range(S) if lower == 0 or mask == "M1" else [0]
    for k in ks:
        assert (out[:, k] - ref[:, k]).abs().max() <= 1e-5, k
    if lower and mask != "M1":
        assert (out[:, S - 1] - ref[:, S - 1]).abs().max() > 1e-3   # the history does reach later inputs
    assert s.heads[0].linear.weight.shape == (2 * 2 * 4, TINY.hidden_size)
    assert all(p.requires_grad for n, p in s.named_parameters() if n != "pos_embed")


@pytest.mark.parametrize("lower", [0, 1, 2])
@pytest.mark.parametrize("mask", ["M1", "M2", "M3", "M4"])
def test_output_k_depends_on_exactly_the_inputs_the_mask_shows(teacher, mask, lower):
    """Output k reads input j iff j is reachable through `lower` masked blocks (M2's window of two
    widens by one input per block)."""
    s = student(teacher, lower, mask, seed=8)
    x, y = inputs()
    allowed = torch.eye(S, dtype=torch.bool)
    for _ in range(lower):
        allowed = (block_mask(S, mask).int() @ allowed.int()) > 0
    with torch.no_grad():
        base = s(x, y)
        for j in range(S):
            x2 = x.clone()
            x2[:, j] += 1.0
            changed = (s(x2, y) - base).flatten(2).abs().amax(-1).amax(0) > 1e-4      # [S]
            assert changed.tolist() == allowed[:, j].tolist(), j


def test_config_round_trip_and_errors():
    c = ARDConfig(TINY.to_dict(), S, 1, "causal", list(TIMES))
    assert c.mask == "M4" and c.timesteps == TIMES
    assert ARDConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="lower_layers"):
        ARDConfig(TINY.to_dict(), S, TINY.depth + 1, "M4", TIMES)
    with pytest.raises(ValueError, match="timesteps"):
        ARDConfig(TINY.to_dict(), S, 1, "M4", TIMES[:2])
    with pytest.raises(ValueError, match="unknown history mask"):
        ARDConfig(TINY.to_dict(), S, 1, "M5", TIMES)
    with pytest.raises(ValueError, match="unknown ARD config keys"):
        ARDConfig.from_dict(dict(c.to_dict(), heads=4))


def test_strict_loading_names_the_key_on_one_line(teacher, tmp_path):
    s = student(teacher, 1, "M4", seed=9)
    sd = {k: v.clone() for k, v in s.state_dict().items()}
    fresh = student(teacher, 1, "M4")
    load_ard_state_dict(fresh, sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))

    bad = {
        "heads.3.linear.bias": {k: v for k, v in sd.items() if k != "heads.3.linear.bias"},       # missing
        "heads.4.linear.bias": dict(sd, **{"heads.4.linear.bias": sd["heads.3.linear.bias"]}),    # unexpected
        "final_layer.linear.weight": dict(sd, **{"final_layer.linear.weight": sd["heads.0.linear.weight"]}),
        "heads.1.linear.weight": dict(sd, **{"heads.1.linear.weight": torch.zeros(32, 32)}),      # mis-shaped
    }
    for key, state in bad.items():
        with pytest.raises(CheckpointMismatchError) as e:
            load_ard_state_dict(student(teacher, 1, "M4"), state)
        assert key in str(e.value) and "\n" not in str(e.value)
        path = tmp_path / "bad.pt"
        torch.save(state, path)
        with pytest.raises(CheckpointMismatchError) as e:
            load_ard_student(s.config, str(path))
        assert key in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)

    path = tmp_path / "good.pt"
    torch.save(sd, path)
    loaded = load_ard_student(s.config, str(path)).eval()
    x, y = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, y), s(x, y))
    assert not loaded.pos_embed.requires_grad


def test_dit_xl2_ard_layout_loads_strictly():
    """The layout of a DiT-XL/2 ARD student with S = 4 heads: the teacher's keys with final_layer
    replaced by heads.0..3 of C = 4 channels; a state dict of that layout (zero-stride tensors, no
    memory) loads strictly."""
    xl = as_dit_config("DiT-XL/2", 256)
    config = ARDConfig(xl.to_dict(), 4, 6, "M4", (999, 749, 499, 249))
    shapes = expected_shapes(config)
    with torch.device("meta"):
        teacher_shapes = {k: v.shape for k, v in DiT(xl).state_dict().items()}
    trunk = {k: v for k, v in teacher_shapes.items() if not k.startswith("final_layer.")}
    assert {k: v for k, v in shapes.items() if not k.startswith("heads.")} == trunk
    heads = {k for k in shapes if k.startswith("heads.")}
    assert heads == {f"heads.{h}.{n}" for h in range(4)
                     for n in ("linear.weight", "linear.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")}
    assert shapes["heads.3.linear.weight"] == (16, 1152) and shapes["heads.3.adaLN_modulation.1.weight"] == (2304, 1152)
    assert teacher_shapes["final_layer.linear.weight"] == (32, 1152)
    n_params = sum(math.prod(v) for v in shapes.values())
    assert n_params == 675_129_632 - (32 * 1152 + 32 + 2304 * 1152 + 2304) + 4 * (16 * 1152 + 16 + 2304 * 1152 + 2304)

    state = {k: torch.zeros(()).expand(v) for k, v in shapes.items()}
    loaded = load_ard_student(config, state)
    assert loaded.num_steps == 4 and len(loaded.blocks) == 28
    state["heads.4.linear.bias"] = torch.zeros(()).expand(16)
    with pytest.raises(CheckpointMismatchError, match="heads.4.linear.bias"):
        load_ard_student(config, state)


def test_heads_copy_the_whole_head_of_a_teacher_without_learned_sigma():
    cfg = DiTConfig.from_dict(dict(TINY.to_dict(), learn_sigma=False))
    t = DiT(cfg)
    randomise(t, 3)
    s = build_ard_student(t, ARDConfig(cfg.to_dict(), 2, 1, "M4", (999, 499)))
    teacher_sd, sd = t.state_dict(), s.state_dict()
    for k in range(2):
        for name in ("linear.weight", "linear.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"):
            assert torch.equal(sd[f"heads.{k}.{name}"], teacher_sd[f"final_layer.{name}"])
    assert sd["heads.0.linear.weight"].data_ptr() != sd["heads.1.linear.weight"].data_ptr()     # not shared
