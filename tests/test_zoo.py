"""The shipped digits zoo (teachers/zoo, trained by tools/train_digits_zoo.py): both teachers load by
name with the stated layouts, sample digits their classifier recognises, and the classifier works."""
import json
import os
import subprocess
import sys

import pytest
import torch

from teachers import load_teacher, zoo_names
from teachers import zoo
from teachers.base import SamplingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUT = {  # name -> (family, step_sizes, vocab_size, embed_dim)
    "digits-llamagen": ("llamagen", (1,) * 64, 128, 8),
    "digits-var": ("var", (1, 4, 9, 16, 36, 64), 64, 8),
}


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return {name: load_teacher(name) for name in LAYOUT}


@pytest.fixture(scope="module")
def classifier():
    return zoo.load_classifier()


@pytest.fixture(scope="module")
def heldout():
    return zoo.digits_data("test")


def test_names_and_data():
    assert set(LAYOUT) <= set(zoo_names())
    xtr, ytr = zoo.digits_data("train")
    xte, yte = zoo.digits_data("test")
    assert xtr.shape == (1500, 3, 16, 16) and xte.shape == (297, 3, 16, 16)
    assert ytr.shape == (1500,) and yte.shape == (297,) and yte.dtype == torch.long
    assert 0 <= xte.min() and xte.max() <= 1 and torch.equal(xte[:, 0], xte[:, 2])
    xall, _ = zoo.digits_data("all")
    assert torch.equal(torch.cat([xtr, xte]), xall)          # the split is a fixed cut of the bundled order
    assert set(yte.tolist()) == set(range(10))


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_teacher_layout_and_decode(teachers, heldout, name):
    family, steps, V, C = LAYOUT[name]
    t = teachers[name]
    meta = zoo.read_meta(name)
    assert t.family == family and t.step_sizes == steps and t.num_steps == len(steps)
    assert t.num_tokens == sum(steps) == meta["num_tokens"]
    assert t.num_classes == 10 and t.image_size == 16
    assert t.codebook.shape == (V, C) and t.codebook.dtype == torch.float32
    # the DD sampling defaults come from the JSON and are set on the instance only
    assert t.default_sampling == SamplingConfig(**meta["default_sampling"])
    assert "default_sampling" in vars(t) and t.ids["zoo"] == name
    g = torch.Generator().manual_seed(0)
    tokens = t.sample(torch.arange(10), t.default_sampling, generator=g)
    assert tokens.shape == (10, t.num_tokens) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < V
    img = t.decode(tokens)
    assert img.shape == (10, 3, 16, 16) and 0 <= img.min() and img.max() <= 1
    assert t.decode(t.embed(tokens)).sub(img).abs().max() < 1e-4   # continuous path = index path
    # the tokenizer reconstructs held-out digits well (measured MSE ~5e-4 LlamaGen, ~1e-3 VAR)
    x, _ = heldout
    rec = t.decode(t.encode(x[:64]))
    assert torch.mean((rec - x[:64]) ** 2) < 0.005


def test_classifier_heldout_accuracy(classifier, heldout):
    x, y = heldout
    with torch.no_grad():
        acc = (classifier(x).argmax(1) == y).float().mean().item()
        feats = classifier.features(x[:8])
    assert acc >= 0.95, acc           # measured 0.983 (297 held-out digits)
    assert feats.shape == (8, 128)


# Class accuracy of teacher samples (default sampling: LlamaGen cfg 2.0, VAR cfg 1.0), measured:
# digits-llamagen 0.965 and digits-var 0.971 on 1000 samples (teachers/zoo/*.json, "samples"). This
# test: 100 samples (10 per class), seed 1.
SAMPLE_ACC_BOUND = 0.8


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_samples_are_recognised(teachers, classifier, name):
    t = teachers[name]
    labels = torch.arange(10).repeat_interleave(10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        img = t.decode(t.sample(labels, t.default_sampling, generator=g))
        acc = (classifier(img).argmax(1) == labels).float().mean().item()
    assert acc >= SAMPLE_ACC_BOUND, f"{name}: only {acc:.2f} of its samples are classified as their label"


def test_digits_extractor(heldout):
    from distilled_decoding import extractors

    ext = extractors.get_extractor("digits", "cpu")
    x, y = heldout
    f, lg = ext.features_and_logits(x[:5])
    assert f.shape == (5, 128) and lg.shape == (5, 10) and ext.name == "digits"
    assert extractors.EXTRACTORS["digits"] is extractors.DigitsExtractor   # a callable, not an import string
    assert ext.has_logits and ext.features(x[:3]).shape == (3, 128)
    # the extractor is the zoo's classifier: same features, and its logits classify the held-out digits
    clf = zoo.load_classifier()
    with torch.no_grad():
        assert torch.equal(f, clf.features(x[:5])) and torch.equal(ext.logits(x[:5]), clf(x[:5]))
    assert (ext.logits(x[:50]).argmax(1) == y[:50]).float().mean() > 0.9


def test_missing_files_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "ZOO_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train_digits_zoo.py"):
        zoo.load("digits-var")
    with pytest.raises(FileNotFoundError, match="digits-classifier"):
        zoo.load_classifier()


def test_rejects_unknown_options():
    with pytest.raises(TypeError, match="ema"):
        zoo.load("digits-llamagen", ema=True)
    with pytest.raises(ValueError, match="unknown zoo teacher"):
        zoo.load("digits-nope")


def test_import_is_light():
    """Importing the teachers (and the zoo) must not pull in distilled_decoding (the metrics side)."""
    code = ("import sys, teachers, teachers.zoo; "
            "assert 'distilled_decoding' not in sys.modules; assert 'sklearn' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_json_sizes_and_names():
    total = 0
    for stem in ("digits-llamagen", "digits-var", "digits-classifier"):
        total += os.path.getsize(os.path.join(zoo.ZOO_DIR, stem + ".safetensors"))
        with open(os.path.join(zoo.ZOO_DIR, stem + ".json")) as f:
            meta = json.load(f)
        assert "data" in meta and "threads" in meta
    assert total < 8e6
