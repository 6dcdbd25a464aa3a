"""PNG figures: the quality-speed trade-off of a quality table (the shape of the DD paper's Fig. 3) and
the training curves of a `dd train` run.

matplotlib is imported lazily with the Agg backend (no display), so importing this module costs
nothing and `dd` starts without it.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

CURVES_FILE = "curves.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, axes, title: str, path: str) -> str:
    """Grid on every panel, the title on the first, save as PNG and free the figure -> path."""
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tradeoff_plot(rows: List[dict], path: str, title: str = "") -> str:
    """rows: `quality.table_rows` output. Two panels against ms / image (log x): g (top: 0 = the
    teacher, 1 = onestep*; values above G_TOP are drawn at the top edge with their value) and FID vs
    teacher (bottom, log y, the floor as a dashed line). Error bars: the spread over sampling seeds.
    One colour per method, named in the legend. -> path."""
    import math

    plt = _pyplot()
    fig, (ax_g, ax_f) = plt.subplots(2, 1, figsize=(9.0, 6.4), sharex=True)
    for i, r in enumerate(x for x in rows if x["key"] != "teacher"):
        ms = 1e3 * r["mean"]["s_per_image"]
        colour = f"C{i}"
        label = f"{r['method']} ({r['steps']} steps)"
        if not math.isnan(r["g"]):
            shown = min(r["g"], G_TOP)
            ax_g.scatter([ms], [shown], s=36, color=colour, marker="^" if r["g"] > G_TOP else "o")
            if r["g"] > G_TOP:
                ax_g.annotate(f"g = {r['g']:.1f}", (ms, shown), fontsize=7, xytext=(5, -10), textcoords="offset points")
        ax_f.errorbar([ms], [r["mean"]["fid_teacher"]], yerr=[r["spread"]["fid_teacher"]], fmt="o", ms=6,
                      capsize=3, color=colour, label=label)
    floor = next((r for r in rows if r["key"] == "floor"), None)
    if floor is not None:
        ax_f.axhline(floor["mean"]["fid_teacher"], ls="--", lw=1, color="grey", label="floor (teacher vs teacher)")
    ax_g.axhline(0, ls="--", lw=1, color="grey")
    ax_g.axhline(1, ls=":", lw=1, color="grey")
    ax_g.set_ylim(-0.1, G_TOP + 0.1)
    ax_g.set_ylabel("normalised gap g\n(0 = teacher, 1 = onestep*)")
    ax_f.set_ylabel("FID vs teacher\n(mean ± sd over seeds)")
    ax_f.set_yscale("log")
    ax_f.set_xscale("log")
    ax_f.set_xlabel("ms / image (model time)")
    ax_f.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 1.05), frameon=False)
    return _finish(plt, fig, (ax_g, ax_f), title, path)


G_TOP = 1.5   # the g panel's upper edge


def read_metrics(path: str) -> List[dict]:
    """A run's metrics.jsonl -> its records (a partly written last line is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def curves_plot(metrics_path: str, path: str, title: str = "") -> str:
    """The loss terms of a run's metrics.jsonl (loss, ce, emb; whichever are non-zero) vs step, log y.
    -> path."""
    plt = _pyplot()
    recs = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [r["step"] for r in recs]
    for key, label in (("loss", "total (λ-weighted)"), ("ce", "CE (logits head)"), ("emb", "embedding loss")):
        ys = [r.get(key, 0.0) for r in recs]
        if any(y > 0 for y in ys):
            ax.plot(steps, ys, label=label, lw=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (mean over the log window)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _finish(plt, fig, (ax,), title, path)


_warned: set = set()


def update_curves(out: str, metrics_path: str, step: int, log_every: int, ckpt_every: int, max_steps: int,
                  log=print) -> Optional[str]:
    """What `dd train` calls after each metrics line: redraw OUT/curves.png every 10 log lines, at
    checkpoints and at the end. A missing matplotlib is reported once and training goes on."""
    if not (step % (10 * log_every) == 0 or step % ckpt_every == 0 or step == max_steps):
        return None
    try:
        return curves_plot(metrics_path, os.path.join(out, CURVES_FILE), title=os.path.basename(os.path.normpath(out)))
    except ImportError as e:
        if "curves" not in _warned:
            _warned.add("curves")
            log(f"note: no training-curve plot ({e}); install matplotlib")
        return None
