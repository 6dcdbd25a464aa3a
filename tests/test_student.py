"""The DD student and `dd train`: shapes and masks, initialisation from the teacher (provable
statements), parity with the released DD students, the released key layouts, training (loss drop,
exact resume, gradient accumulation, 2-rank DDP) and run directories.

Tiny random teachers of both families; their weights live in checkpoint files so that the data sets
(and CLI subprocesses) load exactly the teachers the in-process checks use.
"""
import json
import os
import sys
from pathlib import Path

import click
import pytest
import torch

from distilled_decoding.dataset_build import build_dataset
from distilled_decoding.demo import run_dd as demo_run_dd
from distilled_decoding.flowmap import FlowMapConfig, nearest_code
from distilled_decoding.dd_loss import dd_loss
from distilled_decoding.errors import DDError
from distilled_decoding.samplers import dd_step
from distilled_decoding.schedule import default_schedule, make_xt
from distilled_decoding.student import DDStudent, StudentConfig, build_student
from distilled_decoding.student_official import load_official
from distilled_decoding.student_run import load_run, save_run
from distilled_decoding.student_var import dd_attn_bias
from distilled_decoding.teacher_spec import TeacherSpec, resolve_sampling
from distilled_decoding.seeding import sample_timestep
from distilled_decoding.train import TrainArgs, train
from teachers.checkpoint import CheckpointMismatchError
from teachers.var import level_ids
from tiny_teachers import TINY

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = json.loads((ROOT / "tests" / "manifests" / "dd_official.json").read_text())
FIXTURE = ROOT / "tests" / "fixtures" / "dd_official_tiny.pt"

NUM_PAIRS = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_teachers):
    """family -> (spec, teacher, data dir) of a tiny random teacher and a small pair data set."""
    def token_table_in_codebook_span(t):
        # LlamaGen: a token table in the span of [codebook, 1] makes the least-squares init exact
        g = torch.Generator().manual_seed(1)
        M, c = torch.randn(4, 32, generator=g) * 0.3, torch.randn(32, generator=g) * 0.05
        t.gpt.tok_embeddings.weight.data = t.codebook @ M + c

    out = {}
    for family in TINY:
        d = tmp_path_factory.mktemp(family)
        edit = token_table_in_codebook_span if family == "llamagen" else None
        spec, teacher = tiny_teachers(family, edit=edit, tag="token-table-in-codebook-span" if edit else None)
        data = d / "pairs"
        build_dataset(str(data), teacher, spec, num_samples=NUM_PAIRS, sampling=resolve_sampling(teacher),
                      fm_config=FlowMapConfig(nfe=4), seed=0, shard_size=64, batch_size=64,
                      show_progress=False, log=lambda s: None)
        out[family] = (spec, teacher, str(data))
    return out


def args_for(data, out, **kw):
    a = dict(data=data, out=str(out), batch_size=8, max_steps=4, log_every=1, ckpt_every=100, num_workers=0,
             lr=1e-3, progress=False, device="cpu", ema_decay=0.9)
    a.update(kw)
    return TrainArgs(**a)


def metrics(run) -> list:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# ---- schedule and shapes -------------------------------------------------------------------------
def test_default_schedule_paper_and_scaled():
    from teachers.llamagen import GPTConfig
    from teachers.var import PRESETS
    assert default_schedule("llamagen", GPTConfig.preset("GPT-B").to_dict(), 256) == ((1, 81), 80)
    assert default_schedule("llamagen", GPTConfig.preset("GPT-L").to_dict(), 256) == ((1, 81), 130)
    assert default_schedule("var", PRESETS["d16"].to_dict(), 10) == ((1, 6), 5)
    assert default_schedule("var", PRESETS["d20"].to_dict(), 10) == ((1, 5), 4)
    assert default_schedule("llamagen", TINY["llamagen"][0], 16) == ((1, 6), 5)
    assert default_schedule("var", TINY["var"][0], 3) == ((1, 3), 2)


@pytest.mark.parametrize("family", sorted(TINY))
def test_forward_shapes_make_xt_and_dd_step(tiny, family):
    _, teacher, _ = tiny[family]
    s = build_student(teacher).eval()
    B, n, C, V = 3, teacher.num_tokens, teacher.embed_dim, teacher.vocab_size
    assert s.step_offsets == teacher.step_offsets and s.num_tokens == n
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, n), generator=g)
    noise = torch.randn(B, n, C, generator=g)
    t = torch.tensor([1, 2, teacher.num_steps])
    x = make_xt(s.codebook[tokens], noise, t, s.step_offsets)
    for b in range(B):
        k = s.step_offsets[int(t[b]) - 1]
        assert torch.equal(x[b, :k], s.codebook[tokens[b, :k]]) and torch.equal(x[b, k:], noise[b, k:])
    labels = torch.tensor([0, 4, 9])
    logits, emb = s(x, labels, t)
    assert logits.shape == (B, n, V) and emb.shape == (B, n, C)
    assert logits.dtype == emb.dtype == torch.float32
    x_next, idx = dd_step(s, x, labels, t)
    assert x_next.shape == (B, n, C) and idx.shape == (B, n) and idx.dtype == torch.int64
    keep = s.data_mask(t)
    assert torch.equal(x_next[keep], x[keep])                          # data positions kept
    below = torch.arange(n) < s.step_offsets[s.config.split]
    pred = ~keep & below[None]
    assert torch.equal(x_next[pred], s.codebook[logits.argmax(-1)][pred])   # greedy logits head
    emb_pos = ~keep & ~below[None]
    assert torch.equal(x_next[emb_pos], emb[emb_pos])                       # unsnapped embedding head
    assert torch.equal(idx, nearest_code(x_next.reshape(-1, C), s.codebook).view(B, n))
    snapped, _ = dd_step(s, x, labels, t, snap=True)
    assert torch.equal(snapped, s.codebook[nearest_code(snapped.reshape(-1, C), s.codebook)].view(B, n, C))
    with pytest.raises(ValueError):
        s(x, labels, torch.tensor([0, 1, 1]))


def test_prefix_mask_and_the_backbone_registry(tiny):
    """One prefix rule (steps -> leading tokens) and a class registry whose entries meet the protocol."""
    from distilled_decoding.schedule import prefix_mask
    from distilled_decoding.student_backbones import BACKBONES, StudentBackbone
    offs = (0, 1, 5, 14)                                       # steps of 1, 4 and 9 tokens
    m = prefix_mask(offs, torch.tensor([0, 1, 2, 3, 1]), 14)
    for row, k in zip(m, (0, 1, 5, 14, 1)):
        assert torch.equal(row, torch.arange(14) < k)
    assert sorted(BACKBONES) == sorted(TINY)
    for family in TINY:
        s = build_student(tiny[family][1])
        assert type(s.backbone) is BACKBONES[family] and isinstance(s.backbone, StudentBackbone)
        t = torch.arange(1, s.num_steps + 2)
        assert torch.equal(s.data_mask(t), prefix_mask(s.step_offsets, t - 1, s.num_tokens))


def _changed(s, x, labels, t, j, scale=3.0):
    """[n] bool: which outputs (logits or emb) move when input token j is perturbed."""
    with torch.no_grad():
        lo, em = s(x, labels, t)
        x2 = x.clone()
        x2[:, j] += scale
        lo2, em2 = s(x2, labels, t)
    return ((lo2 - lo).abs().amax((0, 2)) > 1e-6) | ((em2 - em).abs().amax((0, 2)) > 1e-6)


def test_llamagen_mask_is_causal(tiny):
    s = build_student(tiny["llamagen"][1]).eval()
    n = s.num_tokens
    x, labels, t = torch.randn(2, n, 4), torch.tensor([1, 2]), torch.tensor([1, 5])
    for j in (0, 5, n - 1):
        ch = _changed(s, x, labels, t, j)
        assert not ch[:j].any() and ch[j:].all(), (j, ch)


def test_var_mask_strictly_earlier_scales_plus_self(tiny):
    s = build_student(tiny["var"][1]).eval()
    with torch.no_grad():          # the teacher's AdaLN gammas start at ~1e-5: make every path visible
        for b in s.backbone.blocks:
            b.ada_lin[1].bias.fill_(0.5)
    offs = s.step_offsets                                             # (0, 1, 5, 14)
    lv = level_ids(TINY["var"][0]["patch_nums"])                     # teacher scale of each token
    x, labels, t = torch.randn(2, s.num_tokens, 4), torch.tensor([1, 2]), torch.tensor([1, 2])
    for j in (0, 2, 6, 13):
        ch = _changed(s, x, labels, t, j)
        expect = (lv > lv[j]) | (torch.arange(s.num_tokens) == j)
        assert torch.equal(ch, expect), (j, ch, expect)
    # the buffer itself: level(q) > level(k) or q == k, over 1 + n slots (start slot at level 0)
    levels = level_ids((1,) + tuple(TINY["var"][0]["patch_nums"]))
    bias = s.backbone.attn_bias_for_masking[0, 0]
    see = bias == 0
    assert torch.equal(see, (levels[:, None] > levels[None, :]) | torch.eye(len(levels), dtype=torch.bool))
    assert offs[-1] + 1 == bias.shape[0]


# ---- initialisation from the teacher -------------------------------------------------------------
def test_llamagen_init_reproduces_teacher_logits(tiny):
    """Type embedding zeroed, every token data: student output i (slot i + 1, token i's RoPE cell) is the
    teacher's logits for token i + 1, because the least-squares tok_embeddings reproduce the teacher's
    table exactly when it lies in the span of [codebook, 1], and everything else is the teacher's."""
    _, teacher, _ = tiny["llamagen"]
    s = build_student(teacher).eval()
    gpt, net = teacher.gpt, s.backbone
    for name in ("cls_embedding", "layers", "norm", "output"):
        for (k, a), (_, b) in zip(getattr(net, name).state_dict().items(), getattr(gpt, name).state_dict().items()):
            assert torch.equal(a, b), f"{name}.{k}"
    torch.testing.assert_close(net.tok_embeddings(s.codebook), gpt.tok_embeddings.weight, rtol=0, atol=1e-5)
    with torch.no_grad():
        net.n_d_embed.weight.zero_()
        g = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, 64, (3, s.num_tokens), generator=g)
        labels = torch.tensor([0, 3, 10])                              # 10 = the null class row
        t = torch.full((3,), s.num_steps + 1)                          # all data
        logits, _ = s(s.codebook[tokens], labels, t)
        ref = teacher.logits(labels, tokens)                           # row i predicts token i
    torch.testing.assert_close(logits[:, :-1], ref[:, 1:], rtol=0, atol=1e-4)


def test_var_init_weight_mapping_and_start_slot(tiny):
    """Every reused tensor is the teacher's (lvl/pos rows shifted by one after row 0, class 1 untouched),
    and, with the type embeddings zeroed: (a) the start slot reproduces the teacher's first-scale logits
    exactly (both masks let slot 0 see only itself, its input is the teacher's start token); (b) the
    whole student is the teacher's blocks and heads run on [start, word_embed(x)] + the shifted
    level/position tables under the DD mask."""
    _, teacher, _ = tiny["var"]
    var = teacher.var
    s = build_student(teacher).eval()
    net = s.backbone
    tsd = var.state_dict()
    for k, v in net.state_dict().items():
        if k in ("pos_1LC", "lvl_embed.weight"):
            continue
        if k in tsd:
            assert torch.equal(v, tsd[k]), k
    for mine, theirs in ((net.lvl_embed.weight[None], var.lvl_embed.weight[None]), (net.pos_1LC, var.pos_1LC)):
        assert torch.equal(mine[:, 0], theirs[:, 0]) and torch.equal(mine[:, 2:], theirs[:, 1:])
        assert not torch.equal(mine[:, 1], theirs[:, 0])               # the new first token's row is fresh
    assert torch.equal(net.class_emb.weight, var.class_emb.weight)    # (the release clobbers class 1)

    with torch.no_grad():
        net.n_d_embed.weight.zero_()
        for lin in net.layerwise_n_d_embed:
            lin.bias.zero_()
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, 64, (2, s.num_tokens), generator=g)
        labels = torch.tensor([1, 7])
        x = torch.randn(2, s.num_tokens, 4, generator=g)
        t = torch.tensor([1, 2])
        h, cond = net.hidden(x, labels, s.data_mask(t))
        start_logits = net.head(net.head_nm(h[:, :1], cond)).float()
        torch.testing.assert_close(start_logits, teacher.logits(labels, tokens)[:, :1], rtol=0, atol=1e-5)

        levels = level_ids((1,) + tuple(var.patch_nums))
        lvl = torch.cat([var.lvl_embed.weight[:1], net.lvl_embed.weight[1:2], var.lvl_embed.weight[1:]])
        pos = torch.cat([var.pos_1LC[:, :1], net.pos_1LC[:, 1:2], var.pos_1LC[:, 1:]], dim=1)
        cond_t = var.class_emb(labels)
        seq = torch.cat([cond_t[:, None] + var.pos_start, var.word_embed(x)], dim=1) + lvl[levels] + pos
        ref = var.get_logits(var.hidden(seq, cond_t, attn_bias=dd_attn_bias(levels)), cond_t)[:, 1:]
        logits, _ = s(x, labels, t)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


# ---- the released layout and numerics --------------------------------------------------------------
@pytest.mark.parametrize("name,family,preset,C", [("LlamaGen-DD-B", "llamagen", "GPT-B", 8),
                                                   ("LlamaGen-DD-L", "llamagen", "GPT-L", 8),
                                                   ("VAR-DD-d16", "var", "d16", 32)])
def test_official_layout_manifests(name, family, preset, C):
    from distilled_decoding.student_backbones import backbone_class
    from teachers.llamagen import GPTConfig
    from teachers.var import PRESETS
    ref = MANIFEST[name]
    model = GPTConfig.preset(preset).to_dict() if family == "llamagen" else PRESETS[preset].to_dict()
    with torch.device("meta"):
        net = backbone_class(family).build(model, C)
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    expected = {k: v for k, v in ref["keys"].items() if k not in ref["buffers"]}
    assert got == expected
    assert sum(p.numel() for p in net.parameters()) == ref["num_elements"]


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("family", sorted(TINY))
def test_load_official_matches_released_forward(official, tmp_path, family):
    """Released key layout and nesting, strict load, and forward parity with the released code
    (fixture from tools/dd_parity_fixture.py; the release's t is ours minus one)."""
    fx = official[family]
    cfg, tok_cfg, _ = TINY[family]
    assert fx["config"] == cfg
    teacher = TeacherSpec(family, cfg, tokenizer_config=tok_cfg).load("cpu")
    sd = fx["state_dict"]
    nest = {"ema": sd, "model": {}} if family == "llamagen" else {"trainer": {"ema_parameters": sd, "var_wo_ddp": {}}}
    path = tmp_path / "released.pt"
    torch.save(nest, path)
    s = load_official(str(path), teacher)
    assert s.config.timesteps == default_schedule(family, cfg, teacher.num_steps)[0]
    with torch.no_grad():
        logits, emb = s(fx["x"], fx["labels"], fx["t_code"] + 1)
    torch.testing.assert_close(logits, fx["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(emb, fx["emb"], rtol=0, atol=1e-5)
    # strict: a missing tensor is an error, not silently random memory
    bad = dict(sd)
    bad.pop("n_d_embed.weight")
    raw = {"model": bad} if family == "llamagen" else {"trainer": {"var_wo_ddp": bad}}
    torch.save(raw, path)
    with pytest.raises(CheckpointMismatchError, match="n_d_embed.weight"):
        load_official(str(path), teacher, ema=False)


# ---- runs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TINY))
def test_save_run_load_run_round_trip(tiny, tmp_path, family):
    spec, teacher, _ = tiny[family]
    s = build_student(teacher, timesteps=(1, 2), split=1, seed=5)
    ema = build_student(teacher, seed=6)
    save_run(str(tmp_path), s, ema.backbone.state_dict(), s.config, {"teacher": spec.to_dict()})
    info = json.loads((tmp_path / "config.json").read_text())
    assert TeacherSpec.from_dict(info["teacher"]) == spec
    assert StudentConfig.from_dict(info["student"]) == s.config
    x, labels, t = torch.randn(2, s.num_tokens, 4), torch.tensor([1, 2]), torch.tensor([1, 2])
    for use_ema, ref in ((True, ema), (False, s)):
        got, run_info = load_run(str(tmp_path), "cpu", ema=use_ema)
        assert isinstance(got, DDStudent) and got.config == s.config and run_info["teacher"] == info["teacher"]
        assert torch.equal(got.codebook, s.codebook)
        with torch.no_grad():
            for a, b in zip(got(x, labels, t), ref.eval()(x, labels, t)):
                assert torch.equal(a, b)


def test_timestep_draws_are_uniform_and_keyed_by_position():
    ts = (1, 81)
    draws = [sample_timestep(ts, 0, 0, i) for i in range(4000)]
    assert set(draws) == {1, 81} and abs(draws.count(1) / 4000 - 0.5) < 0.03
    assert draws[:50] != [sample_timestep(ts, 0, 1, i) for i in range(50)]       # epoch matters
    assert draws[:50] == [sample_timestep(ts, 0, 0, i) for i in range(50)]


def test_weighted_timestep_draws():
    ts = (1, 21)
    draws = [sample_timestep(ts, 0, 0, i, (3, 1)) for i in range(4000)]
    assert abs(draws.count(1) / 4000 - 0.75) < 0.03
    uniform = [sample_timestep(ts, 5, 2, i) for i in range(200)]
    assert [sample_timestep(ts, 5, 2, i, (1, 1)) for i in range(200)] == uniform     # weights of 1: the same draw
    for bad in ((3,), (1, 0)):
        with pytest.raises(ValueError, match="positive integer per timestep"):
            sample_timestep(ts, 0, 0, 0, bad)


def test_timestep_weights_are_recorded_kept_on_resume_and_checked(tiny, tmp_path):
    """A run drawn 3:1 records its weights, a resume without the flag keeps them (identical losses to an
    uninterrupted run), a resume with other weights is refused, and weights that do not fit the
    timesteps are refused before any step."""
    _, _, data = tiny["llamagen"]
    kw = dict(timesteps=(1, 3), timestep_weights=(3, 1))
    train(args_for(data, tmp_path / "a", max_steps=10, **kw), log=lambda s: None)
    train(args_for(data, tmp_path / "b", max_steps=6, ckpt_every=6, **kw), log=lambda s: None)
    with pytest.raises(ValueError, match="timestep_weights"):
        train(args_for(data, tmp_path / "b", max_steps=10, timestep_weights=(1, 1), resume=True), log=lambda s: None)
    train(args_for(data, tmp_path / "b", max_steps=10, resume=True), log=lambda s: None)
    assert [m["loss"] for m in metrics(tmp_path / "a")] == [m["loss"] for m in metrics(tmp_path / "b")]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"]["timestep_weights"] == [3, 1]
    uniform = train(args_for(data, tmp_path / "u", max_steps=10, timesteps=(1, 3)), log=lambda s: None)
    assert uniform["loss"] != metrics(tmp_path / "a")[-1]["loss"]      # the weights change the stream
    for bad, msg in ((dict(timestep_weights=(1, 2, 3)), "one positive integer per"),
                     (dict(timestep_weights=(3, 1), history="all"), "DD-H")):
        with pytest.raises(ValueError, match=msg):
            train(args_for(data, tmp_path / "c", max_steps=2, timesteps=(1, 3), **bad), log=lambda s: None)
        assert not (tmp_path / "c" / "checkpoints").exists()


@pytest.mark.parametrize("family", sorted(TINY))
def test_training_cuts_the_loss(tiny, tmp_path, family):
    _, _, data = tiny[family]
    last = train(args_for(data, tmp_path / "run", batch_size=16, max_steps=150, lr=3e-3, ema_decay=0.99,
                          ckpt_every=150), log=lambda s: None)
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    first, final = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    print(f"{family}: loss {first:.4f} -> {final:.4f} (ratio {final / first:.3f}); ce {last['ce']:.3f}, emb {last['emb']:.4f}")
    assert final < 0.35 * first
    run = tmp_path / "run"
    for f in ("config.json", "student.safetensors", "student_raw.safetensors", "codebook.safetensors", "curves.png"):
        assert (run / f).exists(), f
    info = json.loads((run / "config.json").read_text())
    assert info["step"] == 150 and info["train"]["emb_loss"] == "mse" and info["data"]["num_samples"] == NUM_PAIRS
    s, _ = load_run(str(run))
    assert s.config.timesteps == default_schedule(family, TINY[family][0], s.num_steps)[0]


@pytest.mark.parametrize("family", sorted(TINY))
def test_resume_gives_identical_next_losses(tiny, tmp_path, family):
    _, _, data = tiny[family]
    # 20 steps of 8 over 128 pairs: the stream crosses an epoch boundary after step 16
    train(args_for(data, tmp_path / "a", max_steps=20, ckpt_every=100), log=lambda s: None)
    train(args_for(data, tmp_path / "b", max_steps=12, ckpt_every=6), log=lambda s: None)
    with pytest.raises(DDError, match="--out .*--resume"):      # a fresh run never writes into an old one
        train(args_for(data, tmp_path / "b", max_steps=20), log=lambda s: None)
    with pytest.raises(ValueError, match="batch_size"):
        train(args_for(data, tmp_path / "b", max_steps=20, batch_size=4, resume=True), log=lambda s: None)
    train(args_for(data, tmp_path / "b", max_steps=20, ckpt_every=6, resume=True), log=lambda s: None)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 21))
    for ma, mb in zip(a, b):
        assert (ma["loss"], ma["grad_norm"]) == (mb["loss"], mb["grad_norm"]), (ma, mb)
    ckpts = sorted(os.listdir(tmp_path / "b" / "checkpoints"))
    assert ckpts == ["step-00000018", "step-00000020"]               # --keep-checkpoints 2


def test_resume_with_warmup_and_cosine_gives_identical_next_losses(tiny, tmp_path):
    """The lr is a function of the step (trainer.lr_at): a run stopped inside its warm-up and resumed
    applies the uninterrupted run's rates and logs its losses; a changed warm-up or length is refused."""
    from distilled_decoding.trainer import lr_at
    _, _, data = tiny["llamagen"]
    kw = dict(warmup_steps=8, lr_schedule="cosine", lr_per_256=0.064)     # lr = 0.064 * 8 / 256 = 2e-3
    train(args_for(data, tmp_path / "a", max_steps=14, ckpt_every=100, **kw), log=lambda s: None)
    train(args_for(data, tmp_path / "b", max_steps=14, ckpt_every=5, **kw), log=lambda s: None)
    (tmp_path / "b" / "checkpoints" / "step-00000014").rename(tmp_path / "b-last")   # stop it at step 10
    for bad in (dict(kw, warmup_steps=4), dict(kw, max_steps=20)):
        with pytest.raises(ValueError, match="warmup_steps|max_steps"):
            train(args_for(data, tmp_path / "b", **dict(dict(max_steps=14), **bad), resume=True), log=lambda s: None)
    train(args_for(data, tmp_path / "b", max_steps=14, ckpt_every=5, resume=True, **kw), log=lambda s: None)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 15))
    assert [m["lr"] for m in a] == [lr_at(s, 2e-3, 8, "cosine", 14) for s in range(14)]
    for ma, mb in zip(a, b):
        assert (ma["loss"], ma["grad_norm"], ma["lr"]) == (mb["loss"], mb["grad_norm"], mb["lr"]), (ma, mb)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["lr"] == pytest.approx(2e-3)


def test_gradient_accumulation_matches_the_full_batch(tiny, tmp_path):
    _, _, data = tiny["var"]
    train(args_for(data, tmp_path / "a", max_steps=3), log=lambda s: None)
    train(args_for(data, tmp_path / "b", max_steps=3, grad_accum=4), log=lambda s: None)
    for ma, mb in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b")):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-7)
        assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)


def test_two_rank_torchrun_matches_one_rank(tiny, tmp_path, capfd):
    """`dd train` under torchrun (gloo, 2 ranks), launched the way `dd demo --procs 2` launches it,
    logs the losses and global gradient norms of a 1-rank run on the same global batches."""
    _, _, data = tiny["llamagen"]
    train(args_for(data, tmp_path / "one", max_steps=3), log=lambda s: None)
    printed = []
    demo_run_dd(["train", "--data", data, "--out", tmp_path / "two", "--batch-size", 8, "--max-steps", 3,
                 "--log-every", 1, "--num-workers", 0, "--lr", "1e-3", "--ema-decay", "0.9", "--device", "cpu",
                 "--no-progress"], log=printed.append, procs=2)
    out = capfd.readouterr()
    assert printed[0].strip().startswith("$ torchrun --standalone --nproc_per_node=2 -m distilled_decoding train ")
    assert "batch 8 = 2 rank(s) x 1 accum x 4" in out.out + out.err
    assert json.loads((tmp_path / "two" / "config.json").read_text())["train"]["world_size"] == 2
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    s1, _ = load_run(str(tmp_path / "one"), ema=False)
    s2, _ = load_run(str(tmp_path / "two"), ema=False)
    for (k, a), b in zip(s1.backbone.state_dict().items(), s2.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)


def test_a_verb_failing_on_ranks_stops_the_demo_with_one_line(tiny, tmp_path):
    _, _, data = tiny["llamagen"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(click.ClickException) as e:
        demo_run_dd(["train", "--data", data, "--out", tmp_path / "taken", "--batch-size", 8, "--max-steps", 1,
                     "--device", "cpu", "--no-progress"], log=lambda s: None, procs=2)
    assert e.value.message.startswith("dd train on 2 local ranks exited with status ")
    assert "\n" not in e.value.message
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"


def test_dd_loss_reads_only_noise_positions():
    """Both loss terms see only positions >= step_offsets[t - 1]: the gradient w.r.t. the outputs at
    data positions is zero; the student gets X_t = make_xt(codebook[tokens], noise, t)."""
    g = torch.Generator().manual_seed(0)
    B, n, C, V = 2, 6, 3, 5
    offsets = (0, 1, 3, 6)
    codebook = torch.randn(V, C, generator=g)
    noise, tokens = torch.randn(B, n, C, generator=g), torch.randint(0, V, (B, n), generator=g)
    t = torch.tensor([1, 3])
    logits = torch.randn(B, n, V, generator=g, requires_grad=True)
    emb = torch.randn(B, n, C, generator=g, requires_grad=True)
    seen = {}

    def fake_student(x, labels, tt):
        seen["x"] = x
        return logits, emb

    loss, parts = dd_loss(fake_student, noise, tokens, torch.zeros(B, dtype=torch.long), t, codebook=codebook,
                          step_offsets=offsets, lambda_ce=0.1, lambda_emb=1.0)
    assert torch.equal(seen["x"], make_xt(codebook[tokens], noise, t, offsets))
    loss.backward()
    data = torch.tensor([[False] * 6, [True] * 3 + [False] * 3])
    assert (logits.grad[data] == 0).all() and (emb.grad[data] == 0).all()
    assert (logits.grad[~data].abs().sum(-1) > 0).all() and (emb.grad[~data].abs().sum(-1) > 0).all()
    ce = torch.nn.functional.cross_entropy(logits[1, 3:], tokens[1, 3:])
    torch.testing.assert_close(parts["ce"][1], ce.detach())
    torch.testing.assert_close(parts["emb"][1], (emb[1, 3:] - codebook[tokens[1, 3:]]).pow(2).mean().detach())


@pytest.mark.parametrize("family", sorted(TINY))
def test_lpips_loss_decodes_through_the_teacher(tiny, monkeypatch, family):
    """The LPIPS path with a stand-in `lpips` module: the student's embeddings reach the image loss
    through the teacher's (differentiable) VQ decoder; a missing package gives a clear message."""
    import click
    import types
    from distilled_decoding.dd_loss import make_emb_loss
    _, teacher, _ = tiny[family]
    monkeypatch.setitem(sys.modules, "lpips", None)
    with pytest.raises(click.ClickException, match="torchvision"):
        make_emb_loss("lpips", teacher)

    class LPIPS(torch.nn.Module):
        def __init__(self, net="alex", verbose=True):
            super().__init__()

        def forward(self, a, b):                                       # [B, 3, H, W] in [-1, 1] -> [B, 1, 1, 1]
            assert a.min() >= -1 and a.max() <= 1
            return (a - b).pow(2).mean((1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=LPIPS))
    fn, desc = make_emb_loss("lpips", teacher)
    assert desc.startswith("lpips (vgg)")
    s = build_student(teacher)
    g = torch.Generator().manual_seed(0)
    n = s.num_tokens
    noise, tokens = torch.randn(2, n, 4, generator=g), torch.randint(0, 64, (2, n), generator=g)
    target = s.codebook[tokens]
    mask = s.data_mask(torch.tensor([1, 2])).logical_not()
    assert torch.equal(fn(target, target, mask), torch.zeros(2))
    loss, parts = dd_loss(s, noise, tokens, torch.tensor([1, 2]), torch.tensor([1, 2]), codebook=s.codebook,
                          step_offsets=s.step_offsets, emb_loss=fn)
    loss.backward()
    assert (parts["emb"] > 0).all()
    assert s.backbone.final_layer_conti.linear.weight.grad.abs().sum() > 0
