"""ARD's ablation table on the digits DiT (issue 16): which history, how many lower blocks, 2 vs 4 steps.

    python tools/run_ard_table.py --out /tmp/ard_ablation            # results/ard_ablation.md
    python tools/run_ard_table.py --out /tmp/x --rows m1 m4 m1-s2 m4-s2 --results /tmp/x/table.md

One trajectory set (`dd ard build-dataset`, S = 4, paper kept set) trains every student; the S = 2
students train on its nested kept set (`--steps 2`). Every student gets the same budget: the same
training steps, batch, lr (constant) and EMA, seed 0. Rows, besides the teacher's DDIM-25 (reference
draw and floor), its DDIM-4 and DDIM-2 from the same noise and the one-step KD student (g's anchor):

    m1, m2, m3, m4      mask M1 (step distillation) / M2 / M3 / M4 in the default N lower blocks, S = 4
    m4-n2, m4-n4        M4 in N = 2 / 4 lower blocks (N sweep)
    m1-s2, m4-s2        M1 / M4 with S = 2
    x0-m1, x0-m4        M1 / M4 on a second set whose history holds the teacher's x̂_0 (--history x0)
    m1-ft, m4-ft        m1 / m4 fine-tuned --finetune-steps more on the regression loss alone (`--init`)
    m1-d, m4-d          m1 / m4 fine-tuned as long with the discriminator stage (--disc-weight, --disc-start-step)
    m1-d-l1, m4-d-l1    ... at λ = 1 whatever --disc-weight says (m1-d-l0.1, m4-d-l0.1: λ = 0.1), for a λ sweep

A fine-tune row starts from its base row's finished run (`dd ard train --init`, a fresh optimizer), so
`-ft` is the control that isolates what the discriminator adds to the same regression budget.

Sampling, timing, scoring and the columns are `ard_demo.evaluate_methods` (the same code, seeds and
reference draw as `dd ard demo`). Finished data sets, runs and sample sets in --out are re-used (all
resume), so a re-run only redoes the evaluation. The written page also checks issue 16's "done when"
from the printed means. An existing --results file is refused unless --append or --overwrite.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from distilled_decoding.ard_demo import (SIZES, TEACHER, ARDDemoSize, Method, build_trajectories,  # noqa: E402
                                         evaluate_methods, train_student)
from distilled_decoding.demo import procs_for_tool  # noqa: E402
from distilled_decoding.fileio import atomic_write  # noqa: E402
from distilled_decoding.quality import format_table, summarise  # noqa: E402

RESULTS = os.path.join(ROOT, "results", "ard_ablation.md")


@dataclasses.dataclass(frozen=True)
class StudentRow:
    """A student row: mask, N lower blocks, S steps, the history kind of its trajectory set."""

    mask: str
    lower_layers: int
    num_steps: int = 4
    history: str = "state"
    base: str = ""            # a fine-tune: the row whose run it starts from
    disc: bool = False        # ... with the discriminator stage
    disc_weight: float = 0.0  # ... at this λ (0: the --disc-weight of the invocation)

    def label(self, finetune_steps: int = 0, disc_weight: float = 0.0) -> str:
        disc_weight = self.disc_weight or disc_weight
        what = "step distillation" if self.mask == "M1" else "ARD"
        hist = ", x̂_0 history" if self.history == "x0" else ""
        blocks = "" if self.mask == "M1" else f", N = {self.lower_layers}"
        text = f"{what} {self.num_steps}-step ({self.mask}{blocks}{hist})"
        if self.base:
            text += (f" + {finetune_steps} steps R + D (λ {disc_weight:g})" if self.disc
                     else f" + {finetune_steps} steps regression")
        return text

    def train_args(self) -> List:
        return ["--steps", self.num_steps, "--mask", self.mask, "--lower-layers", self.lower_layers]


def student_rows(default_n: int) -> Dict[str, StudentRow]:
    """The registry of student rows, N defaulting to the teacher's scaled paper value."""
    return {"m1": StudentRow("M1", default_n), "m2": StudentRow("M2", default_n), "m3": StudentRow("M3", default_n),
            "m4": StudentRow("M4", default_n), "m4-n2": StudentRow("M4", 2), "m4-n4": StudentRow("M4", 4),
            "m1-s2": StudentRow("M1", default_n, 2), "m4-s2": StudentRow("M4", default_n, 2),
            "x0-m1": StudentRow("M1", default_n, history="x0"), "x0-m4": StudentRow("M4", default_n, history="x0"),
            "m1-ft": StudentRow("M1", default_n, base="m1"), "m4-ft": StudentRow("M4", default_n, base="m4"),
            "m1-d": StudentRow("M1", default_n, base="m1", disc=True),
            "m4-d": StudentRow("M4", default_n, base="m4", disc=True),
            **{f"{m}-d-l{lam:g}": StudentRow(m.upper(), default_n, base=m, disc=True, disc_weight=lam)
               for m in ("m1", "m4") for lam in (1.0, 0.1)}}


DEFAULT_ROWS = ["m1", "m2", "m3", "m4", "m4-n2", "m4-n4", "m1-s2", "m4-s2"]


def final_loss(run: str) -> Dict[str, float]:
    """The last metrics record's loss terms of a run (loss, step0.., and the discriminator stage's)."""
    last = None
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                last = json.loads(line)
    stage = ("gan_g", "d_weight", "d_loss", "d_real", "d_fake")         # the discriminator stage's, when on
    return {k: v for k, v in (last or {}).items() if k in ("loss", *stage) or k.startswith("step") and k != "step"}


@torch.no_grad()
def exposure_errors(run: str, data: str, device: str = "cpu", batch: int = 250) -> Dict[str, List[float]]:
    """Per step k, the mean squared error (data space) between the student's output k and the teacher's
    state k+1 of held-out trajectories, (a) teacher-forced (its inputs are the teacher's states, as in
    training) and (b) free-running (its inputs are its own outputs, as in sampling). (b) − (a) is the
    exposure bias that seeing the history is meant to correct. -> {"forced": [S], "own": [S]}."""
    from distilled_decoding.ard_student import ard_sample
    from distilled_decoding.ard_train import load_ard_run
    from distilled_decoding.trajectories import TrajectoryDataset
    student = load_ard_run(run, device)
    ds = TrajectoryDataset(data, num_steps=student.config.num_steps)
    sums = {"forced": 0.0, "own": 0.0}
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(len(ds), start + batch))]
        states = torch.stack([it["states"] for it in items]).to(device)          # [B, S+1, C, H, W]
        labels = torch.stack([it["labels"] for it in items]).to(device)
        for kind, forcing in (("forced", states[:, :-1]), ("own", None)):
            out = ard_sample(student, states[:, 0], labels, teacher_forcing=forcing)[:, 1:]
            sums[kind] = sums[kind] + (out - states[:, 1:]).pow(2).flatten(2).mean(-1).sum(0)   # [S]
    return {k: (v / len(ds)).tolist() for k, v in sums.items()}


def criteria(rows: Dict[str, dict]) -> List[str]:
    """Issue 16's "done when", judged on the mean over seeds (± the sd of the seeds), where the rows exist."""
    def m(key, metric):
        return summarise(rows[key]["values"][metric])

    def pm(v):
        return f"{v[0]:.2f} ± {v[1]:.2f}"

    lines = []
    if {"m4", "m1"} <= rows.keys():
        a, b = m("m4", "fid_teacher"), m("m1", "fid_teacher")
        lines.append(f"- ARD-4 (M4) beats step distillation-4 on FID vs teacher: {pm(a)} vs {pm(b)} -> "
                     f"{'yes' if a[0] < b[0] else 'no'}{' (within one sd)' if abs(a[0] - b[0]) < max(a[1], b[1]) else ''}")
        a = summarise(rows["m4"]["mse_teacher_endpoint"])
        b = summarise(rows["m1"]["mse_teacher_endpoint"])
        lines.append(f"- ... and on the MSE to the teacher's endpoint: {a[0]:.5f} ± {a[1]:.5f} vs {b[0]:.5f} ± "
                     f"{b[1]:.5f} -> {'yes' if a[0] < b[0] else 'no'}")
    if {"m4", "m1", "m4-s2", "m1-s2"} <= rows.keys():
        ga = m("m4-s2", "fid_teacher")[0] - m("m4", "fid_teacher")[0]
        gb = m("m1-s2", "fid_teacher")[0] - m("m1", "fid_teacher")[0]
        lines.append(f"- ARD's FID gain from 2 to 4 steps is larger than step distillation's: {ga:.2f} vs {gb:.2f} -> "
                     f"{'yes' if ga > gb else 'no'}")
    if {"m4", "ddim4"} <= rows.keys():
        a, b = m("m4", "fid_teacher"), m("ddim4", "fid_teacher")
        lines.append(f"- ARD-4 beats the teacher's own DDIM-4 on FID vs teacher: {pm(a)} vs {pm(b)} -> "
                     f"{'yes' if a[0] < b[0] else 'no'}")
    for lam in ("", "-l1", "-l0.1"):          # the -d rows at --disc-weight, λ = 1, λ = 0.1
        at = f" (λ {lam[2:]})" if lam else ""
        for a_key, b_key, what in ((f"m4-d{lam}", f"m1-d{lam}", f"ARD-4 + D{at} beats step distillation-4 + D{at}"),
                                   (f"m4-d{lam}", "m4-ft", f"ARD-4 + D{at} beats ARD-4 fine-tuned as long without D"),
                                   (f"m1-d{lam}", "m1-ft", f"step distillation-4 + D{at} beats it fine-tuned as long without D")):
            if not {a_key, b_key} <= rows.keys():
                continue
            a, b = m(a_key, "fid_teacher"), m(b_key, "fid_teacher")
            lines.append(f"- {what} on FID vs teacher: {pm(a)} vs {pm(b)} -> {'yes' if a[0] < b[0] else 'no'}"
                         f"{' (within one sd)' if abs(a[0] - b[0]) < max(a[1], b[1]) else ''}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    long = SIZES["long"]
    ap.add_argument("--out", required=True, help="work directory: data, runs, samples (re-used on a re-run)")
    ap.add_argument("--results", default=RESULTS, help="the markdown page to write")
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help=f"student rows besides KD (default {DEFAULT_ROWS})")
    ap.add_argument("--trajectories", type=int, default=long.num_trajectories)
    ap.add_argument("--train-steps", type=int, default=long.train_steps, help="per student (S = 4 and S = 2 alike)")
    ap.add_argument("--kd-steps", type=int, default=long.kd_steps)
    ap.add_argument("--finetune-steps", type=int, default=200, help="the -ft and -d rows' steps after their base run")
    ap.add_argument("--disc-weight", type=float, default=10.0, help="the -d rows' λ (the public ARD code's 10)")
    ap.add_argument("--disc-start-step", type=int, default=50, help="the -d rows' adversarial start (heads warm up)")
    ap.add_argument("--disc-lr", type=float, default=1e-3, help="the -d rows' heads' lr")
    ap.add_argument("--batch-size", type=int, default=long.batch_size)
    ap.add_argument("--lr", type=float, default=long.lr)
    ap.add_argument("--ema-decay", type=float, default=long.ema_decay)
    ap.add_argument("--num-samples", type=int, default=long.num_samples, help="per method and sampling seed")
    ap.add_argument("--seeds", type=int, default=long.num_seeds, help="sampling seeds")
    ap.add_argument("--sample-batch", type=int, default=long.sample_batch)
    ap.add_argument("--timing-batch", type=int, default=long.timing_batch)
    ap.add_argument("--timing-rounds", type=int, default=long.timing_rounds)
    ap.add_argument("--exposure", type=int, default=500,
                    help="held-out trajectories (seed --seed + 7) for the teacher-forced vs own-rollout errors; 0: none")
    ap.add_argument("--title", default="", help="a heading for this block (e.g. the regime it probes)")
    ap.add_argument("--append", action="store_true", help="append to an existing --results page")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --results page")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (of each rank)")
    ap.add_argument("--procs", type=int, default=None,
                    help="local ranks of build-dataset and train, as `dd ard demo --procs` (same default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from distilled_decoding.ard_cli import ard_group
    from distilled_decoding.ard_train import default_lower_layers
    from teachers import load_teacher

    torch.set_num_threads(args.threads)
    args.procs = procs_for_tool(ap, args.procs, args.device)
    if os.path.exists(args.results) and not (args.append or args.overwrite):
        ap.error(f"--results {args.results} exists: pass --append or --overwrite")
    registry = student_rows(default_lower_layers(load_teacher(TEACHER).model.cfg.depth))
    unknown = [r for r in args.rows if r not in registry]
    if unknown:
        ap.error(f"--rows {unknown}: choose from {sorted(registry)}")
    size = ARDDemoSize(num_trajectories=args.trajectories, train_steps=args.train_steps, kd_steps=args.kd_steps,
                       batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, num_samples=args.num_samples,
                       num_seeds=args.seeds, sample_batch=args.sample_batch, timing_batch=args.timing_batch,
                       timing_rounds=args.timing_rounds)
    verbs = dict(ard_group.commands)
    log = print
    t0 = time.perf_counter()
    rows = {k: registry[k] for k in args.rows}
    missing = sorted({r.base for r in rows.values() if r.base} - set(rows))
    if missing:
        ap.error(f"--rows: the fine-tune rows need their base rows {missing} too")
    datas = {h: os.path.join(args.out, "data" if h == "state" else f"data-{h}")
             for h in ["state"] + sorted({r.history for r in rows.values()} - {"state"})}
    for h, d in datas.items():
        build_trajectories(verbs, d, size, args.seed, args.device, log, history=h, procs=args.procs)
    t_data = time.perf_counter() - t0

    runs, train_s = {"kd": os.path.join(args.out, "run-kd")}, {}
    def job(k: str, r: StudentRow):
        if not r.base:
            return (k, datas[r.history], r.train_args(), size.train_steps)
        extra = r.train_args() + ["--init", os.path.join(args.out, f"run-{r.base}")]
        if r.disc:
            extra += ["--disc-weight", r.disc_weight or args.disc_weight, "--disc-start-step", args.disc_start_step,
                      "--disc-lr", args.disc_lr, "--real-data", "digits"]
        return (k, datas[r.history], extra, args.finetune_steps)

    order = [k for k in rows if not rows[k].base] + [k for k in rows if rows[k].base]    # bases first
    jobs = [("kd", datas["state"], ["--steps", 1], size.kd_steps)] + [job(k, rows[k]) for k in order]
    for key, data, extra, steps in jobs:
        runs[key] = os.path.join(args.out, f"run-{key}")
        t = time.perf_counter()
        train_student(verbs, data, runs[key], extra, steps, size, args.seed, args.device, log, procs=args.procs)
        train_s[key] = time.perf_counter() - t

    t_eval = time.perf_counter()
    data = datas["state"]
    with open(os.path.join(data, "manifest.json")) as f:
        steps = json.load(f)["settings"]["steps"]
    methods = [Method("floor", f"teacher DDIM-{steps}, independent draws (floor)", steps, baseline="teacher"),
               Method("ddim4", "teacher DDIM-4, same noise", 4, baseline="ddim-4")]
    if any(r.num_steps == 2 for r in rows.values()):
        methods.append(Method("ddim2", "teacher DDIM-2, same noise", 2, baseline="ddim-2"))
    methods.append(Method("kd", "KD 1-step (S = 1)", 1, run=runs["kd"]))
    methods += [Method(k, r.label(args.finetune_steps, args.disc_weight), r.num_steps, run=runs[k])
                for k, r in rows.items()]
    ev = evaluate_methods(methods, data, os.path.join(args.out, "samples"), size, verbs, args.seed, args.device,
                          anchor="kd", log=log)
    t_eval = time.perf_counter() - t_eval
    exposure = []
    if args.exposure:
        held = os.path.join(args.out, "data-heldout")
        build_trajectories(verbs, held, dataclasses.replace(size, num_trajectories=args.exposure), args.seed + 7,
                           args.device, log, procs=args.procs)
        for k in ["kd"] + [k for k, r in rows.items() if r.history == "state"]:
            e = exposure_errors(runs[k], held, args.device)
            cells = [" / ".join(f"{1e3 * v:.3f}" for v in e[kind]) for kind in ("forced", "own")]
            exposure.append(f"| {next(m.label for m in methods if m.key == k)} | {cells[0]} | {cells[1]} | {1e3 * (e['own'][-1] - e['forced'][-1]):+.3f} |")
    by_key = {r["key"]: r for r in ev["rows"]}

    cmd = "python tools/run_ard_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    title = (f"{TEACHER}: {size.num_trajectories} DDIM-{steps} trajectories (CFG {ev['cfg_scale']:g}, S = 4, paper "
             f"kept set; S = 2 rows on its nested subset), {size.train_steps} training steps per student "
             f"({size.kd_steps} for KD), batch {size.batch_size}, lr {size.lr:g} constant, EMA {size.ema_decay:g}; "
             f"{size.num_samples} samples per method and seed, mean ± sd over {len(ev['seeds'])} sampling seed(s); FID "
             f"on digits-classifier features vs {ev['num_real']} held-out digits")
    table = format_table(ev["rows"], title, ev["notes"], extra_columns=ev["extra_columns"])
    losses = []
    for k in ["kd"] + list(rows):
        fl = final_loss(runs[k])
        parts = ", ".join(f"{n} {v:.5f}" for n, v in fl.items() if n != "loss")
        losses.append(f"| {by_key[k]['method']} | {fl.get('loss', float('nan')):.5f} | {parts} | {train_s[k]:.0f} |")
    load = os.getloadavg()
    block = [f"## {args.title}" if args.title else "## Ablation", "",
             f"Made by `{cmd}` on {platform.processor() or platform.machine()} with {torch.get_num_threads()} "
             f"thread(s) a process, build-dataset and train on {args.procs} local rank(s) (torch "
             f"{torch.__version__}, device {args.device}); load average at the end "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min; other jobs shared the machine, so "
             f"ms / image and seconds are indicative). This invocation: trajectories {t_data:.0f} s, training "
             f"{sum(train_s.values()):.0f} s, sampling + evaluation {t_eval:.0f} s (finished stages in --out are "
             "re-used: their seconds are then ~0).", "", table, "",
             "Training: the last logged loss of each student (raw weights, not the EMA) (Σ over its steps of the mean squared error "
             "to the teacher's next kept state, teacher-forced; stepK = step K's term) and this invocation's "
             "training seconds.", "", "| student | loss | per step | train s |", "|---|---:|---|---:|", *losses, "",
             *([f"Exposure bias: the MSE (×10⁻³, data space) of each step's output against the teacher's next kept "
                f"state on {args.exposure} held-out trajectories (seed {args.seed + 7}), teacher-forced (the "
                "training inputs) vs on the student's own outputs (sampling); the last column is the final "
                "step's difference, what a history could correct.", "",
                "| student | teacher-forced, steps 1..S | own outputs, steps 1..S | own − forced, last step |",
                "|---|---|---|---:|", *exposure, ""] if exposure else []),
             "Issue 16's \"done when\" on these printed means:", "", *(criteria(by_key) or ["- none: this block lacks the rows they compare"]), ""]
    text = "\n".join(block)
    if args.append and os.path.exists(args.results):
        with open(args.results) as f:
            text = f.read().rstrip("\n") + "\n\n" + text
    else:
        text = "# ARD ablation on the digits DiT (`tools/run_ard_table.py`)\n\n" + text
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    atomic_write(args.results, text.encode())
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump({"rows": ev["rows"], "train_seconds": train_s, "command": cmd}, f, indent=2, default=float)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
