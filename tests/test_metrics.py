"""Metrics (FID, IS, precision/recall), the FID Inception re-implementation and the `dd eval` verb."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from distilled_decoding import extractors as E
from distilled_decoding import metrics as M
from distilled_decoding.cli import main as cli
from distilled_decoding.inception import FIDInceptionV3, preprocess
from teachers.checkpoint import CheckpointMismatchError

MANIFEST = os.path.join(os.path.dirname(__file__), "manifests", "inception_fid.json")


def _json(path):
    with open(path) as f:
        return json.load(f)


# --- FID --------------------------------------------------------------------------------------------

def test_feature_stats_is_float64_mean_and_unbiased_cov():
    f = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = M.feature_stats(torch.from_numpy(f))
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)


def test_fid_of_identical_feature_sets_is_zero():
    f = np.random.default_rng(1).normal(size=(400, 16)) * 3 + 1
    mu, sigma = M.feature_stats(f)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # Rank-deficient covariances (N < D): sqrtm of a singular product is only good to ~sqrt(eps).
    mu, sigma = M.feature_stats(f[:6])
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-7 * np.trace(sigma)


def test_fid_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(2)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # The same Gaussians in a rotated basis: FID is invariant, and sqrtm now has real work to do.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = M.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-7)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- Inception Score --------------------------------------------------------------------------------

def test_inception_score_of_uniform_predictions_is_one():
    probs = np.full((100, 7), 1 / 7)
    assert M.inception_score(probs)[0] == pytest.approx(1.0, abs=1e-12)
    assert M.inception_score(np.zeros((100, 7)), kind="logits")[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_distinct_predictions_is_k():
    K = 5
    labels = np.tile(np.arange(K), 40)            # every one of the 10 splits holds each class 4 times
    onehot = np.eye(K)[labels]
    mean, std = M.inception_score(onehot, splits=10)            # auto-detected as probabilities
    assert mean == pytest.approx(K, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = M.inception_score(torch.from_numpy(60.0 * onehot), splits=10)   # auto-detected as logits
    assert mean == pytest.approx(K, rel=1e-6)
    with pytest.raises(ValueError, match="splits"):
        M.inception_score(onehot[:3], splits=10)


# --- precision / recall -----------------------------------------------------------------------------

def _brute_radii(x, k):
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


def test_knn_radii_exclude_self_and_do_not_depend_on_chunking():
    x = np.random.default_rng(3).normal(size=(57, 6)).astype(np.float32)
    want = _brute_radii(x.astype(np.float64), 3)
    for chunk in (5, 16, 1000):
        np.testing.assert_allclose(M.knn_radii(x, k=3, chunk=chunk).numpy(), want, rtol=1e-4)


def test_precision_recall_identical_far_and_chunked():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(120, 8)).astype(np.float32)
    fake = (rng.normal(size=(90, 8)) * 1.5 + 0.5).astype(np.float32)
    assert M.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert M.precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)
    p, r = M.precision_recall(real, fake, k=3, chunk=100000)
    assert 0.0 < p < 1.0 and 0.0 < r < 1.0
    assert M.precision_recall(real, fake, k=3, chunk=7) == (p, r)
    assert M.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, chunk=32) == (p, r)


# --- the FID Inception network ----------------------------------------------------------------------

def test_inception_state_dict_matches_pytorch_fid_manifest():
    man = _json(MANIFEST)
    with torch.device("meta"):
        net = FIDInceptionV3()
    got = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert set(got) == set(man["keys"])
    assert got == man["keys"] and list(got) == list(man["keys"])     # shapes, and torchvision's order
    assert len(got) == man["num_keys"] == 566
    assert sum(p.numel() for p in net.parameters()) == man["param_count"] == 23_850_960


def test_inception_forward_shapes_and_unbiased_logits():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 48)
    pre = preprocess(x)                                   # pytorch-fid: bilinear to 299, then [-1, 1]
    assert pre.shape == (2, 3, 299, 299) and pre.min() >= -1 and pre.max() <= 1
    torch.testing.assert_close(pre, 2 * F.interpolate(x, size=(299, 299), mode="bilinear") - 1)
    net = FIDInceptionV3(input_size=75).eval()            # the smallest valid input keeps this cheap
    with torch.no_grad():
        net.fc.bias.fill_(5.0)
        feats, logits = net(x)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert feats.dtype == logits.dtype == torch.float32 and torch.isfinite(feats).all()
    torch.testing.assert_close(logits, feats @ net.fc.weight.t())   # IS logits carry no bias


def test_inception_extractor_loads_strictly(tmp_path):
    path = tmp_path / "not_the_release.pth"
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), path)
    with pytest.warns(UserWarning, match="sha256"):
        ext = E.get_extractor(f"inception:{path}", "cpu")
    assert ext.name.startswith("inception-fid[sha256:") and ext.has_logits
    ext.module.input_size = 75
    f, lg = ext.features_and_logits(torch.rand(1, 3, 16, 16))
    assert f.shape == (1, 2048) and lg.shape == (1, 1008)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, bad)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        E.inception_extractor(bad, check_hash=False)


# --- extractors and dd eval -------------------------------------------------------------------------

class ToyExtractor(E.FeatureExtractor):
    """2x2 average-pooled colours (12-d) and a fixed random 5-class head."""

    name = "toy"

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.w = torch.randn(12, 5, generator=torch.Generator().manual_seed(0)).to(self.device)

    def features(self, images):
        return F.adaptive_avg_pool2d(images, 2).flatten(1)      # [N, 12]

    def logits(self, images):
        return 8.0 * self.features(images) @ self.w             # [N, 5]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(E.EXTRACTORS, "toy", ToyExtractor)
    return "toy"


def test_extractor_registry(toy, monkeypatch):
    assert isinstance(E.get_extractor("toy"), ToyExtractor)
    assert isinstance(E.get_extractor(f"{__name__}:ToyExtractor"), ToyExtractor)
    with pytest.raises(ValueError, match="already registered"):
        E.register_extractor("toy", ToyExtractor)
    monkeypatch.setitem(E.EXTRACTORS, "lazy", f"{__name__}:ToyExtractor")
    assert isinstance(E.get_extractor("lazy"), ToyExtractor)
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'"):
        E.get_extractor("nope")
    module = ToyExtractor()
    wrapped = E.ModuleExtractor(torch.nn.Flatten(), name="flat")
    assert not wrapped.has_logits and module.has_logits
    assert wrapped.features(torch.rand(3, 3, 2, 2)).shape == (3, 12)


def _images(seed, n, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(n, 1, 1, 3))
    return np.clip(base + rng.integers(0, 40, size=(n, 8, 8, 3)) + shift, 0, 255).astype(np.uint8)


def _run(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)], catch_exceptions=False)


def test_dd_eval_round_trip(tmp_path, toy):
    samples, ref = _images(0, 24, shift=30), _images(1, 30)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez_compressed(tmp_path / "ref.npz", arr_0=ref)

    # Reference statistics from images, then metrics against them.
    r = _run(tmp_path / "ref.npz", "--ref-stats", tmp_path / "stats.npz", "--extractor", toy, "--device", "cpu")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "stats.npz") as z:
        assert set(z.files) == {"mu", "sigma", "features", "extractor", "num_images"}
        assert z["features"].shape == (30, 12) and str(z["extractor"]) == "toy"
    r = _run(tmp_path / "samples.npz", "--ref", tmp_path / "stats.npz", "--extractor", toy,
             "--json", tmp_path / "out" / "res.json", "--batch-size", 7)
    assert r.exit_code == 0, r.output
    assert "FID" in r.output and "precision (k=3)" in r.output
    res = _json(tmp_path / "out" / "res.json")

    # The same numbers straight from the pure functions.
    ext = ToyExtractor()
    to_x = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255   # noqa: E731
    fs, fr = ext.features(to_x(samples)).numpy(), ext.features(to_x(ref)).numpy()
    assert res["fid"] == pytest.approx(M.frechet_distance(*M.feature_stats(fs), *M.feature_stats(fr)), rel=1e-6)
    assert (res["precision"], res["recall"]) == M.precision_recall(fr, fs, k=3)
    assert res["inception_score"] == pytest.approx(M.inception_score(ext.logits(to_x(samples)).numpy())[0])
    assert res["num_samples"] == 24 and res["num_ref"] == 30 and res["extractor"] == "toy"

    # Reference given as images (npz) and samples as a PNG folder give the same results.
    from PIL import Image
    (tmp_path / "png").mkdir()
    for i, im in enumerate(samples):
        Image.fromarray(im).save(tmp_path / "png" / f"{i:05d}.png")
    r = _run(tmp_path / "png", "--ref", tmp_path / "ref.npz", "--extractor", toy, "--json", tmp_path / "r2.json",
             "--ref-stats", tmp_path / "stats2.npz")
    assert r.exit_code == 0, r.output
    res2 = _json(tmp_path / "r2.json")
    for key in ("fid", "inception_score", "precision", "recall"):
        assert res2[key] == pytest.approx(res[key], rel=1e-5)
    with np.load(tmp_path / "stats.npz") as a, np.load(tmp_path / "stats2.npz") as b:
        np.testing.assert_array_equal(a["features"], b["features"])


def test_dd_eval_stats_without_features_and_foreign_extractor(tmp_path, toy, monkeypatch):
    np.savez(tmp_path / "s.npz", arr_0=_images(0, 12))
    np.savez(tmp_path / "r.npz", arr_0=_images(1, 12), mu=np.zeros(2048), sigma=np.eye(2048))  # ADM ref batch
    r = _run(tmp_path / "r.npz", "--ref-stats", tmp_path / "st.npz", "--no-features", "--extractor", toy)
    assert r.exit_code == 0, r.output
    r = _run(tmp_path / "s.npz", "--ref", tmp_path / "r.npz", "--extractor", toy)
    assert r.exit_code == 0 and "also holds mu/sigma; they were ignored" in r.output
    r = _run(tmp_path / "s.npz", "--ref", tmp_path / "st.npz", "--extractor", toy, "--json", tmp_path / "o.json")
    assert r.exit_code == 0, r.output
    res = _json(tmp_path / "o.json")
    assert res["fid"] is not None and res["precision"] is None and res["recall"] is None
    assert any("precision/recall need reference features" in n for n in res["notes"])

    class Other(ToyExtractor):
        name = "other"
    monkeypatch.setitem(E.EXTRACTORS, "other", Other)
    r = _run(tmp_path / "s.npz", "--ref", tmp_path / "st.npz", "--extractor", "other")
    assert r.exit_code != 0 and "made with extractor 'toy'" in r.output


def test_dd_eval_refuses_malformed_inputs(tmp_path, toy):
    np.savez(tmp_path / "floats.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    r = _run(tmp_path / "floats.npz", "--extractor", toy)
    assert r.exit_code != 0
    assert "floats.npz" in r.output and "arr_0" in r.output and "'images'" in r.output

    np.savez(tmp_path / "wrongdtype.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    r = _run(tmp_path / "wrongdtype.npz", "--extractor", toy)
    assert r.exit_code != 0 and "wrongdtype.npz" in r.output and "expected uint8 images" in r.output

    (tmp_path / "notzip.npz").write_bytes(b"not a zip file")
    r = _run(tmp_path / "notzip.npz", "--extractor", toy)
    assert r.exit_code != 0 and "notzip.npz" in r.output and "not a readable .npz" in r.output

    np.savez(tmp_path / "ok.npz", arr_0=_images(0, 4))
    r = _run(tmp_path / "ok.npz", "--ref", tmp_path / "floats.npz", "--extractor", toy)
    assert r.exit_code != 0 and "floats.npz" in r.output
