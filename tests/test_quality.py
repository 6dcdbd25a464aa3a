"""The quality table (distilled_decoding/quality.py) on a tiny random teacher: its columns, the floor
row's own seeds, and g recomputed from the printed numbers."""
import numpy as np
import pytest
import torch

from distilled_decoding import quality
from distilled_decoding.seeding import reference_seed, sample_seeds
from distilled_decoding.extractors import ModuleExtractor
from distilled_decoding.sampling import TokenMarginals, to_uint8
from tiny_teachers import saved_teacher

N = 60


class _Features(torch.nn.Module):
    """A fixed random conv net: images [N, 3, H, W] -> (features [N, 8], logits [N, 10])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        f = self.conv(x * 4 - 2).flatten(2).std(2) * 100
        return f, self.head(f)


def _write(path, images, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, to_uint8(images), labels.numpy())
    return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    _, teacher = saved_teacher("llamagen", tmp)
    labels = torch.arange(10).repeat_interleave(N // 10)
    ref_seed, seeds = reference_seed(0), sample_seeds(0, 3)
    files = {k: [] for k in ("teacher", "floor", "noisy", "onestep")}
    used = {"teacher": [ref_seed], "floor": seeds, "noisy": seeds, "onestep": seeds}

    def draw(seed):
        return teacher.sample(labels, teacher.default_sampling, generator=torch.Generator().manual_seed(seed))

    files["teacher"].append(_write(tmp / "ref.npz", teacher.decode(draw(ref_seed)), labels))
    pool = torch.cat([draw(10_000 + i) for i in range(4)])
    marg = TokenMarginals(pool, labels.repeat(4), 10)
    for s in seeds:
        tok = draw(s)
        files["floor"].append(_write(tmp / f"floor{s}.npz", teacher.decode(tok), labels))
        noisy = (teacher.decode(tok) + 0.15 * torch.randn(N, 3, *teacher.decode(tok[:1]).shape[-2:],
                                                          generator=torch.Generator().manual_seed(s))).clamp(0, 1)
        files["noisy"].append(_write(tmp / f"noisy{s}.npz", noisy, labels))
        # a random tiny teacher barely uses token dependence: the stand-in for onestep* adds more noise
        # to its token marginals so that the g denominator is clearly positive
        one = teacher.decode(marg.sample(labels, torch.Generator().manual_seed(s)))
        one = (one + 0.4 * torch.randn(one.shape, generator=torch.Generator().manual_seed(s + 1))).clamp(0, 1)
        files["onestep"].append(_write(tmp / f"one{s}.npz", one, labels))
    ext = ModuleExtractor(_Features(), name="tiny", returns_logits=True)
    real = teacher.decode(draw(99))
    real_f = ext.features(real).numpy()
    timings = {k: [1e-3 * (i + 1)] * len(v) for i, (k, v) in enumerate(files.items())}
    methods = [("teacher", "teacher", 16), ("floor", "teacher, independent draws (floor)", 16),
               ("noisy", "teacher + pixel noise", 16), ("onestep", "onestep* + pixel noise", 1)]
    rows = quality.evaluate_rows(methods, files, used, real_f, ext, timings)
    return rows, quality.format_table(rows, "tiny"), used


def test_columns_and_rows(table):
    rows, md, _ = table
    head = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert head == ["method", "steps", "seeds", "FID vs real ↓", "FID vs teacher ↓", "g ↓", "precision ↑",
                    "recall ↑", "class acc. ↑", "ms / image", "speed-up"]
    parsed = quality.parse_table(md)
    assert list(parsed) == ["teacher", "teacher, independent draws (floor)", "teacher + pixel noise", "onestep* + pixel noise"]
    for name, row in parsed.items():
        if name != "teacher":   # every evaluated row: a mean ± spread over its 3 seeds
            for col in ("FID vs real ↓", "FID vs teacher ↓", "precision ↑", "recall ↑"):
                assert "±" in row[col], (name, col, row[col])
    assert parsed["teacher"]["FID vs teacher ↓"] == "0 (reference)" and parsed["teacher"]["g ↓"] == "—"
    assert parsed["teacher"]["speed-up"] == "1.0×" and parsed["onestep* + pixel noise"]["speed-up"] == "0.2×"


def test_floor_uses_other_seeds_than_the_teacher(table):
    rows, md, used = table
    parsed = quality.parse_table(md)
    ref = set(parsed["teacher"]["seeds"].split(","))
    floor = set(parsed["teacher, independent draws (floor)"]["seeds"].split(","))
    assert len(floor) == 3 and not ref & floor
    floor_fid = quality.printed_mean(parsed["teacher, independent draws (floor)"]["FID vs teacher ↓"])
    assert floor_fid > 0            # an independent draw is not the reference itself
    with pytest.raises(ValueError, match="other seeds"):
        quality.evaluate_rows([], {}, {"teacher": [1], "floor": [1, 2]}, None, None)


def test_g_is_computed_from_the_printed_numbers(table):
    _, md, _ = table
    parsed = quality.parse_table(md)
    fid = {k: quality.printed_mean(v["FID vs teacher ↓"]) for k, v in parsed.items()}
    floor, one = fid["teacher, independent draws (floor)"], fid["onestep* + pixel noise"]
    assert one > floor
    for name, row in parsed.items():
        if name == "teacher":
            continue
        assert float(row["g ↓"]) == pytest.approx((fid[name] - floor) / (one - floor), abs=5e-4), name
    assert parsed["onestep* + pixel noise"]["g ↓"] == "1.000" and parsed["teacher, independent draws (floor)"]["g ↓"] == "0.000"


def test_normalised_gap_and_summary():
    assert quality.normalised_gap(5.0, 1.0, 9.0) == 0.5
    assert np.isnan(quality.normalised_gap(5.0, 3.0, 3.0))
    assert quality.summarise([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert quality.printed_mean("97.1%") == pytest.approx(0.971)


def test_plots_are_written(table, tmp_path):
    """The trade-off plot of a table and the training curves of a metrics.jsonl are PNGs."""
    import json

    from PIL import Image

    from distilled_decoding import plots

    rows, _, _ = table
    png = plots.tradeoff_plot(rows, str(tmp_path / "tradeoff.png"), "tiny")
    assert Image.open(png).size[0] > 100
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "ce": 1.5 / s, "emb": 0.0}) + "\n"
                               for s in range(10, 110, 10)) + '{"step": 11')   # a half-written last line
    assert len(plots.read_metrics(str(metrics))) == 10
    # dd train's cadence: every 10 log lines, at checkpoints and at the end
    assert plots.update_curves(str(tmp_path), str(metrics), 30, 10, 1000, 500) is None
    out = plots.update_curves(str(tmp_path), str(metrics), 100, 10, 1000, 500)
    assert out == str(tmp_path / plots.CURVES_FILE) and Image.open(out).size[0] > 100
