"""The text-to-image zoo teacher digits-t2i (issue 18 step 3): captions from measured attributes, the
shipped text encoder (masking, strict loading), prompts -> Caption -> samples, prompt files through
`dd build-dataset` without feature files, and the caption-agreement score of `dd demo --family t2i`."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from teachers import load_teacher, zoo
from teachers.checkpoint import CheckpointMismatchError
from teachers.digit_captions import (VOCABULARY, AttributeThresholds, CaptionAttributes, all_captions,
                                     caption_agreement, caption_text, ink, parse_caption, slant)
from teachers.text_encoder import PromptEncoder, TextEncoder, TextEncoderConfig, WordTokenizer


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-t2i")


def test_caption_text_round_trip():
    seen = set()
    for d in range(10):
        for thick in (None, False, True):
            for slanted in (None, False, True):
                a = CaptionAttributes(d, thick, slanted)
                text = caption_text(a)
                assert parse_caption(text) == a and parse_caption(text.upper() + "  ") == a
                seen.add(text)
    assert len(seen) == 90
    assert caption_text(CaptionAttributes(7, True, True)) == "a thick, slanted seven"
    assert caption_text(CaptionAttributes(2, False, None)) == "a thin two"
    assert len(all_captions()) == 40 and len(set(all_captions())) == 40
    for bad in ("a thick slanted seven", "thick seven", "a seven thick", "a slanted, thick seven", "a thick, seven",
                "a 7", "a heavy seven"):
        with pytest.raises(ValueError, match="caption"):
            parse_caption(bad)


def test_measures_and_thresholds():
    x, y = zoo.digits_data("train")
    img = x[:50]
    # a thicker stroke has more ink; shearing the top to the right raises the slant
    thicker = torch.maximum(img, torch.roll(img, 1, dims=-1))
    assert bool((ink(thicker) > ink(img)).all())
    H = img.shape[-2]
    sheared = torch.stack([torch.stack([torch.roll(im[:, r], (H - 1 - r) // 4, dims=-1) for r in range(H)], 1)
                           for im in img])
    assert float((slant(sheared) - slant(img)).mean()) > 0.15
    assert float(slant(torch.flip(img, dims=[-1])).mean()) == pytest.approx(-float(slant(img).mean()), abs=1e-4)
    th = AttributeThresholds.fit(x, y)
    assert AttributeThresholds.from_dict(th.to_dict()) == th
    thick, slanted = th.measure(x, y)
    for d in range(10):          # median split: both words frequent for every digit
        assert 0.3 < float(thick[y == d].float().mean()) <= 0.5 + 1e-6
        assert 0.45 < float(slanted[y == d].float().mean()) <= 0.5 + 1e-6


def test_caption_agreement_on_crafted_cases():
    x, y = zoo.digits_data("test")
    th = AttributeThresholds.fit(x, y)
    caps = th.captions(x, y)
    a = caption_agreement(caps, y, x, th)
    assert a == {"digit": 1.0, "caption": 1.0, "thickness": 1.0, "slant": 1.0}
    flipped = [CaptionAttributes(c.label, not c.thick, c.slanted) for c in caps]
    a = caption_agreement(flipped, y, x, th)
    assert a["thickness"] == 0.0 and a["caption"] == 0.0 and a["slant"] == 1.0
    loose = [CaptionAttributes(c.label) for c in caps]        # unstated attributes always agree
    wrong = (y + 1) % 10
    a = caption_agreement(loose, wrong, x, th)
    assert a["digit"] == 0.0 and a["caption"] == 0.0 and np.isnan(a["thickness"])
    half = torch.where(torch.arange(len(y)) % 2 == 0, y, wrong)
    assert caption_agreement(caps, half, x, th)["caption"] == pytest.approx(0.5, abs=0.01)


def test_encoder_mask_and_tokenizer():
    torch.manual_seed(0)
    cfg = TextEncoderConfig(vocab_size=len(VOCABULARY), slots=8, dim=16, n_layer=2, n_head=2, out_dim=12)
    enc = TextEncoder(cfg).eval()
    for p in enc.parameters():     # a random encoder whose outputs differ visibly per token
        torch.nn.init.normal_(p, std=0.3)
    tok = WordTokenizer(VOCABULARY, 8)
    ids, mask = tok(["a thick, slanted seven", "a two"])
    assert mask.tolist() == [[False] * 3 + [True] * 5, [False] * 6 + [True] * 2]
    assert ids[0, 3:].tolist() == [VOCABULARY.index(w) for w in ("a", "thick", ",", "slanted", "seven")]
    with torch.no_grad():
        f = enc(ids, mask)
        # padding slots: whatever ids they hold, the real tokens' features do not change (keys masked,
        # positions counted from the first real token), and the padded features are zero
        junk = torch.where(mask, ids, torch.randint(1, len(VOCABULARY), ids.shape))
        assert torch.allclose(enc(junk, mask), f, atol=1e-6)
        assert float(f[~mask].abs().max()) == 0.0
        # right padding gives the same features at the real tokens
        right_ids = torch.stack([torch.roll(i, -int((~m).sum())) for i, m in zip(ids, mask)])
        right_mask = torch.flip(mask, dims=[1])
        fr = enc(right_ids, right_mask)
        assert torch.allclose(fr[right_mask], f[mask], atol=1e-6)
        # the attention is real: another word changes the other tokens' features
        other, _ = tok(["a thin, slanted seven", "a two"])
        assert not torch.allclose(enc(other, mask)[0, -1], f[0, -1], atol=1e-4)
    for bad, match in (("a purple seven", "unknown word"), ("a seven!", "characters"),
                       ("a thick, slanted, thick, slanted seven", "has 9 tokens")):
        with pytest.raises(ValueError, match=match):
            tok([bad])
    cap = PromptEncoder(tok, enc)(["a seven", "a thin, upright zero"])
    assert cap.features.shape == (2, 8, 12) and cap.mask.sum(1).tolist() == [2, 5]


def test_zoo_teacher_loads_strictly_and_refuses_a_wrong_key(teacher, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    meta = zoo.read_meta("digits-t2i")
    cfg = teacher.gpt.config
    assert teacher.text_conditional and teacher.num_classes == 0 and teacher.num_steps == 64
    assert (cfg.cls_token_num, cfg.caption_dim) == (8, 32) == (meta["text_encoder_config"]["slots"],
                                                                meta["text_encoder_config"]["out_dim"])
    assert teacher.prompt_encoder is not None and teacher.prompt_encoder.dim == cfg.caption_dim
    assert teacher.ids["zoo"] == "digits-t2i" and teacher.default_sampling.cfg_scale == meta["default_sampling"]["cfg_scale"]
    # the VQ is digits-llamagen's, unchanged
    base = load_file(os.path.join(zoo.ZOO_DIR, "digits-llamagen.safetensors"))
    mine = load_file(os.path.join(zoo.ZOO_DIR, "digits-t2i.safetensors"))
    assert all(torch.equal(v, mine[k]) for k, v in base.items() if k.startswith("vq."))
    assert os.path.getsize(os.path.join(zoo.ZOO_DIR, "digits-t2i.safetensors")) < 3e6
    # a renamed text-encoder key is refused, by name
    for stem in ("digits-t2i", "digits-classifier"):
        for ext in (".json", ".safetensors"):
            shutil.copy(os.path.join(zoo.ZOO_DIR, stem + ext), tmp_path / (stem + ext))
    key = "text.layers.1.qkv.weight"
    sd = dict(mine)
    sd["text.layers.1.qkv.weights"] = sd.pop(key)
    save_file(sd, str(tmp_path / "digits-t2i.safetensors"))
    monkeypatch.setattr(zoo, "ZOO_DIR", str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match=re.escape("layers.1.qkv.weight")):
        load_teacher("digits-t2i")


def test_prompts_to_caption_to_samples(teacher):
    prompts = ["a thick, slanted seven", "a thin, upright zero"]
    cap = teacher.prompt_encoder(prompts)
    assert cap.features.shape == (2, 8, 32) and cap.mask.sum(1).tolist() == [5, 5]
    g = torch.Generator().manual_seed(0)
    tokens = teacher.sample(cap, teacher.default_sampling, generator=g)
    assert tokens.shape == (2, 64)
    images = teacher.decode(tokens)
    assert images.shape == (2, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1
    # the caption is used: teacher-forced logits differ between the two prompts
    lg = teacher.logits(cap, tokens[:1].expand(2, -1))
    assert not torch.allclose(lg[0], lg[1], atol=1e-3)


def test_build_dataset_from_a_prompt_file_alone(tmp_path):
    from distilled_decoding.captions import read_side_table
    from distilled_decoding.dataset_cli import build_dataset_command

    prompts = tmp_path / "p.txt"
    prompts.write_text("a thick, slanted seven\na two\n")
    common = ["--teacher", "digits-t2i", "--num-samples", "4", "--batch-size", "4", "--nfe", "2", "--device", "cpu",
              "--no-progress"]
    r = CliRunner().invoke(build_dataset_command, common + ["--out", str(tmp_path / "D"), "--prompts", str(prompts)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    t = read_side_table(str(tmp_path / "D"))
    assert t.prompts == ["a thick, slanted seven", "a two"] and t.features.shape == (2, 8, 32)
    assert t.mask.sum(1).tolist() == [5, 2]
    # a word the encoder does not know, and no prompts at all: one-line errors, nothing written
    prompts.write_text("a thick, slanted seven\na purple two\n")
    for extra, match in ((["--prompts", str(prompts)], "unknown word"), ([], r"give --prompts FILE$")):
        out = tmp_path / "E"
        r = CliRunner().invoke(build_dataset_command, common + ["--out", str(out)] + extra)
        msg = r.output.strip()
        assert r.exit_code != 0 and len(msg.splitlines()) == 1 and re.search(match, msg), msg
        assert not out.exists()


def test_demo_caption_columns(tmp_path, teacher):
    """t2i_scores's per-file scorer on a crafted samples.npz: real digits under their own captions agree
    fully; under the digit-swapped prompt set they do not; the quality table carries the columns."""
    from distilled_decoding import quality
    from distilled_decoding.t2i_scores import caption_columns, caption_scorer

    x, y = zoo.digits_data("test")
    x, y = x[:40], y[:40]
    th = zoo.attribute_thresholds()
    img = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    q = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    prompts = [caption_text(c) for c in th.captions(q, y)]
    path = str(tmp_path / "samples.npz")
    np.savez(path, img, np.arange(40))
    logits = torch.nn.functional.one_hot(y, 10).float().numpy()
    m = caption_scorer(prompts, th)(path, logits, np.arange(40))
    assert m == {"acc": 1.0, "caption": 1.0, "thickness": 1.0, "slant": 1.0}
    swapped = [caption_text(CaptionAttributes((c.label + 1) % 10, c.thick, c.slanted))
               for c in th.captions(q, y)]
    m2 = caption_scorer(swapped, th)(path, logits, np.arange(40))
    assert m2["acc"] == 0.0 and m2["caption"] == 0.0
    # dd eval --caption-agreement reads the prompts.txt that dd sample writes ("index<TAB>prompt")
    from distilled_decoding.evaluate import eval_cmd
    (tmp_path / "prompts.txt").write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(prompts)))
    r = CliRunner().invoke(eval_cmd, [path, "--extractor", "digits", "--device", "cpu", "--splits", "1",
                                      "--caption-agreement", str(tmp_path / "prompts.txt")], catch_exceptions=False)
    assert r.exit_code == 0 and re.search(r"caption agreement\s+(0\.9\d|1\.0)", r.output), r.output
    (tmp_path / "prompts.txt").write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(swapped)))
    r = CliRunner().invoke(eval_cmd, [path, "--extractor", "digits", "--device", "cpu", "--splits", "1",
                                      "--caption-agreement", str(tmp_path / "prompts.txt")], catch_exceptions=False)
    assert r.exit_code == 0 and re.search(r"caption agreement\s+0\.0", r.output), r.output
    values = {k: [0.0] for k in quality.METRICS}
    rows = quality.table_rows([{"key": k, "method": k, "steps": 1, "seeds": [1],
                                "values": {**values, **{a: [m[a]] for a in ("caption", "thickness", "slant")}}}
                               for k in ("teacher", "floor", "onestep")])
    table = quality.format_table(rows, "t", extra_columns=caption_columns())
    assert "caption agr." in table and quality.parse_table(table)["floor"]["caption agr. ↑"] == "100.0%"


def test_t2i_demo_end_to_end(tmp_path):
    """`dd demo --family t2i`'s pipeline at a toy budget: every verb runs through the prompts, the table
    has the Table-3 rows with the floor at g = 0, onestep* at g = 1 and the caption columns."""
    from distilled_decoding.demo import DemoSize, run_t2i_demo

    size = DemoSize(num_pairs=40, train_steps=3, batch_size=8, lr=3e-3, ema_decay=0.9, num_samples=80,
                    sample_batch=80, num_seeds=1, timestep_weights=(3, 1))
    info = run_t2i_demo(str(tmp_path / "demo"), size, log=lambda s: None)
    with open(tmp_path / "demo" / "run" / "config.json") as f:
        assert json.load(f)["train"]["timestep_weights"] == [3, 1]
    assert "3 training steps of batch 8 (timesteps drawn 3:1)" in info["table"]
    rows = {r["key"]: r for r in info["rows"]}
    assert set(rows) == {"teacher", "floor", "dd1", "dd2", "onestep"}, sorted(rows)
    assert rows["floor"]["g"] == 0.0 and rows["onestep"]["g"] == 1.0
    for key in ("floor", "dd1", "onestep"):
        assert 0.0 <= rows[key]["mean"]["caption"] <= 1.0, rows[key]["mean"]
    assert "caption agr." in info["table"] and "DD 2-step" in info["table"]
    with open(info["prompts"]) as f:
        assert f.read().splitlines() == all_captions()
