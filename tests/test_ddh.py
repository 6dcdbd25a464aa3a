"""DD-H, the history-conditioned DD student (student_history.py): the lower layers' mask is the
specified one, a fresh DD-H (history gates closed) computes today's student, the gate mixes the
own-block and the full softmax per head, teacher-forced and cached sequential outputs agree, the gates
learn and load strictly, and `dd train --history` / `dd sample` run end to end."""
import pytest
import torch

from distilled_decoding.dataset_build import build_dataset
from distilled_decoding.dd_loss import dd_h_loss
from distilled_decoding.history_mask import history_mask
from distilled_decoding.flowmap import FlowMapConfig
from distilled_decoding.samplers import dd_sample
from distilled_decoding.schedule import make_xt
from distilled_decoding.student import build_backbone_loaded, build_student
from distilled_decoding.student_history import GATE, HistoryAttention, gate
from distilled_decoding.student_run import load_run
from distilled_decoding.teacher_spec import resolve_sampling
from distilled_decoding.train import TrainArgs, train
from teachers.checkpoint import CheckpointMismatchError
from teachers.llamagen import Attention
from teachers.var import SelfAttention

TIMESTEPS = {"llamagen": (1, 5, 9, 13), "var": (1, 2, 3)}
DEPTH = 2          # both tiny teachers have 2 layers


def _trajectory(student, ts, B=3, seed=0):
    """(xs [B, K, n, C] = X_{t_k} from one noise and one token draw, labels [B])."""
    g = torch.Generator().manual_seed(seed)
    n, C = student.num_tokens, student.config.codebook_dim
    noise = torch.randn(B, n, C, generator=g)
    tokens = torch.randint(0, student.config.vocab_size, (B, n), generator=g)
    data = student.codebook[tokens]
    xs = torch.stack([make_xt(data, noise, torch.full((B,), t), student.step_offsets) for t in ts], 1)
    return xs, torch.randint(0, 10, (B,), generator=g), noise, tokens


def _sees(kind, k, j):
    return j == k or (kind == "noise" and j == 0) or (kind == "all" and j < k)


@pytest.mark.parametrize("kind", ["none", "noise", "all"])
def test_lower_layer_mask_is_the_specified_one(tiny_teacher, kind):
    """Token (k, a) attends to token (j, b) iff j == k and the family's own mask lets a see b
    (LlamaGen causal incl. the class slot; VAR earlier scales or itself), or j < k is a history
    block of `kind` (noise: j = 0; all: every j < k), where every slot is visible."""
    _, teacher = tiny_teacher
    ts = TIMESTEPS[teacher.family]
    spec = build_student(teacher, ts, history=kind, lower_layers=1).history
    K, L = len(ts), spec.block_len
    if teacher.family == "llamagen":
        own = torch.ones(L, L).tril().bool()
    else:
        lv = torch.tensor([0] + [1 + s for s, k in enumerate(teacher.step_sizes) for _ in range(k)])
        own = (lv[:, None] > lv[None, :]) | torch.eye(L, dtype=torch.bool)
    want = torch.zeros(K * L, K * L, dtype=torch.bool)
    for k in range(K):
        for j in range(K):
            if _sees(kind, k, j):
                want[k * L:(k + 1) * L, j * L:(j + 1) * L] = own if j == k else True
    assert torch.equal(spec.mask, want)
    for k in range(K):    # the cached step's rows: the visible earlier blocks, then its own
        vis = [j for j in range(K) if _sees(kind, k, j)]
        cols = torch.cat([torch.arange(j * L, (j + 1) * L) for j in vis])
        assert torch.equal(spec.step_mask(k), want[k * L:(k + 1) * L][:, cols])
        assert spec.earlier(k) == vis[:-1]


def _gates(ddh):
    """{layer: alpha [H]} of the gated lower layers."""
    return {int(name.split(".")[1]): p for name, p in ddh.backbone.named_parameters() if name.endswith(GATE)}


@pytest.mark.parametrize("kind", ["none", "noise", "all"])
def test_fresh_ddh_computes_todays_student(tiny_teacher, kind):
    """Zero step embedding and zero history gates: a fresh DD-H equals the plain student of the same
    seed (≤ 1e-6) for every kind, N and block, teacher-forced and cached sequential; the gates sit in
    the lower layers that can see history (none for --history none)."""
    _, teacher = tiny_teacher
    ts = TIMESTEPS[teacher.family]
    plain = build_student(teacher, ts, seed=3).eval()
    # a plain student (and every run saved before DD-H) has no DD-H options, step embedding or gate
    assert "history" not in plain.config.options and not hasattr(plain.backbone, "step_embed") and not _gates(plain)
    xs, labels, _, _ = _trajectory(plain, ts)
    with torch.no_grad():
        ref = [plain(xs[:, k], labels, torch.full((3,), t)) for k, t in enumerate(ts)]
    for n_lower in (0, 1, DEPTH):
        ddh = build_student(teacher, ts, seed=3, history=kind, lower_layers=n_lower).eval()
        gates = _gates(ddh)
        assert sorted(gates) == ([] if kind == "none" else list(range(n_lower)))
        assert not ddh.backbone.step_embed.any() and all(g.shape == (2,) and not g.any() for g in gates.values())
        with torch.no_grad():
            logits, emb = ddh.forward_blocks(xs, labels, ts)
            cache = ddh.new_history()
            for k, t in enumerate(ts):
                lk, ek = ddh(xs[:, k], labels, torch.full((3,), t), history=cache)
                for got in ((logits[:, k], emb[:, k]), (lk, ek)):
                    err = max((got[0] - ref[k][0]).abs().max().item(), (got[1] - ref[k][1]).abs().max().item())
                    assert err <= 1e-6, (kind, n_lower, k, err)


def _perturb(ddh, seed=2):
    """Off the initialisation: every weight moved (the tiny VAR's AdaLN mutes attention at init), the
    step embedding and the gates' alpha random (g = tanh(alpha) ~ ±0.6)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ddh.named_parameters():
            if name.endswith("step_embed"):
                p.normal_(0, 0.3, generator=g)
            elif name.endswith(GATE):
                p.normal_(0, 1.0, generator=g)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["none", "noise", "all"])
def test_teacher_forced_equals_cached_sequential(tiny_teacher, kind):
    """One forward over the K blocks = K cached sampling steps (≤ 1e-5), with the gates open and the
    weights and step embedding off their initialisation (so the history is read: without it block 1
    differs from the history-free forward); and dd_sample's DD-H path runs those cached steps."""
    _, teacher = tiny_teacher
    ts = TIMESTEPS[teacher.family]
    for n_lower in (0, 1, DEPTH):
        ddh = build_student(teacher, ts, seed=1, history=kind, lower_layers=n_lower).eval()
        _perturb(ddh)
        with torch.no_grad():
            xs, labels, _, _ = _trajectory(ddh, ts)
            plain = ddh(xs[:, 1], labels, torch.full((3,), ts[1]))[0]    # the same weights, no history
            ddh.backbone.step_embed[1].zero_()          # (the history-free forward has no step embedding)
            read = (plain - ddh.forward_blocks(xs, labels, ts)[0][:, 1]).abs().max().item()
            assert read <= 1e-5 if kind == "none" or n_lower == 0 else read > 1e-3, (n_lower, read)
            _perturb(ddh)
            logits, emb = ddh.forward_blocks(xs, labels, ts)
            cache = ddh.new_history()
            for k, t in enumerate(ts):
                lk, ek = ddh(xs[:, k], labels, torch.full((3,), t), history=cache)
                assert (lk - logits[:, k]).abs().max() <= 1e-5 and (ek - emb[:, k]).abs().max() <= 1e-5, (n_lower, k)
            with pytest.raises(ValueError, match="trained for"):
                ddh(xs[:, 0], labels, torch.full((3,), 1), history=cache)
    x, idx = dd_sample(ddh, xs[:, 0], labels, ts[:2])
    assert x.shape == xs[:, 0].shape and idx.shape == x.shape[:2]
    with pytest.raises(ValueError, match="prefix"):
        dd_sample(ddh, xs[:, 0], labels, ts[1:])


@pytest.mark.parametrize("kind", ["noise", "all"])
def test_gated_attention_mixes_own_and_full_softmax(tiny_teacher, kind):
    """A gated lower layer's attention is the teacher's attention module (its own code) under the own
    mask (each block its own keys, `within`) at g = 0, under the specified DD-H mask at g = 1 exactly
    (alpha = 10: tanh rounds to 1 in fp32), (1 − c)·own + c·full at a common g = c, and its heads are
    gated one by one (each head's gate moves that head's part of full − own)."""
    _, teacher = tiny_teacher
    ts = TIMESTEPS[teacher.family]
    ddh = build_student(teacher, ts, seed=1, history=kind, lower_layers=1).eval()
    _perturb(ddh)
    spec = ddh.history
    K, L = len(ts), spec.block_len
    own_mask = history_mask(K, L, "none", spec.within)
    assert gate(torch.tensor(10.0)) == 1.0
    if teacher.family == "llamagen":
        att = ddh.backbone.layers[0].attention
        rope = ddh.backbone.freqs_cis[:L].repeat(K, 1, 1)
        x = torch.randn(2, K * L, att.wo.weight.shape[0], generator=torch.Generator().manual_seed(0))
        call = lambda hist: att(x, rope, None, hist)                                          # noqa: E731
        teacher_attention = lambda mask: Attention.forward(att, x, rope, mask)                # noqa: E731
    else:
        att = ddh.backbone.blocks[0].attn
        x = torch.randn(2, K * L, att.proj.weight.shape[0], generator=torch.Generator().manual_seed(0))
        call = lambda hist: att(x, cache=hist)                                                # noqa: E731
        teacher_attention = lambda mask: SelfAttention.forward(                               # noqa: E731
            att, x, attn_bias=torch.where(mask, 0.0, -torch.inf)[None, None])
    alpha = att.history_gate
    with torch.no_grad():
        own, full = teacher_attention(own_mask), teacher_attention(spec.mask)
        assert (full - own).abs().max() > 1e-3                      # the history is there to read
        for a, c in ((0.0, 0.0), (10.0, 1.0), (float(torch.atanh(torch.tensor(0.3))), 0.3)):
            alpha.fill_(a)
            got = call(HistoryAttention(spec, 0, L))
            assert (got - ((1 - c) * own + c * full)).abs().max() <= 1e-5, (a, c)
        parts = []
        for h in range(len(alpha)):
            alpha.zero_()
            alpha[h] = 10.0
            parts.append(call(HistoryAttention(spec, 0, L)) - own)
            assert (parts[-1] - (full - own)).abs().max() > 1e-4    # one head is not the whole
        assert (own + sum(parts) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["noise", "all"])
def test_gates_learn_and_load_strictly(tiny_teacher, kind):
    """dd_h_loss sends a gradient to every gate of a fresh DD-H (slope 1 at alpha = 0); a state dict
    without the gates does not load (missing keys named), one with them does."""
    _, teacher = tiny_teacher
    ts = TIMESTEPS[teacher.family]
    ddh = build_student(teacher, ts, history=kind, lower_layers=DEPTH)
    _, labels, noise, tokens = _trajectory(ddh, ts, B=4)
    loss, _ = dd_h_loss(ddh, noise, tokens, labels, ts, codebook=ddh.codebook, step_offsets=ddh.step_offsets)
    loss.backward()
    gates = _gates(ddh)
    assert len(gates) == DEPTH and all(float(p.grad.abs().min()) > 0 for p in gates.values()), \
        {i: p.grad for i, p in gates.items()}
    state = ddh.backbone.state_dict()
    again = build_backbone_loaded(ddh.config, state)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(2\): .*history_gate"):
        build_backbone_loaded(ddh.config, {k: v for k, v in state.items() if not k.endswith(GATE)})


@pytest.mark.parametrize("tiny_teacher", ["llamagen"], indirect=True)
def test_train_history_cli_run_loads_and_samples(tiny_teacher, tmp_path):
    """`dd train --history all --lower-layers 1`: the loss is the K blocks' DD losses (gradient
    reaches the step embedding), the run records the options, load_run rebuilds a DD-H student."""
    spec, teacher = tiny_teacher
    ts = TIMESTEPS["llamagen"]
    ddh = build_student(teacher, ts, history="all", lower_layers=1)
    _, labels, noise, tokens = _trajectory(ddh, ts, B=4)
    loss, parts = dd_h_loss(ddh, noise, tokens, labels, ts, codebook=ddh.codebook, step_offsets=ddh.step_offsets)
    loss.backward()
    assert ddh.backbone.step_embed.grad.abs().sum() > 0 and parts["ce"].shape == (4,)
    assert ddh.backbone.layers[0].attention.history_gate.grad.abs().sum() > 0

    data = tmp_path / "pairs"
    build_dataset(str(data), teacher, spec, num_samples=64, sampling=resolve_sampling(teacher),
                  fm_config=FlowMapConfig(nfe=2), seed=0, shard_size=64, batch_size=64,
                  show_progress=False, log=lambda s: None)
    out = tmp_path / "run"
    args = TrainArgs(data=str(data), out=str(out), timesteps=ts, batch_size=8, max_steps=2, ckpt_every=2,
                     num_workers=0, device="cpu", progress=False, history="all", lower_layers=1)
    train(args, log=lambda s: None)
    student, info = load_run(str(out))
    assert info["student"]["options"] == {"history": "all", "lower_layers": 1, "history_steps": 4}
    assert student.history is not None and student.history.lower == 1
    x, _ = dd_sample(student, noise[:2], labels[:2], ts)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="--lower-layers"):
        build_student(teacher, ts, history="all", lower_layers=3)
