"""DD-H, the history-conditioned DD student (student_history.py): the lower layers' mask is the
specified one, a fresh DD-H computes today's student where it has no history to read, teacher-forced
and cached sequential outputs agree, and `dd train --history` / `dd sample` run end to end."""
import pytest
import torch

from distilled_decoding.dataset_build import build_dataset
from distilled_decoding.dd_loss import dd_h_loss
from distilled_decoding.flowmap import FlowMapConfig
from distilled_decoding.samplers import dd_sample
from distilled_decoding.schedule import make_xt
from distilled_decoding.student import build_student
from distilled_decoding.student_run import load_run
from distilled_decoding.teacher_spec import resolve_sampling
from distilled_decoding.train import TrainArgs, train

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


@pytest.mark.parametrize("kind", ["none", "noise", "all"])
def test_fresh_ddh_computes_todays_student_without_history(tiny_teacher, kind):
    """Zero step embedding: with nothing to read (block 0, --history none, --lower-layers 0) a fresh
    DD-H equals the plain student of the same seed (≤ 1e-6); with history it does read it."""
    _, teacher = tiny_teacher
    ts = TIMESTEPS[teacher.family]
    plain = build_student(teacher, ts, seed=3).eval()
    # a plain student (and every run saved before DD-H) has no DD-H options and no step embedding
    assert "history" not in plain.config.options and not hasattr(plain.backbone, "step_embed")
    xs, labels, _, _ = _trajectory(plain, ts)
    ref = [plain(xs[:, k], labels, torch.full((3,), t)) for k, t in enumerate(ts)]
    for n_lower in (0, 1, DEPTH):
        ddh = build_student(teacher, ts, seed=3, history=kind, lower_layers=n_lower).eval()
        assert not ddh.backbone.step_embed.any()
        with torch.no_grad():
            logits, emb = ddh.forward_blocks(xs, labels, ts)
        for k in range(len(ts)):
            err = max((logits[:, k] - ref[k][0]).abs().max().item(), (emb[:, k] - ref[k][1]).abs().max().item())
            if k == 0 or kind == "none" or n_lower == 0:
                assert err <= 1e-6, (kind, n_lower, k, err)
            elif teacher.family == "llamagen":   # the random tiny VAR's history moves outputs by only ~1e-7
                assert err > 1e-3, (kind, n_lower, k, err)


@pytest.mark.parametrize("kind", ["none", "noise", "all"])
def test_teacher_forced_equals_cached_sequential(tiny_teacher, kind):
    """One forward over the K blocks = K cached sampling steps (≤ 1e-5), off the initialisation (so
    the history is read: without it block 1 differs from the history-free forward); and dd_sample's
    DD-H path runs those cached steps."""
    _, teacher = tiny_teacher
    ts = TIMESTEPS[teacher.family]
    for n_lower in (0, 1, DEPTH):
        ddh = build_student(teacher, ts, seed=1, history=kind, lower_layers=n_lower).eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            for name, p in ddh.named_parameters():   # off the init (the tiny VAR's AdaLN mutes attention)
                if not name.endswith("step_embed"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
            xs, labels, _, _ = _trajectory(ddh, ts)
            plain = ddh(xs[:, 1], labels, torch.full((3,), ts[1]))[0]    # the same weights, no history
            read = (plain - ddh.forward_blocks(xs, labels, ts)[0][:, 1]).abs().max().item()
            assert read <= 1e-5 if kind == "none" or n_lower == 0 else read > 1e-3, (n_lower, read)
            ddh.backbone.step_embed.normal_(0, 0.3, generator=g)
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
