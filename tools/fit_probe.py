"""How well does a DD student fit its teacher's noise -> token map? Per-position, on held-out pairs.

    python tools/fit_probe.py --run RUN --data HELD_OUT_PAIRS [--train-data TRAIN_PAIRS] [--n 1000]

The flow map makes the teacher's token at position i a deterministic function of the noise and the
class (given the earlier tokens, of the noise at i alone). A student that has learned the map
predicts every token (argmax accuracy -> 1, cross-entropy -> 0); a student that ignores the noise can
do no better than the class-conditional marginal of each position (what onestep* samples from). For
each trained timestep t the probe reports, over the noise positions of X_t, the student's argmax
accuracy and cross-entropy (EMA weights) on held-out pairs (another `dd build-dataset --seed`) and,
with --train-data, on the training pairs (a gap = memorisation), next to the held-out cross-entropy
under the marginals counted on the training pairs (add-0.1 smoothing; without --train-data, the
plug-in entropy of the held-out pairs, biased low); `--by-step` prints the t = 1 rows by the teacher's AR step.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_pairs(path: str, n: int) -> Dict[str, torch.Tensor]:
    """The first n pairs of a pair data set -> {"noise" [n, T, C], "tokens" [n, T], "label" [n]}."""
    from distilled_decoding.dataset import PairDataset
    ds = PairDataset(path)
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([it[k] for it in items]) for k in ("noise", "tokens", "label")}


def marginal_ce(tokens: torch.Tensor, labels: torch.Tensor, vocab: int,
                ref_tokens: torch.Tensor, ref_labels: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """-> [T] cross-entropy (nats) of `tokens` [N, T] under each position's class-conditional token
    marginal counted on (ref_tokens, ref_labels) with add-`alpha` smoothing: what a student that ignores
    the noise (onestep*'s distribution) scores. With ref = the same pairs it is the plug-in entropy."""
    N, T = tokens.shape
    ce = torch.zeros(T)
    for c in labels.unique():
        counts = F.one_hot(ref_tokens[ref_labels == c], vocab).sum(0).float() + alpha     # [T, V]
        logp = (counts / counts.sum(-1, keepdim=True)).log()
        rows = tokens[labels == c]                                                      # [m, T]
        ce -= logp.gather(1, rows.T).sum(1) / N
    return ce


@torch.no_grad()
def fit(student, pairs: Dict[str, torch.Tensor], t: int, batch: int = 250) -> Dict[str, torch.Tensor]:
    """-> {"acc", "ce"}: [T] per-position argmax accuracy and cross-entropy of `student` at timestep t,
    and "noise" [T] bool: the positions that are noise in X_t (the ones the loss trains)."""
    from distilled_decoding.schedule import make_xt, prefix_mask
    cb = student.codebook
    accs, ces = [], []
    for i in range(0, len(pairs["label"]), batch):
        tok, noise, lab = (pairs[k][i:i + batch] for k in ("tokens", "noise", "label"))
        tt = torch.full((len(lab),), t, dtype=torch.long)
        logits, _ = student(make_xt(cb[tok], noise, tt, student.step_offsets), lab, tt)   # [b, T, V]
        accs.append((logits.argmax(-1) == tok).float())
        ces.append(F.cross_entropy(logits.permute(0, 2, 1), tok, reduction="none"))
    T = pairs["tokens"].shape[1]
    noise_pos = ~prefix_mask(student.step_offsets, torch.tensor([t - 1]), T)[0]
    return {"acc": torch.cat(accs).mean(0), "ce": torch.cat(ces).mean(0), "noise": noise_pos}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a `dd train` run directory")
    ap.add_argument("--data", required=True, help="held-out pairs of the same teacher (another --seed)")
    ap.add_argument("--train-data", help="the run's training pairs (to see memorisation)")
    ap.add_argument("--n", type=int, default=1000, help="pairs per set")
    ap.add_argument("--marginal-n", type=int, default=8000, help="training pairs that count the marginals")
    ap.add_argument("--by-step", action="store_true", help="also print t = 1 by the teacher's AR step")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from distilled_decoding.student_run import load_run
    student, info = load_run(a.run)
    sets = {"held-out": load_pairs(a.data, a.n)}
    if a.train_data:
        sets["train"] = load_pairs(a.train_data, a.n)
    ref = sets["held-out"]
    marg = load_pairs(a.train_data, a.marginal_n) if a.train_data else ref
    H = marginal_ce(ref["tokens"], ref["label"], student.codebook.shape[0], marg["tokens"], marg["label"])
    print(f"run {a.run}: {len(ref['label'])} pairs a set; EMA weights; mean over each timestep's noise positions\n")
    print("| t | set | argmax accuracy | cross-entropy (nats) | noise ignored: class-marginal CE |")
    print("|---:|---|---:|---:|---:|")
    per_pos = None
    for t in info["timesteps"]:
        for name, pairs in sets.items():
            r = fit(student, pairs, int(t))
            m = r["noise"]
            print(f"| {t} | {name} | {r['acc'][m].mean():.3f} | {r['ce'][m].mean():.3f} | {H[m].mean():.3f} |")
            if int(t) == 1 and name == "held-out":
                per_pos = r
    if a.by_step and per_pos is not None:
        print("\nt = 1, held-out, by AR step of the teacher (mean over its tokens):\n")
        print("| AR step | tokens | argmax accuracy | cross-entropy | class-marginal CE |")
        print("|---:|---:|---:|---:|---:|")
        offs = student.step_offsets
        for k in range(len(offs) - 1):
            sl = slice(offs[k], offs[k + 1])
            print(f"| {k + 1} | {offs[k]}..{offs[k + 1] - 1} | {per_pos['acc'][sl].mean():.3f} | "
                  f"{per_pos['ce'][sl].mean():.3f} | {H[sl].mean():.3f} |")


if __name__ == "__main__":
    main()
