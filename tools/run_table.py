"""The README's digits table: the demo pipeline for both families (not in CI).

    python tools/run_table.py --size default --out demo_out   # = `make demo` for both families
    python tools/run_table.py                                 # both families, size "large"

Writes results/digits_table.md (one quality table per family, see distilled_decoding/quality.py,
plus the stage times), and per family results/compare_<family>.png (rows teacher / DD 1-step /
DD 2-step / teacher-mixed), results/tradeoff_<family>.png (g and FID vs ms / image) and
results/curves_<family>.png (the student's loss terms vs step), then quotes the table in README.md
between its BEGIN/END markers (tests/test_docs.py checks that the two agree). Another --size writes
digits_table_<size>.md and <kind>_<family>_<size>.png instead and leaves README.md alone. Finished
data sets and runs in --out are re-used (both resume); samples and evaluation are always redone.
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

from distilled_decoding.demo import SIZES, procs_for_tool, run_demo  # noqa: E402

README = os.path.join(ROOT, "README.md")
TABLE = os.path.join(ROOT, "results", "digits_table.md")
# issue 13's wall-clock budgets, per family on 2 CPU cores
BUDGETS = {"default": "`make demo` minus the venv set-up, budget 10 min on 2 CPU cores",
           "large": "`dd demo --size large`, budget 40 min on 2 CPU cores"}
BEGIN, END = "<!-- BEGIN results/digits_table.md -->", "<!-- END results/digits_table.md -->"


def splice_readme(readme: str, table: str) -> str:
    """The README text with `table` (digits_table.md's text, its "# " title dropped) between the markers."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"README.md must hold one {BEGIN} ... {END} section")
    lines = table.strip("\n").split("\n")
    if lines[0].startswith("# "):
        lines = lines[1:]
    body = "\n".join(lines).strip("\n")
    return readme[: readme.index(BEGIN) + len(BEGIN)] + "\n" + body + "\n" + readme[readme.index(END):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=["llamagen", "var"], choices=["llamagen", "var"])
    ap.add_argument("--size", default="large", choices=sorted(SIZES))
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_out", "table"))
    ap.add_argument("--results", default=os.path.dirname(TABLE))
    ap.add_argument("--no-readme", action="store_true", help="do not quote the new table in README.md")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--procs", type=int, default=None,
                    help="local ranks of build-dataset and train, as `dd demo --procs` (same default)")
    args = ap.parse_args()
    args.procs = procs_for_tool(ap, args.procs, args.device)

    os.makedirs(args.results, exist_ok=True)
    suffix = "" if args.size == "default" else f"_{args.size}"
    blocks, minutes = [], []
    for fam in args.family:
        info = run_demo(fam, os.path.join(args.out, fam), SIZES[args.size][fam], seed=args.seed, device=args.device,
                        procs=args.procs)
        pics = {}
        for kind in ("compare", "tradeoff", "curves"):
            pics[kind] = os.path.join(args.results, f"{kind}_{fam}{suffix}.png")
            shutil.copyfile(info[kind], pics[kind])
        s = info["seconds"]
        minutes.append(f"{fam} {s['total'] / 60:.1f} min")
        blocks.append(f"{info['table']}\n\nThis invocation: build-dataset {s['build_dataset']:.0f} s, "
                      f"train {s['train']:.0f} s, sampling + evaluation {s['sample_and_eval']:.0f} s, whole "
                      f"pipeline {s['total']:.0f} s ({s['total'] / 60:.1f} min; finished stages in --out are re-used, "
                      f"so a re-run's may be ~0). Pictures: `{os.path.basename(pics['compare'])}` (grid), "
                      f"`{os.path.basename(pics['tradeoff'])}` (quality vs speed), "
                      f"`{os.path.basename(pics['curves'])}` (training curves).")
    cmd = "python tools/run_table.py " + " ".join(sys.argv[1:])
    header = (f"# Distilled Decoding on the digits teachers\n\nMade by `{cmd.strip()}` on "
              f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} thread(s) a process; "
              f"build-dataset and train on {args.procs} local rank(s), sampling in one process; "
              f"torch {torch.__version__}, device {args.device}). ms / image is the model time per image "
              "(no VQ decoding) at the sampling batch size; speed-up is relative to the teacher row. "
              "g = (FID vs teacher − floor) / (FID vs teacher of onestep* − floor), from the printed means: "
              "0 is as good as an independent draw of the teacher, 1 no better than independent tokens. "
              f"Whole pipeline per family in this invocation ({BUDGETS.get(args.size, 'size ' + args.size)}): "
              f"{', '.join(minutes)}.\n")
    path = os.path.join(args.results, f"digits_table{suffix}.md")
    table = header + "\n" + "\n\n".join(blocks) + "\n"
    with open(path, "w") as f:
        f.write(table)
    print(f"wrote {path}")
    if not args.no_readme and os.path.abspath(path) == TABLE:
        with open(README) as f:
            text = splice_readme(f.read(), table)
        with open(README, "w") as f:
            f.write(text)
        print(f"quoted it in {README}")


if __name__ == "__main__":
    main()
