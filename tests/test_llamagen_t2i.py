"""Text-to-image LlamaGen teacher: parity with the official t2i code, the official GPT-XL t2i layout,
strict loading, the Caption condition's errors, KV-cache consistency."""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from teachers import SamplingConfig
from teachers.base import Caption
from teachers.checkpoint import CheckpointMismatchError, load_strict
from teachers.llamagen import (GPT, GPT_IGNORE, GPTConfig, condition_attention_mask, left_pad, load,
                               rope_table_2d)
from teachers.llamagen_vq import VQConfig, VQModel

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "llamagen_t2i_official_tiny.pt"
MANIFEST = json.loads((HERE / "manifests" / "llamagen_t2i_official.json").read_text())
C2I_MANIFEST = json.loads((HERE / "manifests" / "llamagen_official.json").read_text())
TINY_VQ = dict(codebook_size=64, codebook_embed_dim=8, ch=32, z_channels=32, encoder_ch_mult=(1, 2),
               decoder_ch_mult=(1, 2), num_res_blocks=1)
# The fixture's tokenizer: the official VQModel(ModelArgs(**OFFICIAL_VQ)) (its ch = 128 and
# num_res_blocks = 2 are fixed there); 8x8 images <-> 4x4 = 16 tokens of the tiny GPT's vocabulary.
OFFICIAL_VQ = dict(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2],
                   z_channels=32)
VQ_SEED = 5


def vq_weights(shapes: dict, seed: int = VQ_SEED) -> dict:
    """Deterministic weights from each key's name (shared with tools/llamagen_t2i_parity_fixture.py,
    so the fixture needs no weights): norm scales near 1, small biases, unit-gain conv / linear maps."""
    out = {}
    for k, shape in shapes.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(k.encode()))
        r = torch.randn(tuple(shape), generator=g)
        if "norm" in k and len(shape) == 1:
            out[k] = 1 + 0.1 * r if k.endswith("weight") else 0.1 * r
        elif len(shape) == 1:
            out[k] = 0.1 * r
        else:
            out[k] = r / math.prod(shape[1:]) ** 0.5
    return out


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def teacher(official):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VQModel(VQConfig.from_dict(OFFICIAL_VQ)).state_dict().items()}
    return load(official["config"], {"model": official["state_dict"]}, tokenizer_config=OFFICIAL_VQ,
                tokenizer_checkpoint={"model": vq_weights(shapes)})


def caption(official, left: bool = True) -> Caption:
    if left:
        return Caption(official["left_features"], official["left_mask"])
    return Caption(official["t5_features"], official["t5_mask"])


# ---- parity with the official code (tools/llamagen_t2i_parity_fixture.py) ----------------------------
def test_left_pad_is_the_official_step(official):
    cap = left_pad(official["t5_features"], official["t5_mask"])
    assert torch.equal(cap.features, official["left_features"])
    assert torch.equal(cap.mask, official["left_mask"].bool())
    assert cap.mask[0, -5:].all() and not cap.mask[0, :-5].any()   # 5 valid tokens moved to the end


def test_teacher_forced_logits_match_official(official, teacher):
    z = official["tokens"]
    got = teacher.logits(caption(official), z)
    assert got.shape == (3, 16, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, official["tf_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(teacher.logits(caption(official, left=False), z), official["tf_logits_right"],
                               rtol=0, atol=1e-5)
    null = teacher.gpt.null_condition(3)                               # the learned null caption
    torch.testing.assert_close(teacher.gpt(null, z, caption(official).mask), official["tf_logits_null"],
                               rtol=0, atol=1e-5)
    # the fixture can fail: ignoring the caption mask, or the caption, moves the logits
    assert (teacher.gpt(caption(official).features, z) - official["tf_logits"]).abs().max() > 1e-2
    assert (official["tf_logits_null"] - official["tf_logits"]).abs().max() > 1e-1


def test_vq_matches_official(official, teacher):
    """The t2i tokenizer is the VQ-16 code: encode indices and decode_code against the official module."""
    assert torch.equal(teacher.vq.encode(official["vq_images"]), official["vq_encode_idx"])
    x = teacher.vq.decode_code(official["greedy_cfg_tokens"])                    # [3, 3, 8, 8]
    torch.testing.assert_close(x, official["vq_decode"], rtol=0, atol=1e-5)
    torch.testing.assert_close(teacher.decode(official["greedy_cfg_tokens"]),
                               ((official["vq_decode"] + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)
    assert len(official["vq_encode_idx"].unique()) > 4                          # not a degenerate code


@pytest.mark.parametrize("run", ["greedy_cfg", "greedy_cfg_right", "seeded_cfg", "seeded_nocfg"])
def test_generation_matches_official(official, teacher, run):
    spec = official["runs"][run]
    s = SamplingConfig(cfg_scale=spec["cfg_scale"], temperature=spec["temperature"], top_k=spec["top_k"],
                       top_p=spec["top_p"])
    cap = caption(official, left=spec["left_padded"])
    g = None if spec["seed"] is None else torch.Generator().manual_seed(spec["seed"])
    seen = []

    def choose(_step, probs):                 # as generate.py: multinomial, or top-1 when greedy
        seen.append(probs[:, 0].clone())
        if g is None:
            return probs.argmax(-1)
        return torch.multinomial(probs[:, 0], 1, generator=g)

    tokens = teacher.generate(cap, s, choose)
    torch.testing.assert_close(torch.stack(seen, 1), official[f"{run}_probs"], rtol=0, atol=1e-5)
    assert torch.equal(tokens, official[f"{run}_tokens"])
    if g is not None:                         # Teacher.sample draws the same way
        again = teacher.sample(cap, s, generator=torch.Generator().manual_seed(spec["seed"]))
        assert torch.equal(again, official[f"{run}_tokens"])


def test_padding_side_matters_only_for_the_first_token(official):
    """Caption RoPE rows are zero, so where the padding sits changes nothing for the image tokens'
    queries, but token 0 is predicted from position L-1: the last real word when left-padded (the
    official default), a pad slot when right-padded."""
    left, right = official["tf_logits"], official["tf_logits_right"]
    torch.testing.assert_close(left[:, 1:], right[:, 1:], rtol=0, atol=1e-5)
    d0 = (left[:, 0] - right[:, 0]).abs().amax(-1)
    assert d0[1] == 0 and d0[0] > 1e-1 and d0[2] > 1e-1               # caption 1 has no padding
    assert (official["seeded_cfg_probs"] - official["seeded_nocfg_probs"]).abs().max() > 1e-2


# ---- the mask and the KV cache ------------------------------------------------------------------------
def test_condition_attention_mask_rows():
    key_ok = torch.tensor([[False, True, True]])                       # L = 3, position 0 padded
    m = condition_attention_mask(key_ok, 0, 5)[0, 0]                   # [5, 5]
    expected = torch.tensor([[1, 0, 0, 0, 0],                          # a padded row sees itself only
                             [0, 1, 0, 0, 0],
                             [0, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0],
                             [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    assert torch.equal(condition_attention_mask(key_ok, 3, 2)[0, 0], expected[3:])


def test_cached_cfg_stepping_matches_teacher_forcing(official, teacher):
    cap, z = caption(official), official["tokens"]
    s = SamplingConfig(cfg_scale=3.0)
    c = teacher.logits(cap, z)
    u = teacher.gpt(teacher.gpt.null_condition(3), z, cap.mask)
    state = teacher.start(cap, s)
    assert state.cache.k.shape[1] == 6                                 # [cond; null]
    for i in range(16):
        torch.testing.assert_close(state.last_logits[:3], c[:, i], rtol=0, atol=1e-5)
        torch.testing.assert_close(state.last_logits[3:], u[:, i], rtol=0, atol=1e-5)
        teacher.feed(state, z[:, i:i + 1])


def test_prefix_prefill_matches_stepping(official, teacher):
    cap = caption(official)
    s = SamplingConfig(cfg_scale=2.0, top_k=20)
    full = teacher.generate(cap, s, lambda _s, p: p.argmax(-1))
    for m in (1, 9):
        assert torch.equal(teacher.generate(cap, s, lambda _s, p: p.argmax(-1), prefix=full[:, :m]), full)
    assert torch.equal(teacher.generate(cap[1:], s, lambda _s, p: p.argmax(-1)), full[1:])  # batch slicing


# ---- official layout and strict loading ---------------------------------------------------------------
def _zeros(shapes: dict) -> dict:
    """A state dict of the given shapes without memory (zero-stride zeros)."""
    return {k: torch.zeros(()).expand(*s) for k, s in shapes.items()}


def test_gpt_xl_t2i_layout_matches_official():
    official = MANIFEST["GPT-XL-t2i"]
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("GPT-XL", model_type="t2i"))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official["keys"] and list(ours) == list(official["keys"])   # same order too
    assert official["num_keys"] == 258 and official["num_elements"] == 777_923_840
    assert sum(math.prod(s) for s in ours.values()) == official["num_elements"]
    assert official["keys"]["cls_embedding.uncond_embedding"] == [120, 2048]
    assert GPTConfig.from_dict({"preset": "GPT-XL", "model_type": "t2i"}) == model.config


def test_gpt_xl_t2i_loads_strictly_on_meta_build():
    cfg = GPTConfig.preset("GPT-XL", model_type="t2i", image_size=512)
    gpt = load_strict(lambda: GPT(cfg), _zeros(MANIFEST["GPT-XL-t2i"]["keys"]), ignore=GPT_IGNORE)
    left = [n for n, t in list(gpt.named_parameters()) + list(gpt.named_buffers()) if t.is_meta]
    assert not left
    assert gpt.freqs_cis.shape == (120 + 1024, 32, 2)
    assert torch.equal(gpt.freqs_cis[:120], torch.zeros(120, 32, 2))   # caption positions: zero rows
    assert torch.equal(gpt.freqs_cis, rope_table_2d(32, 64, 10000, 120))


def test_t2i_vq_layout_is_vq16():
    official = MANIFEST["VQ-16-t2i"]
    with torch.device("meta"):
        vq = VQModel(VQConfig.preset("VQ-16"))
    expected = {k: v for k, v in official["keys"].items() if k not in official["ignorable"]}
    assert {k: list(v.shape) for k, v in vq.state_dict().items()} == expected
    assert official["keys"] == C2I_MANIFEST["VQ-16"]["keys"]          # vq_ds16_t2i.pt: the c2i architecture


def test_wrong_checkpoints_refused_by_key_name(official):
    sd, cfg = official["state_dict"], official["config"]

    def one_line_error(src, config=cfg, match=""):
        with pytest.raises(CheckpointMismatchError, match=match) as e:
            load(config, src, tokenizer_config=TINY_VQ)
        return str(e.value)

    one_line_error({k: v for k, v in sd.items() if k != "cls_embedding.cap_proj.fc2.weight"},
                   match=r"missing.*cls_embedding\.cap_proj\.fc2\.weight")
    one_line_error({**sd, "cls_embedding.extra": torch.zeros(1)}, match=r"unexpected.*cls_embedding\.extra")
    one_line_error({**sd, "cls_embedding.uncond_embedding": torch.zeros(77, 16)},
                   match=r"cls_embedding\.uncond_embedding: checkpoint \(77, 16\)")
    # a class-conditional checkpoint given to the t2i config, and the reverse: one line naming the key
    c2i = {k: v for k, v in sd.items() if not k.startswith("cls_embedding.")}
    c2i["cls_embedding.embedding_table.weight"] = torch.zeros(1001, 32)
    msg = one_line_error(c2i, match=r"class-conditional.*cls_embedding\.embedding_table\.weight.*'t2i'")
    assert "\n" not in msg
    c2i_cfg = {**cfg, "model_type": "c2i", "cls_token_num": 1, "num_classes": 1000}
    msg = one_line_error({"model": sd}, config=c2i_cfg, match=r"text-to-image.*cls_embedding\.cap_proj\.fc1")
    assert "\n" not in msg


def test_c2i_xl_state_refused_by_t2i_xl():
    c2i = _zeros(C2I_MANIFEST["GPT-XL"]["keys"])
    with pytest.raises(CheckpointMismatchError, match=r"cls_embedding\.embedding_table\.weight.*'c2i'"):
        load({"preset": "GPT-XL", "model_type": "t2i"}, c2i, tokenizer_config=TINY_VQ | {"codebook_size": 16384})


# ---- bad inputs: one-line errors ----------------------------------------------------------------------
def test_bad_conditions_give_one_line_errors(official, teacher):
    f, m = official["left_features"], official["left_mask"]
    s = SamplingConfig(cfg_scale=2.0)
    cases = [
        (lambda: teacher.start(Caption(torch.zeros(3, 120, 12), m), s), r"dimension 12.*caption_dim=16"),
        (lambda: Caption(f, m[:, :100]), r"mask \(3, 100\) does not match the features \(3, 120, 16\)"),
        (lambda: Caption(f, m[:2]), r"does not match"),
        (lambda: Caption(f[0], m[0]), r"\[B, L, D\]"),
        (lambda: teacher.logits(Caption(f[:, :60], m[:, :60]), official["tokens"]), r"60 token positions.*120"),
        (lambda: teacher.start(torch.tensor([1, 2, 3]), s), r"text-conditional.*Caption"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            fn()
        assert "\n" not in str(e.value)


def test_caption_given_to_c2i_teacher_refused():
    t = load({"dim": 32, "n_layer": 1, "n_head": 2, "vocab_size": 64, "block_size": 16, "num_classes": 10,
              "multiple_of": 16}, tokenizer_config=TINY_VQ)
    with pytest.raises(ValueError, match="class-conditional"):
        t.start(Caption(torch.zeros(1, 120, 16), torch.ones(1, 120)), SamplingConfig())


def test_t2i_teacher_describes_itself(teacher):
    assert teacher.text_conditional and teacher.num_classes == 0
    assert teacher.default_sampling == SamplingConfig(cfg_scale=7.5, temperature=1.0, top_k=1000, top_p=1.0)
    assert teacher.describe()["config"]["model_type"] == "t2i"
    assert GPTConfig.from_dict({"preset": "GPT-B", "model_type": "t2i"}).cls_token_num == 120
    with pytest.raises(ValueError, match="model_type"):
        GPTConfig(model_type="t2v")
