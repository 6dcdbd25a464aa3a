"""VAR teacher: official key layout, parity with the official code, KV-cache/prefix parity, f_hat
accumulation, the multi-scale VQ-VAE, loader strictness and the sampling arithmetic."""
from __future__ import annotations

import fnmatch
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from teachers import SamplingConfig, load_teacher
from teachers.checkpoint import CheckpointMismatchError
from teachers.var import (PRESETS, VAE_IGNORE, VAR, VAR_IGNORE, KVCache, VARConfig, VARTeacher, load,
                          top_k_top_p_filter_)
from teachers.var_vqvae import PATCH_NUMS_256, PATCH_NUMS_512, PHI_INDEX_4x10, VQVAE, VQVAEConfig, phi_index_table

HERE = Path(__file__).parent
MANIFEST = json.loads((HERE / "manifests" / "var_official.json").read_text())
FIXTURE = HERE / "fixtures" / "var_official_tiny.pt"

TINY_VAR = dict(depth=2, embed_dim=64, num_heads=2, num_classes=10, patch_nums=(1, 2, 3, 4), V=64, Cvae=8)
TINY_VAE = dict(V=64, Cvae=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))

# The tiny model of the official-parity fixture (tools/var_parity_fixture.py): the official VQVAE
# hardcodes ch_mult (1, 1, 2, 2, 4), so images are 256 px; 10 scales exercise the phi table.
OFFICIAL_TINY = dict(V=64, Cvae=8, ch=32, depth=2, embed_dim=64, num_heads=2, num_classes=10,
                     patch_nums=PATCH_NUMS_256)
VAR_SEED, VAE_SEED, SALN_SEED = 1, 2, 3
FIXTURE_ROWS = torch.arange(0, 680, 5)
FIXTURE_SAMPLING = dict(cfg=1.5, top_k=20, top_p=0.9, g_seed=0)


def fill_state(shapes: dict, seed: int) -> dict:
    """Deterministic weights drawn from each key's name (shared with tools/var_parity_fixture.py):
    unit-variance linear maps, GroupNorm weights near 1, heads and gammas large enough that logits
    are far from uniform, one attention head's scale_mul above the ln(100) clamp."""
    out = {}
    for k, shape in shapes.items():
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(k.encode())) % (2 ** 62))
        r = torch.randn(tuple(shape), generator=g)
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        if k.endswith("scale_mul_1H11"):
            t = math.log(4.0) + 0.5 * r
            t.view(-1)[0] = 5.0
        elif "norm" in k and k.endswith(".weight") and len(shape) == 1:
            t = 1 + 0.1 * r
        elif k.endswith("bias"):
            t = 0.05 * r
        elif k.split(".")[0] in ("class_emb", "lvl_embed", "pos_start", "pos_1LC"):
            t = 0.5 * r
        elif k == "quantize.embedding.weight":
            t = r
        elif k == "head.weight":
            t = 2 * r / math.sqrt(fan_in)
        else:
            t = r / math.sqrt(fan_in)
        out[k] = t
    return out


def official_inputs() -> dict:
    g = torch.Generator().manual_seed(123)
    L, V, Cv = 680, OFFICIAL_TINY["V"], OFFICIAL_TINY["Cvae"]
    return {"labels": torch.tensor([3, 7]), "tokens": torch.randint(0, V, (2, L), generator=g),
            "embeddings": torch.randn(2, L, Cv, generator=g), "images": torch.rand(2, 3, 256, 256, generator=g)}


def image_pixels(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(5))[:4096]


def meta_shapes(build) -> dict:
    with torch.device("meta"):
        m = build()
    return {k: list(v.shape) for k, v in m.state_dict().items()}


def official_style(state: dict, extra: dict) -> dict:
    """Our state dict plus the buffers an official file carries."""
    return {**state, **extra}


def var_buffers(cfg: VARConfig) -> dict:
    L = cfg.L
    extra = {"lvl_1L": torch.zeros(1, L, dtype=torch.long), "attn_bias_for_masking": torch.zeros(1, 1, L, L)}
    extra.update({f"blocks.{i}.attn.zero_k_bias": torch.zeros(cfg.embed_dim) for i in range(cfg.depth)})
    return extra


def build_teacher(var_cfg: dict, vae_cfg: dict, var_seed: int, vae_seed: int, **kw) -> VARTeacher:
    vc, ac = VARConfig.from_dict(var_cfg), VQVAEConfig.from_dict(vae_cfg)
    vsd = fill_state(meta_shapes(lambda: VAR(vc)), var_seed)
    asd = fill_state(meta_shapes(lambda: VQVAE(ac)), vae_seed)
    asd["quantize.ema_vocab_hit_SV"] = torch.ones(len(ac.patch_nums) + 3, ac.V)   # any shape: ignored
    return load(var_cfg, official_style(vsd, var_buffers(vc)), tokenizer_config=vae_cfg,
                tokenizer_checkpoint=asd, **kw)


@pytest.fixture(scope="module")
def tiny() -> VARTeacher:
    return build_teacher(TINY_VAR, TINY_VAE, 10, 11)


def chunks(t: VARTeacher, tokens: torch.Tensor):
    o = t.step_offsets
    return [tokens[:, o[s]:o[s + 1]] for s in range(t.num_steps)]


def random_tokens(t: VARTeacher, B: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, t.vocab_size, (B, t.num_tokens), generator=torch.Generator().manual_seed(seed))


# ---- official layout ----------------------------------------------------------------------------
def _check_layout(ours: dict, official: dict, ignore):
    off = official["keys"]
    ignorable = {k for k in off if any(fnmatch.fnmatchcase(k, p) for p in ignore)}
    assert ignorable == set(official["buffers"]) - set(ours) == set(off) - set(ours)
    assert ours == {k: v for k, v in off.items() if k not in ignorable}
    assert list(ours) == [k for k in off if k not in ignorable]                # official order
    assert sum(math.prod(s) for s in ours.values()) == official["num_elements"]


def test_var_d16_keys_match_official():
    off = MANIFEST["var-d16"]
    assert off["num_keys"] == 220 and len(off["buffers"]) == 18
    _check_layout(meta_shapes(lambda: VAR(PRESETS["d16"])), off, VAR_IGNORE)


def test_vqvae_keys_match_official():
    off = MANIFEST["vae_ch160v4096z32"]
    assert off["num_keys"] == 324 and off["num_elements"] == 108_948_355
    _check_layout(meta_shapes(lambda: VQVAE(VQVAEConfig())), off, VAE_IGNORE)


def test_shared_adaln_keys_match_official():
    cfg = VARConfig(depth=2, embed_dim=128, num_heads=2, shared_aln=True, patch_nums=PATCH_NUMS_512,
                    num_classes=10, V=64, Cvae=8)
    _check_layout(meta_shapes(lambda: VAR(cfg)), MANIFEST["var-tiny-saln"], VAR_IGNORE)


def test_presets():
    counts = {"d16": 310_283_520, "d20": 600_917_136, "d24": 1_033_399_360, "d30": 2_010_020_356}
    for name, n in counts.items():
        assert sum(math.prod(s) for s in meta_shapes(lambda: VAR(PRESETS[name])).values()) == n
    d36 = PRESETS["d36"]
    assert d36.shared_aln and d36.patch_nums == PATCH_NUMS_512 and d36.embed_dim == 2304 and d36.num_heads == 36
    assert all(not PRESETS[n].shared_aln and PRESETS[n].patch_nums == PATCH_NUMS_256 for n in counts)
    assert VARConfig.from_dict({"depth": 36, "saln": 1, "pn": "512"}) == d36
    assert VARConfig.from_dict({"preset": "d20", "drop_path_rate": 0.1}) == PRESETS["d20"]
    with pytest.raises(ValueError, match="bogus"):
        VARConfig.from_dict({"depth": 16, "bogus": 1})


def test_phi_index_table():
    assert PHI_INDEX_4x10 == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    # the official rule, spelled out: float64 numpy argmin over linspace(1/3/K, 1-1/3/K, K) for K == 4
    ticks = np.linspace(1 / 3 / 4, 1 - 1 / 3 / 4, 4)
    assert tuple(int(np.argmin(np.abs(ticks - si / 9))) for si in range(10)) == PHI_INDEX_4x10
    # scales 2 and 7 are exact ties: float32 (or exact) arithmetic would pick differently
    t32 = ticks.astype(np.float32)
    assert tuple(int(np.argmin(np.abs(t32 - np.float32(si / 9)))) for si in range(10)) != PHI_INDEX_4x10
    assert phi_index_table(10, 4) == PHI_INDEX_4x10
    assert phi_index_table(4, 4) == (0, 1, 2, 3)
    assert phi_index_table(11, 4) == (0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3)
    assert phi_index_table(10, 10) == tuple(range(10))                  # non-shared: linspace(1/2K, 1-1/2K)
    assert phi_index_table(10, 1) == (0,) * 10
    q = VQVAE(VQVAEConfig(V=8, Cvae=4, ch=32, ch_mult=(1,), num_res_blocks=1))
    assert [q.quantize.phi(si) is q.quantize.quant_resi.qresi_ls[k] for si, k in enumerate(PHI_INDEX_4x10)] == [True] * 10


# ---- parity with the official code --------------------------------------------------------------
@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def official_teacher() -> VARTeacher:
    oc = OFFICIAL_TINY
    var_cfg = {k: oc[k] for k in ("depth", "embed_dim", "num_heads", "num_classes", "patch_nums", "V", "Cvae")}
    return build_teacher(var_cfg, {k: oc[k] for k in ("V", "Cvae", "ch", "patch_nums")}, VAR_SEED, VAE_SEED)


def test_official_parity_teacher_forcing_and_vae(official, official_teacher):
    t, inp = official_teacher, official_inputs()
    tok = inp["tokens"]
    torch.testing.assert_close(t.logits(inp["labels"], tok)[:, FIXTURE_ROWS], official["tf_logits"], rtol=0, atol=1e-5)
    assert torch.equal(t.fhat(tok), official["fhat"])
    img = t.decode(tok)
    torch.testing.assert_close(img.flatten()[image_pixels(img.numel())], official["image_px"], rtol=0, atol=1e-5)
    torch.testing.assert_close(t.fhat(inp["embeddings"]), official["fhat_from_embeddings"], rtol=0, atol=1e-5)
    assert torch.equal(t.encode(inp["images"]), official["encode_idx"])


def test_official_parity_cfg_loop(official, official_teacher):
    """The KV-cached CFG loop, tokens forced: guided logits and VAR's top-k/top-p filter."""
    t, inp = official_teacher, official_inputs()
    sp = SamplingConfig(cfg_scale=FIXTURE_SAMPLING["cfg"], top_k=FIXTURE_SAMPLING["top_k"],
                        top_p=FIXTURE_SAMPLING["top_p"])
    st = t.start(inp["labels"], sp)
    guided, filtered = [], []
    for s, tok in enumerate(chunks(t, inp["tokens"])):
        guided.append(t.step_logits(st))
        t.step_probs(st)
        filtered.append(st.logits)
        t.feed(st, tok)
    g, f = torch.cat(guided, 1)[:, FIXTURE_ROWS], torch.cat(filtered, 1)[:, FIXTURE_ROWS]
    torch.testing.assert_close(g, official["cfg_guided"], rtol=0, atol=1e-5)
    assert torch.equal(torch.isinf(f), torch.isinf(official["cfg_filtered"]))
    torch.testing.assert_close(st.f_hat, official["cfg_fhat"], rtol=0, atol=0)


def test_official_parity_shared_adaln(official, official_teacher):
    oc = OFFICIAL_TINY
    cfg = {k: oc[k] for k in ("depth", "embed_dim", "num_heads", "num_classes", "patch_nums", "V", "Cvae")}
    cfg["shared_aln"] = True
    vc = VARConfig.from_dict(cfg)
    sd = fill_state(meta_shapes(lambda: VAR(vc)), SALN_SEED)
    var = load(cfg, official_style(sd, var_buffers(vc)), tokenizer_config=dict(official_teacher.vae.cfg.to_dict())).var
    inp = official_inputs()
    vae = official_teacher.vae
    x = vae.quantize.idx_to_var_input(vae.split_scales(inp["tokens"]))
    with torch.no_grad():
        got = var(inp["labels"], x)[:, FIXTURE_ROWS]
    torch.testing.assert_close(got, official["saln_tf_logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("smooth", [False, True])
def test_official_parity_sampling(official, official_teacher, smooth):
    """Same CPU generator seed -> the same tokens and f_hat as `autoregressive_infer_cfg`."""
    t, inp = official_teacher, official_inputs()
    sp = SamplingConfig(cfg_scale=FIXTURE_SAMPLING["cfg"], top_k=FIXTURE_SAMPLING["top_k"],
                        top_p=FIXTURE_SAMPLING["top_p"])
    g = torch.Generator().manual_seed(FIXTURE_SAMPLING["g_seed"])
    tokens, state = t._sample(inp["labels"], sp, g, more_smooth=smooth)
    tag = "smooth" if smooth else "plain"
    assert torch.equal(tokens, official[f"sampled_tokens_{tag}"])
    # The smooth path mixes codebook rows by a Gumbel softmax at tau ~0.27 and feeds the mixture back in,
    # so another CPU's float32 kernels (the CI machine's: 4e-4) move f_hat more than the plain path's.
    atol = 2e-3 if smooth else 1e-5
    torch.testing.assert_close(state.f_hat, official[f"sampled_fhat_{tag}"], rtol=0, atol=atol)


# ---- KV cache, prefix, f_hat -------------------------------------------------------------------
def test_labels_dims(tiny):
    assert tiny.step_sizes == (1, 4, 9, 16) and tiny.num_tokens == 30 and tiny.image_size == 8
    assert tiny.codebook.shape == (64, 8) and tiny.codebook.dtype == torch.float32
    assert tiny.default_sampling == SamplingConfig(cfg_scale=2.0, top_k=900, top_p=0.95)
    json.dumps(tiny.describe())


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_teacher_forced_equals_kv_cached(tiny, cfg):
    labels = torch.tensor([1, 4, 9])
    tokens = random_tokens(tiny, 3)
    sp = SamplingConfig(cfg_scale=cfg)
    st = tiny.start(labels, sp)
    rows, raw = [], []
    for tok in chunks(tiny, tokens):
        rows.append(tiny.step_logits(st))
        raw.append(tiny.var.get_logits(st.hidden, st.cond_BD))             # [B' = 2B with CFG, l, V]
        tiny.feed(st, tok)
    cached, raw = torch.cat(rows, 1), torch.cat(raw, 1)
    c = tiny.logits(labels, tokens)
    u = tiny.logits(torch.full_like(labels, tiny.num_classes), tokens)
    torch.testing.assert_close(raw[:3], c, rtol=0, atol=1e-5)
    if cfg:
        torch.testing.assert_close(raw[3:], u, rtol=0, atol=1e-5)
    S = tiny.num_steps
    ref = torch.cat([(1 + cfg * (s / (S - 1))) * c[:, a:b] - cfg * (s / (S - 1)) * u[:, a:b]
                     for s, (a, b) in enumerate(zip(tiny.step_offsets, tiny.step_offsets[1:]))], 1)
    # guidance amplifies the 1e-5 by up to 1 + 2·cfg
    torch.testing.assert_close(cached, ref, rtol=0, atol=1e-5 * (1 + 2 * cfg))
    assert cached.shape == (3, tiny.num_tokens, tiny.vocab_size)
    # f_hat from stepping == f_hat from the full token list (same fp32 ops, bit for bit)
    assert torch.equal(st.f_hat, tiny.fhat(tokens))
    # partial sequences: teacher forcing on the first scales only
    torch.testing.assert_close(tiny.logits(labels, tokens[:, :14]), c[:, :14], rtol=0, atol=1e-5)


def test_prefix_prefill_equals_stepping(tiny):
    labels = torch.tensor([0, 5])
    tokens = random_tokens(tiny, 2, seed=3)
    sp = SamplingConfig(cfg_scale=2.0, top_k=30, top_p=0.9)
    step = tiny.start(labels, sp)
    ref = []
    for tok in chunks(tiny, tokens):
        ref.append(tiny.step_probs(step).clone())
        tiny.feed(step, tok)
    for s, m in enumerate(tiny.step_offsets[:-1]):
        st = tiny.start(labels, sp, prefix=tokens[:, :m])
        assert st.step == s and len(st.tokens) == s
        for s2 in range(s, tiny.num_steps):
            torch.testing.assert_close(tiny.step_probs(st), ref[s2], rtol=0, atol=1e-5)
            tiny.feed(st, chunks(tiny, tokens)[s2])
        assert torch.equal(st.f_hat, step.f_hat)
    full = tiny.start(labels, sp, prefix=tokens)
    assert full.step == tiny.num_steps and torch.equal(full.f_hat, step.f_hat)
    with pytest.raises(ValueError, match="whole number of scales"):
        tiny.start(labels, sp, prefix=tokens[:, :3])


def test_prefix_uses_block_causal_mask(tiny):
    """The DD release prefilled without a mask; ours must differ from that and match stepping."""
    labels, tokens = torch.tensor([2]), random_tokens(tiny, 1, seed=4)
    sp = SamplingConfig(cfg_scale=0.0)
    st = tiny.start(labels, sp, prefix=tokens[:, :14])
    good = tiny.step_logits(st)
    var = tiny.var
    x = var.input_embed(var.class_emb(labels), tiny.vae.quantize.idx_to_var_input(chunks(tiny, tokens)[:3]))
    caches = [KVCache() for _ in var.blocks]
    var.hidden(x, var.class_emb(labels), attn_bias=None, caches=caches)   # the buggy unmasked prefill
    st.caches, st.hidden = caches, None
    assert (tiny.step_logits(st) - good).abs().max() > 1e-3


def test_generate_and_decode(tiny):
    labels = torch.tensor([1, 2])
    sp = SamplingConfig(cfg_scale=1.0, top_k=10)
    g = torch.Generator().manual_seed(0)
    toks = tiny.sample(labels, sp, generator=g)
    assert toks.shape == (2, 30) and toks.dtype == torch.long
    head = tiny.generate(labels, sp, lambda s, p: p.argmax(-1), stop_step=2)
    assert head.shape == (2, 5)
    rest = tiny.generate(labels, sp, lambda s, p: p.argmax(-1), prefix=head)
    full = tiny.generate(labels, sp, lambda s, p: p.argmax(-1))
    torch.testing.assert_close(rest, full)
    img = tiny.decode(toks)
    assert img.shape == (2, 3, 8, 8) and 0 <= img.min() and img.max() <= 1
    torch.testing.assert_close(tiny.decode(tiny.embed(toks)), img, rtol=0, atol=1e-5)
    assert tiny.decode(toks[:, :5]).shape == (2, 3, 8, 8)                   # coarse partial f_hat
    imgs = tiny.sample_images(labels, sp, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(imgs, img, rtol=0, atol=1e-5)               # same seed, same tokens
    smooth = tiny.sample(labels, sp, generator=torch.Generator().manual_seed(0), more_smooth=True)
    assert smooth.shape == (2, 30)


def test_encode_decode_consistent(tiny):
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    idx = tiny.encode(img)
    assert idx.shape == (2, 30) and idx.dtype == torch.long
    vae = tiny.vae
    f_hat = vae.img_to_fhat(img * 2 - 1)
    torch.testing.assert_close(tiny.fhat(idx), f_hat, rtol=0, atol=1e-5)
    torch.testing.assert_close(tiny.decode(idx), vae.fhat_to_img(f_hat).add(1).mul(0.5), rtol=0, atol=1e-5)
    assert torch.equal(torch.cat(vae.img_to_idx(img * 2 - 1), 1), idx)


# ---- probabilities -----------------------------------------------------------------------------
def reference_probs(logits: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Direct per-row re-statement of VAR's sampler (plus temperature) on guided logits [B, l, V]."""
    out = torch.empty_like(logits)
    T, k, p = cfg.get("temperature", 1.0), cfg.get("top_k", 0), cfg.get("top_p", 0.0)
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            row = logits[b, i] / T
            keep = torch.ones_like(row, dtype=torch.bool)
            if k > 0:
                keep &= row >= torch.sort(row, descending=True).values[min(k, row.numel()) - 1]
            if 0 < p < 1:
                masked = torch.where(keep, row, -torch.inf)
                order = torch.argsort(masked)                              # ascending
                cum = torch.cumsum(torch.softmax(masked[order], 0), 0)
                drop = cum <= 1 - p
                drop[-1] = False
                keep[order[drop]] = False
            out[b, i] = torch.softmax(torch.where(keep, row, -torch.inf), 0)
    return out


@pytest.mark.parametrize("cfg", [dict(cfg_scale=0.0), dict(cfg_scale=2.0, top_k=7),
                                 dict(cfg_scale=1.0, top_p=0.6), dict(cfg_scale=3.0, top_k=20, top_p=0.8, temperature=0.7),
                                 dict(cfg_scale=1.0, top_p=1.0), dict(cfg_scale=1.0, top_k=500)])
def test_step_probs(tiny, cfg):
    labels = torch.tensor([3, 8])
    sp = SamplingConfig(**cfg)
    st = tiny.start(labels, sp)
    for tok in chunks(tiny, random_tokens(tiny, 2, seed=7)):
        raw = tiny.step_logits(st)
        probs = tiny.step_probs(st)
        assert probs.dtype == torch.float32 and probs.shape == raw.shape
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]), rtol=0, atol=1e-5)
        torch.testing.assert_close(probs, reference_probs(raw, cfg), rtol=0, atol=1e-6)
        k = cfg.get("top_k", 0)
        if 0 < k < tiny.vocab_size:
            kth = raw.topk(k, dim=-1).values[..., -1:]
            assert (probs[raw < kth] == 0).all()
            if not 0 < cfg.get("top_p", 0.0) < 1:
                assert ((probs > 0).sum(-1) >= k).all()
        p = cfg.get("top_p", 0.0)
        if 0 < p < 1:
            assert (probs > 0).sum(-1).min() >= 1
        if k <= 0 and not 0 < p < 1:
            assert (probs > 0).all()
        assert tiny.step_probs(st) is probs                                 # cached: no second forward
        tiny.feed(st, tok)


def test_top_k_top_p_filter_matches_official_helper():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g)
    logits[0, 0, :5] = 9.0                                                   # ties at the k-th value
    f = top_k_top_p_filter_(logits.clone(), top_k=3, top_p=0.0)
    assert (torch.isfinite(f[0, 0]).sum() == 5)                             # ties kept
    f = top_k_top_p_filter_(logits.clone(), top_k=0, top_p=0.5)
    kept = torch.isfinite(f)
    mass = torch.where(kept, logits.softmax(-1), 0).sum(-1)
    assert (mass >= 0.5 - 1e-6).all()
    assert torch.equal(top_k_top_p_filter_(logits.clone(), 0, 0.0), logits)
    assert torch.equal(top_k_top_p_filter_(logits.clone(), 0, 1.0), logits)


# ---- loading ------------------------------------------------------------------------------------
def test_loader_strictness():
    vc, ac = VARConfig.from_dict(TINY_VAR), VQVAEConfig.from_dict(TINY_VAE)
    vsd = fill_state(meta_shapes(lambda: VAR(vc)), 0)
    asd = fill_state(meta_shapes(lambda: VQVAE(ac)), 0)
    t = load(TINY_VAR, official_style(vsd, var_buffers(vc)), tokenizer_config=TINY_VAE, tokenizer_checkpoint=asd)
    assert torch.equal(t.var.head.weight, vsd["head.weight"])
    # regenerated buffers, not the file's zeros
    assert torch.equal(t.var.lvl_1L[0], torch.tensor([0] + [1] * 4 + [2] * 9 + [3] * 16))
    assert t.var.attn_bias_for_masking[0, 0, 0, 1].item() == -math.inf and t.var.attn_bias_for_masking[0, 0, 4, 1] == 0
    bad = dict(vsd)
    del bad["blocks.1.ffn.fc1.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.ffn\.fc1\.bias"):
        load(TINY_VAR, bad, tokenizer_config=TINY_VAE, tokenizer_checkpoint=asd)
    bad = dict(vsd, **{"head.weight": torch.zeros(65, 64)})
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight: checkpoint \(65, 64\)"):
        load(TINY_VAR, bad, tokenizer_config=TINY_VAE, tokenizer_checkpoint=asd)
    bad = dict(vsd, **{"blocks.0.attn.extra": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.0\.attn\.extra"):
        load(TINY_VAR, bad, tokenizer_config=TINY_VAE, tokenizer_checkpoint=asd)
    bad = dict(asd)
    del bad["quantize.quant_resi.qresi_ls.2.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"qresi_ls\.2\.weight"):
        load(TINY_VAR, vsd, tokenizer_config=TINY_VAE, tokenizer_checkpoint=bad)
    with pytest.raises(ValueError, match="disagree"):
        load(TINY_VAR, None, tokenizer_config=dict(TINY_VAE, V=32))
    # training-checkpoint nesting and the generic loader
    t2 = load_teacher("var", TINY_VAR, {"trainer": {"var_wo_ddp": vsd, "vae_local": asd}, "epoch": 1},
                      tokenizer_config=TINY_VAE, tokenizer_checkpoint={"trainer": {"vae_local": asd}})
    assert torch.equal(t2.var.head.weight, vsd["head.weight"]) and not t2.training


def test_random_weights_and_bf16():
    t = load(TINY_VAR, None, tokenizer_config=TINY_VAE, seed=0)
    t2 = load(TINY_VAR, None, tokenizer_config=TINY_VAE, seed=0)
    assert torch.equal(t.var.pos_1LC, t2.var.pos_1LC)
    tb = load(TINY_VAR, None, tokenizer_config=TINY_VAE, seed=0, dtype=torch.bfloat16)
    assert tb.var.head.weight.dtype == torch.bfloat16 and tb.codebook.dtype == torch.float32
    st = tb.start(torch.tensor([1]), SamplingConfig(cfg_scale=1.5))
    p = tb.step_probs(st)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 1))
    toks = tb.sample(torch.tensor([1, 2]), SamplingConfig(cfg_scale=1.5, top_k=10))
    assert tb.logits(torch.tensor([1, 2]), toks).dtype == torch.float32
