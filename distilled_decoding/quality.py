"""The quality table of the demo and tools/run_table.py: the paper's Table 1 measures, read against
the right zeros.

Every method is sampled at several seeds (`samples.npz` per seed). One extra teacher draw at its own
seed is the *reference* that "vs teacher" columns compare with; the teacher drawn again at the
evaluation seeds is the *floor* row: what an exact copy of the teacher scores against the reference
with this many samples (FID with 1000 samples is not 0 even for the same distribution). Per row:

    FID vs real      against held-out real images (`real_floor`: real-vs-real at the same sizes)
    FID vs teacher   against the reference teacher draw
    g                (FID_t(method) - FID_t(floor)) / (FID_t(onestep*) - FID_t(floor)), the paper's
                     normalised gap: 0 = as good as the teacher, 1 = no better than independent tokens
    precision/recall Kynkaanniemi et al. (k = 3) of the method's features against the reference's
    class acc.       the feature network's agreement with the requested label

Each number is the mean over the seeds, "± spread" the sample standard deviation across them. g is
computed from the printed (rounded) means, so anyone can recompute it from the table.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

METRICS = ("fid_real", "fid_teacher", "precision", "recall", "acc", "s_per_image")
FLOOR, ONESTEP = "floor", "onestep"


def features_of(path: str, extractor) -> tuple:
    """samples.npz -> (features [N, D] fp32, logits [N, K] fp32, labels [N] int64)."""
    from .extractors import extract_features
    from .image_sets import open_source

    f, lg = extract_features(extractor, open_source(path), batch_size=250, desc=os.path.basename(os.path.dirname(path)))
    with np.load(path) as z:
        labels = z["arr_1"]
    return f, lg, labels


def real_floor(real_feats: np.ndarray, pool_feats: np.ndarray, num: int, seed: int = 0) -> float:
    """FID of `num` real images drawn (with replacement when needed) from `pool_feats` [M, D] against
    `real_feats` [N, D]: the FID vs real a perfect generator would score with these set sizes."""
    from .metrics import feature_stats, frechet_distance

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool_feats), size=num, replace=num > len(pool_feats))
    return max(0.0, frechet_distance(*feature_stats(pool_feats[idx]), *feature_stats(real_feats)))


def score(paths: Dict[str, List[str]], reference: str, real_feats: np.ndarray, extractor,
          timings: Optional[Dict[str, List[float]]] = None, k: int = 3,
          per_file: Optional[Callable[[str, np.ndarray, np.ndarray], Dict[str, float]]] = None
          ) -> Dict[str, Dict[str, List[float]]]:
    """paths: {key: [samples.npz per seed]}; reference: the teacher's reference samples.npz.
    -> {key: {metric: [value per seed]}} for METRICS (s_per_image from `timings` when given).
    per_file(path, logits [N, K], labels [N]) -> {metric: value}: more metrics of each file, or
    replacements (a text-to-image table sets "acc" from caption indices, t2i_demo.py)."""
    from .metrics import feature_stats, frechet_distance, precision_recall

    mu_r, s_r = feature_stats(real_feats)
    ref_f, _, _ = features_of(reference, extractor)
    mu_t, s_t = feature_stats(ref_f)
    out = {}
    for key, files in paths.items():
        rows = {m: [] for m in METRICS}
        for i, p in enumerate(files):
            f, lg, labels = features_of(p, extractor)
            mu, s = feature_stats(f)
            # max(0, .): sqrtm round-off makes identical sets come out at -1e-13
            rows["fid_real"].append(max(0.0, frechet_distance(mu, s, mu_r, s_r)))
            rows["fid_teacher"].append(max(0.0, frechet_distance(mu, s, mu_t, s_t)))
            prec, rec = precision_recall(ref_f, f, k=k)
            rows["precision"].append(prec)
            rows["recall"].append(rec)
            rows["acc"].append(float((lg.argmax(1) == labels).mean()) if lg is not None else float("nan"))
            rows["s_per_image"].append(timings[key][i] if timings else float("nan"))
            for m, v in (per_file(p, lg, labels) if per_file else {}).items():
                if m == "acc":
                    rows["acc"][-1] = v
                elif m in METRICS:
                    raise ValueError(f"per_file may replace 'acc' only, not {m!r}")
                else:
                    rows.setdefault(m, []).append(v)
        out[key] = rows
    return out


def evaluate_rows(methods: Sequence[tuple], files: Dict[str, List[str]], seeds: Dict[str, List[int]],
                  real_feats: np.ndarray, extractor, timings: Optional[Dict[str, List[float]]] = None,
                  anchor: str = ONESTEP, per_file: Optional[Callable] = None) -> List[dict]:
    """methods: [(key, label, steps)] in table order, one key "teacher" (its single file is the
    reference), one "floor" (the teacher at other seeds) and one `anchor` (g = 1: onestep* for DD);
    files/seeds/timings: {key: [per seed]}. -> the rows of `table_rows`, ready for `format_table`."""
    if set(seeds["teacher"]) & set(seeds[FLOOR]):
        raise ValueError(f"the floor row must use other seeds than the reference teacher draw "
                         f"({seeds[FLOOR]} vs {seeds['teacher']})")
    values = score(files, files["teacher"][0], real_feats, extractor, timings, per_file=per_file)
    return table_rows([{"key": k, "method": label, "steps": steps, "seeds": list(seeds[k]), "values": values[k]}
                       for k, label, steps in methods], anchor=anchor)


def summarise(values: Sequence[float]) -> tuple:
    """-> (mean, sample standard deviation; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def normalised_gap(fid_teacher: float, floor: float, onestep: float) -> float:
    """g = (FID_t - floor) / (FID_t(onestep*) - floor); nan when onestep* is not above the floor."""
    den = onestep - floor
    return (fid_teacher - floor) / den if den > 0 else float("nan")


def _pm(mean: float, sd: Optional[float], digits: int, pct: bool = False) -> str:
    """'mean ± sd' (sd None: one seed, the mean alone)."""
    scale = 100.0 if pct else 1.0
    s = f"{scale * mean:.{digits}f}"
    return s + (f" ± {scale * sd:.{digits}f}" if sd is not None else "") + ("%" if pct else "")


HEADER = ("| method | steps | seeds | FID vs real ↓ | FID vs teacher ↓ | g ↓ | precision ↑ | recall ↑ | "
          "class acc. ↑ | ms / image | speed-up |")
RULE = "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"


def table_rows(rows: List[dict], anchor: str = ONESTEP) -> List[dict]:
    """Add the printed strings and g to each row. A row: {key, method, steps, seeds: [int],
    values: {metric: [per seed]}}; one row must have key "floor" and one key `anchor` (onestep* for
    DD) for g, and the speed-up is relative to the row with key "teacher"."""
    printed = {r["key"]: round(summarise(r["values"]["fid_teacher"])[0], 2) for r in rows}
    t_teacher = summarise(next(r for r in rows if r["key"] == "teacher")["values"]["s_per_image"])[0]
    out = []
    for r in rows:
        v = r["values"]
        m = {k: summarise(v[k]) for k in v}     # METRICS and any per_file extras
        g = (normalised_gap(printed[r["key"]], printed[FLOOR], printed[anchor])
             if FLOOR in printed and anchor in printed and r["key"] != "teacher" else float("nan"))
        spi = m["s_per_image"][0]
        out.append({**r, "mean": {k: m[k][0] for k in m}, "spread": {k: m[k][1] for k in m},
                    "g": g, "speedup": t_teacher / spi if spi > 0 else float("inf")})
    return out


def format_table(rows: List[dict], title: str, notes: Sequence[str] = (),
                 extra_columns: Sequence[Tuple[str, Callable[[dict], str]]] = ()) -> str:
    """Markdown: the paper's Table 1 columns plus seeds, g, precision and recall (rows of `table_rows`);
    extra_columns: (header, row -> cell text) appended on the right (ARD: GFLOPs, MSE to the teacher)."""
    head = HEADER + "".join(f" {h} |" for h, _ in extra_columns)
    lines = [f"**{title}**", "", head, RULE + "---:|" * len(extra_columns)]
    for r in rows:
        m = r["mean"]
        s = r["spread"] if len(r["seeds"]) > 1 else dict.fromkeys(r["spread"])
        fid_t = "0 (reference)" if r["key"] == "teacher" else _pm(m["fid_teacher"], s["fid_teacher"], 2)
        g = "—" if np.isnan(r["g"]) else f"{r['g']:.3f}"
        prec = "—" if r["key"] == "teacher" else _pm(m["precision"], s["precision"], 3)
        rec = "—" if r["key"] == "teacher" else _pm(m["recall"], s["recall"], 3)
        lines.append(f"| {r['method']} | {r['steps']} | {','.join(map(str, r['seeds']))} | "
                     f"{_pm(m['fid_real'], s['fid_real'], 2)} | {fid_t} | {g} | {prec} | {rec} | "
                     f"{_pm(m['acc'], s['acc'], 1, pct=True)} | {1e3 * m['s_per_image']:.2f} | {r['speedup']:.1f}× |"
                     + "".join(f" {cell(r)} |" for _, cell in extra_columns))
    if notes:
        lines += [""] + list(notes)
    return "\n".join(lines)


def parse_table(markdown: str) -> Dict[str, dict]:
    """The rows of a `format_table` table -> {method: {column: printed text}} (for tests and tools)."""
    header = next((ln for ln in markdown.splitlines() if ln.startswith(HEADER)), HEADER)   # with extra columns
    head = [c.strip() for c in header.strip().strip("|").split("|")]
    out = {}
    for line in markdown.splitlines():
        if not line.startswith("| ") or line == header:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(head):
            out[cells[0]] = dict(zip(head, cells))
    return out


def printed_mean(cell: str) -> float:
    """'12.34 ± 0.56' -> 12.34; '0 (reference)' -> 0.0; '97.1%' -> 0.971."""
    first = cell.split("±")[0].split("(")[0].strip()
    return float(first[:-1]) / 100 if first.endswith("%") else float(first)
