"""The README's digits table: the demo pipeline for both families at a larger budget (not in CI).

    python tools/run_table.py                       # both families, size "large"
    python tools/run_table.py --size default --out demo_out   # re-use `make demo`'s finished runs

Writes results/digits_table.md (one Table-1 block per family, plus the stage times) and
results/compare_<family>.png (rows teacher / DD 1-step / DD 2-step / teacher-mixed).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from distilled_decoding.demo import SIZES, run_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=["llamagen", "var"], choices=["llamagen", "var"])
    ap.add_argument("--size", default="large", choices=sorted(SIZES))
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_out", "table"))
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    os.makedirs(args.results, exist_ok=True)
    blocks = []
    for fam in args.family:
        info = run_demo(fam, os.path.join(args.out, fam), SIZES[args.size][fam], seed=args.seed, device=args.device)
        grid = os.path.join(args.results, f"compare_{fam}.png")
        shutil.copyfile(info["compare"], grid)
        s = info["seconds"]
        # a finished data set / run in --out is re-used (both resume), so these may be ~0
        blocks.append(f"{info['table']}\n\nThis invocation: build-dataset {s['build_dataset']:.0f} s, "
                      f"train {s['train']:.0f} s, whole run {s['total']:.0f} s (finished stages in --out are "
                      f"re-used). Grid: `{os.path.basename(grid)}`.")
    cmd = "python tools/run_table.py " + " ".join(sys.argv[1:])
    header = (f"# Distilled Decoding on the digits teachers\n\nMade by `{cmd.strip()}` on "
              f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, device {args.device}). ms / image is the model time per image "
              "(no VQ decoding) at the sampling batch size; speed-up is relative to the teacher row.\n")
    path = os.path.join(args.results, "digits_table.md")
    with open(path, "w") as f:
        f.write(header + "\n" + "\n\n".join(blocks) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
