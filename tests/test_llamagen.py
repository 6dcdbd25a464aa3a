"""LlamaGen teacher: official key layout, KV-cache parity, loader strictness, sampling arithmetic."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from teachers import SamplingConfig, load_teacher
from teachers.checkpoint import CheckpointMismatchError
from teachers.llamagen import GPT, PRESETS, GPTConfig, LlamaGenTeacher, load, rope_table_2d
from teachers.llamagen_vq import VQConfig, VQModel

MANIFEST = json.loads((Path(__file__).parent / "manifests" / "llamagen_official.json").read_text())

TINY_GPT = dict(dim=64, n_layer=2, n_head=4, vocab_size=96, block_size=16, num_classes=10)
TINY_VQ = dict(codebook_size=96, codebook_embed_dim=8, ch=32, z_channels=32,
               encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), num_res_blocks=1)


def random_state(model: torch.nn.Module, seed: int, std: float = 0.15) -> dict:
    """A state dict of random tensors (std large enough that logits are far from uniform)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * std + (1.0 if k.endswith("norm.weight") else 0.0)
            for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_states():
    with torch.device("meta"):
        gpt, vq = GPT(GPTConfig(**TINY_GPT)), VQModel(VQConfig(**TINY_VQ))
    return random_state(gpt, 0), random_state(vq, 1, std=0.1)


@pytest.fixture(scope="module")
def tiny(tiny_states) -> LlamaGenTeacher:
    gsd, vsd = tiny_states
    return load(TINY_GPT, {"model": gsd}, tokenizer_config=TINY_VQ, tokenizer_checkpoint={"model": vsd})


def shapes(model: torch.nn.Module) -> dict:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


# ---- official layout ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_gpt_keys_match_official(name):
    official = MANIFEST[name]
    with torch.device("meta"):
        model = GPT(GPTConfig.preset(name))
    ours = shapes(model)
    assert ours == official["keys"]
    assert len(ours) == official["num_keys"]
    assert sum(math.prod(s) for s in ours.values()) == official["num_elements"]
    assert list(model.state_dict()) == list(official["keys"])  # same order as the official modules


def test_gpt_key_counts_from_fact_sheet():
    assert MANIFEST["GPT-B"]["num_keys"] == 88 and MANIFEST["GPT-L"]["num_keys"] == 172
    assert MANIFEST["GPT-B"]["num_elements"] == 110_888_448
    assert MANIFEST["GPT-L"]["num_elements"] == 342_910_976


def test_vq16_keys_match_official():
    official = MANIFEST["VQ-16"]
    with torch.device("meta"):
        model = VQModel(VQConfig.preset("VQ-16"))
    ours = shapes(model)
    expected = {k: v for k, v in official["keys"].items() if k not in official["ignorable"]}
    assert official["num_keys"] == 344 and official["ignorable"] == ["quantize.codebook_used"]
    assert ours == expected
    assert sum(math.prod(s) for s in ours.values()) == 71_883_403


def test_384px_block_size():
    assert GPTConfig.preset("GPT-L", image_size=384).block_size == 576
    assert GPTConfig.from_dict({"preset": "GPT-L", "image_size": 384}).block_size == 576
    t = load_teacher("llamagen", "GPT-B", image_size=384, device="meta")
    assert t.num_tokens == 576 and t.image_size == 384
    assert t.gpt.freqs_cis.shape == (577, 32, 2)


def test_unknown_config_field_rejected():
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 3})


def test_rope_table():
    tab = rope_table_2d(4, 8, 10000, 1)                           # [1 + 16, 4, 2]
    assert tab.dtype == torch.float32 and tab.shape == (17, 4, 2)
    assert torch.all(tab[0] == 0)                                  # class slot: zeros, not identity
    freqs = 1.0 / (10000 ** (torch.tensor([0.0, 2.0]) / 4))
    n = 1 + 2 * 4 + 3                                              # grid row 2, col 3
    ang = torch.cat([2 * freqs, 3 * freqs])
    torch.testing.assert_close(tab[n, :, 0], torch.cos(ang))
    torch.testing.assert_close(tab[n, :, 1], torch.sin(ang))


# ---- KV-cache parity -----------------------------------------------------------------------------
def test_cached_stepping_matches_teacher_forcing(tiny):
    labels = torch.tensor([0, 3, 9])
    tokens = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
    full = tiny.logits(labels, tokens)                              # [B, n, V]
    assert full.dtype == torch.float32 and full.shape == (3, 16, 96)
    state = tiny.start(labels, SamplingConfig())
    for i in range(16):
        torch.testing.assert_close(state.last_logits, full[:, i], rtol=0, atol=1e-5)
        tiny.feed(state, tokens[:, i:i + 1])
    assert state.step == 16 and torch.equal(torch.cat(state.tokens, 1), tokens)


def test_cached_cfg_matches_full_forwards(tiny):
    labels = torch.tensor([2, 5])
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    s = SamplingConfig(cfg_scale=3.0)
    c = tiny.logits(labels, tokens)
    u = tiny.logits(torch.full_like(labels, 10), tokens)           # null class = num_classes
    state = tiny.start(labels, s)
    assert state.cache.k.shape[1] == 4                              # batch doubled for CFG
    for i in range(16):
        B = 2
        torch.testing.assert_close(state.last_logits[:B], c[:, i], rtol=0, atol=1e-5)
        torch.testing.assert_close(state.last_logits[B:], u[:, i], rtol=0, atol=1e-5)
        expected = F.softmax(u[:, i] + 3.0 * (c[:, i] - u[:, i]), dim=-1)
        torch.testing.assert_close(tiny.step_probs(state)[:, 0], expected, rtol=0, atol=1e-5)
        tiny.feed(state, tokens[:, i:i + 1])


def test_forward_hidden_chunk_after_cache(tiny):
    """A multi-token chunk appended to a filled cache sees the cache plus its own causal past."""
    gpt = tiny.gpt
    labels = torch.tensor([3, 8])
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    h = gpt.embed(labels, tokens)                                    # [B, 13, dim]
    full = gpt.forward_hidden(h)
    cache = gpt.new_cache(2)
    a = gpt.forward_hidden(h[:, :4], cache=cache)
    b = gpt.forward_hidden(h[:, 4:], cache=cache)
    assert cache.length == 13
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=0, atol=1e-5)


def test_prefix_prefill_matches_stepping(tiny):
    labels = torch.tensor([1, 4])
    s = SamplingConfig(cfg_scale=2.0, top_k=20)
    seen = {}

    def argmax_and_record(tag):
        def choose(step, probs):
            seen.setdefault(tag, {})[step] = probs.clone()
            return probs.argmax(-1)
        return choose

    full = tiny.generate(labels, s, argmax_and_record("full"))
    assert full.shape == (2, 16)
    for m in (1, 7):
        cont = tiny.generate(labels, s, argmax_and_record(m), prefix=full[:, :m])
        assert torch.equal(cont, full)
        for step in range(m, 16):
            torch.testing.assert_close(seen[m][step], seen["full"][step], rtol=0, atol=1e-5)
    part = tiny.generate(labels, s, argmax_and_record("part"), stop_step=5)
    assert torch.equal(part, full[:, :5])


def test_sample_runs_and_is_seeded(tiny):
    labels = torch.tensor([0, 1])
    a = tiny.sample(labels, tiny.default_sampling, generator=torch.Generator().manual_seed(3))
    b = tiny.sample(labels, tiny.default_sampling, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 16) and a.dtype == torch.long and torch.equal(a, b)


# ---- sampling arithmetic -------------------------------------------------------------------------
def reference_probs(c, u, cfg, temperature, top_k, top_p):
    """Row-by-row restatement of generate.py's CFG / temperature / top-k / top-p / softmax."""
    out = []
    for ci, ui in zip(c.tolist(), u.tolist()):
        z = [ui_ + (ci_ - ui_) * cfg for ci_, ui_ in zip(ci, ui)] if cfg > 1 else list(ci)
        z = [v / max(temperature, 1e-5) for v in z]
        keep = set(range(len(z)))
        if top_k > 0:
            kth = sorted(z, reverse=True)[min(max(top_k, 1), len(z)) - 1]
            keep = {j for j in keep if z[j] >= kth}
        if 0 < top_p < 1:
            order = sorted(keep, key=lambda j: -z[j])
            mx = max(z[j] for j in order)
            e = [math.exp(z[j] - mx) for j in order]
            tot, cum, kept = sum(e), 0.0, set()
            for j, ej in zip(order, e):
                kept.add(j)           # keep tokens until the cumulative mass first exceeds top_p
                cum += ej / tot
                if cum > top_p:
                    break
            keep = kept
        mx = max(z[j] for j in keep)
        e = {j: math.exp(z[j] - mx) for j in keep}
        tot = sum(e.values())
        out.append([e.get(j, 0.0) / tot for j in range(len(z))])
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("cfg,temperature,top_k,top_p", [
    (1.0, 1.0, 0, 1.0), (2.0, 1.0, 0, 1.0), (4.0, 0.7, 10, 1.0), (1.5, 1.3, 0, 0.6),
    (2.0, 1.0, 30, 0.9), (1.0, 0.0, 0, 1.0), (1.0, 1.0, 500, 0.0), (3.0, 1.0, 1, 0.5)])
def test_step_probs_match_reference(tiny, cfg, temperature, top_k, top_p):
    labels = torch.tensor([0, 6, 9])
    s = SamplingConfig(cfg_scale=cfg, temperature=temperature, top_k=top_k, top_p=top_p)
    prefix = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(2))
    state = tiny.start(labels, s, prefix=prefix)
    probs = tiny.step_probs(state)                                  # [B, 1, V]
    assert probs.shape == (3, 1, 96) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 1))
    c = tiny.logits(labels, torch.cat([prefix, prefix[:, :1]], 1))[:, 5]
    u = tiny.logits(torch.full_like(labels, 10), torch.cat([prefix, prefix[:, :1]], 1))[:, 5]
    ref = reference_probs(c, u, cfg, temperature, top_k, top_p)
    torch.testing.assert_close(probs[:, 0], ref, rtol=0, atol=2e-5)
    assert torch.all(probs[:, 0][ref == 0] == 0)                    # nothing outside the kept set
    if top_k > 0:
        assert int((probs[:, 0] > 0).sum(-1).max()) <= top_k


def test_top_k_keeps_ties():
    from teachers.llamagen import top_k_top_p_filter
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0]])
    assert torch.isfinite(top_k_top_p_filter(x, top_k=3)).tolist() == [[True, False, True, True, True]]
    assert torch.isfinite(top_k_top_p_filter(x, top_k=99)).all()


# ---- tokenizer -----------------------------------------------------------------------------------
def test_decode_indices_equals_embeddings(tiny):
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    a = tiny.decode(idx)
    b = tiny.decode(tiny.embed(idx))
    assert a.shape == (2, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_decode_differentiable_matches_decode(tiny):
    emb = tiny.embed(torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(7)))
    emb.requires_grad_(True)
    x = tiny.decode_differentiable(emb)                              # [-1, 1]
    torch.testing.assert_close((x.detach() + 1) / 2, tiny.decode(emb.detach()), rtol=0, atol=1e-5)
    x.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_encode_is_nearest_normalised_code(tiny):
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    idx = tiny.encode(img)
    assert idx.shape == (2, 16) and idx.dtype == torch.long
    vq = tiny.vq
    z = vq.quant_conv(vq.encoder(img * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, 8)
    d = torch.cdist(F.normalize(z, dim=-1), tiny.codebook)
    assert torch.equal(idx.view(-1), d.argmin(-1))
    torch.testing.assert_close(tiny.codebook.norm(dim=-1), torch.ones(96))


# ---- loading -------------------------------------------------------------------------------------
def tiny_load(gpt_src, vq_src=None, **kw):
    return load(TINY_GPT, gpt_src, tokenizer_config=TINY_VQ, tokenizer_checkpoint=vq_src, **kw)


def test_nested_and_prefixed_checkpoints_load(tiny_states, tiny):
    gsd, vsd = tiny_states
    ref = tiny.gpt.output.weight
    stale = {"freqs_cis": torch.zeros(3), "layers.0.attention.kv_cache.k_cache": torch.zeros(2),
             "layers.1.attention.kv_cache.v_cache": torch.zeros(2)}
    variants = [
        {"module": gsd},
        {"state_dict": {f"module.{k}": v for k, v in gsd.items()}},
        {"model": {f"_orig_mod.{k}": v for k, v in gsd.items()}, "optimizer": {}, "steps": 3},
        {**gsd, **stale},
    ]
    vq_src = {"model": {**vsd, "quantize.codebook_used": torch.zeros(65536)}, "ema": {}}
    for src in variants:
        t = tiny_load(src, vq_src)
        assert torch.equal(t.gpt.output.weight, ref)
        assert torch.equal(t.codebook, tiny.codebook)
    t = tiny_load({"model": {}, "ema": gsd}, ema=True)
    assert torch.equal(t.gpt.output.weight, ref)


def test_meta_load_leaves_nothing_on_meta(tiny):
    for name, tensor in list(tiny.named_parameters()) + list(tiny.named_buffers()):
        assert not tensor.is_meta, name
    assert torch.equal(tiny.gpt.freqs_cis, rope_table_2d(4, 16, 10000, 1))
    assert not any(p.requires_grad for p in tiny.parameters())


def test_wrong_shape_and_missing_key_named(tiny_states):
    gsd, _ = tiny_states
    bad = dict(gsd)
    bad["layers.1.ffn_norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.ffn_norm\.weight"):
        tiny_load(bad)
    missing = {k: v for k, v in gsd.items() if k != "layers.0.attention.wo.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"missing.*layers\.0\.attention\.wo\.weight"):
        tiny_load(missing)
    with pytest.raises(CheckpointMismatchError, match="unexpected.*extra.weight"):
        tiny_load({**gsd, "extra.weight": torch.zeros(1)})


def test_weights_only_failure_message(tiny_states, tmp_path):
    gsd, _ = tiny_states
    path = tmp_path / "legacy.pt"
    torch.save({"model": gsd, "args": argparse.Namespace(gpt_model="tiny")}, path)
    with pytest.raises(RuntimeError, match="weights_only=False"):
        tiny_load(str(path))
    t = tiny_load(str(path), weights_only=False)                  # trusted file: loads
    assert torch.equal(t.gpt.output.weight, gsd["output.weight"])
    assert len(t.describe()["checkpoint"]) == 16                   # file sha256 prefix


def test_bf16_teacher_keeps_fp32_outputs(tiny_states):
    gsd, vsd = tiny_states
    t = tiny_load(gsd, vsd, dtype=torch.bfloat16)
    assert t.gpt.output.weight.dtype == torch.bfloat16 and t.gpt.freqs_cis.dtype == torch.float32
    assert t.vq.post_quant_conv.weight.dtype == torch.float32
    state = t.start(torch.tensor([1]), SamplingConfig(cfg_scale=2.0))
    assert t.step_probs(state).dtype == torch.float32 and t.codebook.dtype == torch.float32
    r = tiny_load(None, dtype=torch.bfloat16)                      # random weights, cast after init
    assert r.gpt.freqs_cis.dtype == torch.float32


def test_describe_is_json(tiny):
    d = json.loads(json.dumps(tiny.describe()))
    assert d["family"] == "llamagen" and d["config"]["dim"] == 64
    assert d["checkpoint"] == "in-memory" and d["tokenizer_config"]["codebook_size"] == 96
    assert tiny.num_steps == 16 and tiny.step_sizes == (1,) * 16 and tiny.embed_dim == 8
