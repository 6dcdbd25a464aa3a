"""The shared pieces every family relies on: the generic AR loop and the checkpoint reader."""
import pytest
import torch
from torch import nn

from teachers.base import DecodeState, SamplingConfig, Teacher
from teachers.checkpoint import CheckpointMismatchError, load_strict, read_state_dict


class CountingTeacher(Teacher):
    """Step s puts all mass on token (s + sum of earlier tokens) % V: the loop must feed back tokens."""

    family = "toy"
    step_sizes = (1, 2, 3)
    num_classes = 4

    def __init__(self, V=7, C=3):
        super().__init__()
        self.register_buffer("_cb", torch.randn(V, C, generator=torch.Generator().manual_seed(0)))

    @property
    def codebook(self):
        return self._cb

    def start(self, labels, sampling, prefix=None):
        st = DecodeState(labels=labels, sampling=sampling)
        if prefix is not None:
            offs = self.step_offsets
            assert prefix.shape[1] in offs
            for s in range(offs.index(prefix.shape[1])):
                self.feed(st, prefix[:, offs[s]:offs[s + 1]])
        return st

    def step_probs(self, state):
        B, V, k = state.batch_size, self.vocab_size, self.step_sizes[state.step]
        prev = sum(int(t.sum()) for t in state.tokens)
        probs = torch.zeros(B, k, V)
        probs[:, :, (state.step + prev + state.labels[0].item()) % V] = 1
        return probs

    def feed(self, state, tokens):
        assert tokens.shape[1] == self.step_sizes[state.step]
        state.tokens.append(tokens)
        state.step += 1


def test_step_offsets_and_counts():
    t = CountingTeacher()
    assert t.num_steps == 3 and t.num_tokens == 6
    assert t.step_offsets == (0, 1, 3, 6)
    assert t.vocab_size == 7 and t.embed_dim == 3


def test_sample_is_deterministic_chain():
    t = CountingTeacher()
    labels = torch.tensor([1, 1])
    out = t.sample(labels, SamplingConfig(), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6) and out.dtype == torch.long
    # step 0: (0+0+1) % 7 = 1; fed back (batch sum 2): step 1 -> (1+2+1) % 7 = 4;
    # fed back (sum 2+16 = 18): step 2 -> (2+18+1) % 7 = 0
    assert out[0].tolist() == [1, 4, 4, 0, 0, 0]


def test_generate_with_prefix_and_stop():
    t = CountingTeacher()
    labels = torch.tensor([2])
    full = t.sample(labels)
    head = t.generate(labels, SamplingConfig(), lambda s, p: p.argmax(-1), stop_step=2)
    assert torch.equal(head, full[:, :3])
    rest = t.generate(labels, SamplingConfig(), lambda s, p: p.argmax(-1), prefix=head)
    assert torch.equal(rest, full)
    empty = t.generate(labels, SamplingConfig(), lambda s, p: p.argmax(-1), stop_step=0)
    assert empty.shape == (1, 0)


def test_read_state_dict_nesting_and_prefixes(tmp_path):
    sd = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    wrapped = {"trainer": {"ema_parameters": {"module._orig_mod." + k: v for k, v in sd.items()}},
               "epoch": 3}
    got = read_state_dict(wrapped, nesting=("trainer.ema_parameters", "trainer.var_wo_ddp"))
    assert set(got) == set(sd)
    path = tmp_path / "ck.pt"
    torch.save({"model": sd, "ema": {k: v + 1 for k, v in sd.items()}}, path)
    assert torch.equal(read_state_dict(path)["a.weight"], sd["a.weight"])
    assert torch.equal(read_state_dict(path, nesting=("ema",))["a.weight"], sd["a.weight"] + 1)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pt")


def test_unsafe_pickle_needs_opt_in(tmp_path):
    import argparse
    path = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(RuntimeError, match="weights_only=False"):
        read_state_dict(path)
    assert "w" in read_state_dict(path, weights_only=False)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("table", torch.empty(4), persistent=False)

    def reset_buffers(self, device):
        self.table = torch.arange(4.0, device=device)


def test_load_strict_meta_build_and_errors():
    src = Tiny().state_dict()
    m = load_strict(Tiny, {"model": dict(src, stale=torch.ones(1))}, ignore=("stale",))
    assert torch.equal(m.lin.weight, src["lin.weight"]) and not m.table.is_meta
    assert torch.equal(m.table, torch.arange(4.0))
    with pytest.raises(CheckpointMismatchError, match="lin.bias"):
        load_strict(Tiny, {"lin.weight": src["lin.weight"]})
    with pytest.raises(CheckpointMismatchError, match=r"lin.weight: checkpoint \(2, 4\)"):
        load_strict(Tiny, {"lin.weight": torch.zeros(2, 4), "lin.bias": src["lin.bias"]})
    with pytest.raises(CheckpointMismatchError, match="unexpected keys.*extra"):
        load_strict(Tiny, dict(src, extra=torch.ones(1)))
    bf = load_strict(Tiny, src, dtype=torch.bfloat16)
    assert bf.lin.weight.dtype == torch.bfloat16
