"""`dd sample`: sample with a DD student (1/2-step, teacher-mixed) or a baseline, into a resumable,
multi-rank sample set.

The samplers are `samplers.py` (one table, `SAMPLERS`); this file turns the command line into a
`SamplePlan` and runs it on the shard store (`sample_store.py`: shards, outputs, verify). `--compare`
writes one comparison image instead (teacher / DD-1 / DD-2 / teacher-mixed on the same noise).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Tuple

import click
import torch

from teachers.base import SamplingConfig, Teacher

from .captions import captions_for_teacher
from .distributed import device_option_check, dist_info, finish_distributed, init_distributed
from .images import labelled_rows, save_png, to_uint8
from .pairs import generate_pairs
from .sample_store import build_samples, sample_settings, verify_samples, write_prompts
from .samplers import SKIP_FILLS, SamplePlan, TokenMarginals, check_regen, dd_sample, regen_sample
from .seeding import check_label_spec, make_labels, sample_generators, sample_noise
from .shard_store import StoreError
from .store_cli import report_problems


# ---- parsing ------------------------------------------------------------------------------------
def parse_timesteps(text: str) -> Tuple[int, ...]:
    """"1,81" -> (1, 81)."""
    try:
        out = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        raise ValueError(f"timesteps {text!r}: expected comma-separated integers such as 1,81") from None
    if not out:
        raise ValueError("timesteps: empty list")
    return out


def check_timesteps(timesteps: Sequence[int], num_steps: int) -> Tuple[int, ...]:
    ts = tuple(int(t) for t in timesteps)
    if ts[0] != 1:
        raise ValueError(f"timesteps {list(ts)}: the first must be 1 (sampling starts from pure noise)")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps {list(ts)}: must be strictly increasing")
    if ts[-1] > num_steps:
        raise ValueError(f"timesteps {list(ts)}: at most {num_steps} (the number of AR steps)")
    return ts


def parse_regen(text: str) -> Tuple[int, int]:
    """"41:81" -> (41, 81) (paper notation pre-trained-41-81)."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--regen {text!r}: expected START:END such as 41:81") from None
    return a, b


def default_regen(trained: Sequence[int]) -> Optional[Tuple[int, int]]:
    """The --compare default: a = t2 // 2 + 1, b = t2 (LlamaGen 41:81, VAR 4:6, both release settings);
    None when the run has a single timestep."""
    if len(trained) < 2:
        return None
    b = int(trained[1])
    return b // 2 + 1, b


# ---- CLI ----------------------------------------------------------------------------------------
def _sampling(teacher: Teacher, base: Optional[dict], overrides: dict) -> SamplingConfig:
    from .teacher_spec import resolve_sampling
    s = resolve_sampling(teacher, {})
    if base:
        s = SamplingConfig(**{k: base[k] for k in s.to_dict() if k in base})
    return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


def _load_run(run: str, device: str, ema: bool):
    from .student_run import load_run
    from .teacher_spec import TeacherSpec
    student, info = load_run(run, device, ema=ema)
    student.eval()
    teacher = TeacherSpec.from_dict(info["teacher"]).load(device)
    return student, info, teacher


def _run_data_settings(info: dict) -> dict:
    """The settings of the data set the run was trained on, when the run names one that still exists
    (run_info["data"]: a data set path, or a dict holding "settings" / "sampling" / "flow_map")."""
    d = info.get("data")
    if isinstance(d, dict):
        if isinstance(d.get("settings"), dict):
            return d["settings"]
        d = d.get("root") or d.get("path") or d.get("dir") or \
            ({k: d[k] for k in ("sampling", "flow_map") if k in d} or None)
        if isinstance(d, dict):
            return d
    if isinstance(d, str) and os.path.exists(os.path.join(d, "manifest.json")):
        from .pairs import read_manifest
        try:
            return read_manifest(d)["settings"]
        except Exception:  # noqa: BLE001 - an unreadable data set only loses the defaults
            return {}
    return {}


def _run_sampling_base(info: dict) -> Optional[dict]:
    """The teacher sampling of the run's data set (the DD setting it was distilled at), if known."""
    if isinstance(info.get("sampling"), dict):
        return info["sampling"]
    s = _run_data_settings(info).get("sampling")
    return s if isinstance(s, dict) else None


def _run_flow_map(info: dict):
    """The flow map of the run's data set (default FlowMapConfig when unknown)."""
    from .flowmap import FlowMapConfig
    d = info.get("flow_map") if isinstance(info.get("flow_map"), dict) else _run_data_settings(info).get("flow_map")
    if isinstance(d, dict):
        return FlowMapConfig.from_dict(d)  # fields it lacks: the values of the map that made that data
    return FlowMapConfig()


def _fail(msg) -> None:
    """A user error (`dd`'s handler prints it as one line, joining a multi-line message such as the settings a
    directory differs in)."""
    raise click.ClickException(str(msg) or "failed")


@click.command("sample")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--run", "run", type=click.Path(exists=True, file_okay=False), default=None,
              help="A DD run directory (`dd train`): the student and, through it, the teacher.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="DD steps: the first N trained timesteps. Default: all trained timesteps.")
@click.option("--timesteps", default=None, help="Explicit DD timesteps (paper notation), e.g. 1,81.")
@click.option("--split", type=click.IntRange(min=0), default=None,
              help="Steps < SPLIT take the logits head, the rest the embedding head. Default: the run's.")
@click.option("--snap", is_flag=True, default=False,
              help="Snap embedding-head outputs to the nearest codebook row (default: decode them as is).")
@click.option("--regen", default=None, metavar="A:B",
              help="Teacher-mixed sampling pre-trained-A-B: keep steps < A-1 of one DD step, the teacher "
                   "re-generates steps A-1..B-2, one DD step at t=B (a trained timestep).")
@click.option("--baseline", default=None, metavar="skip-N|teacher|onestep",
              help="skip-N: the teacher with its last N steps skipped; teacher: = skip-0; onestep: every "
                   "token drawn independently from its marginal in --data.")
@click.option("--skip-fill", type=click.Choice(SKIP_FILLS), default="draw", show_default=True,
              help="skip-N: draw the skipped steps' tokens from the last computed prediction, or drop "
                   "them and decode the computed steps only (VAR).")
@click.option("--data", "data", type=click.Path(exists=True, file_okay=False), default=None,
              help="A `dd build-dataset` data set: token marginals (onestep) and its teacher.")
@click.option("--marginal", type=click.Choice(["class", "global"]), default="class", show_default=True,
              help="onestep: marginals given the class label, or pooled over classes.")
@click.option("--compare", is_flag=True, default=False,
              help="Write compare.png: rows teacher (flow map) / DD-1 / DD-2 / teacher-mixed, same noise and labels.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None,
              help="Samples to draw. Default: 64 (8 with --compare).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the per-sample noise, labels and draws.")
@click.option("--labels", "labels", default="balanced", show_default=True,
              help="balanced | uniform (as `dd build-dataset`) | comma-separated class ids (cycled).")
@click.option("--device", default=None, callback=device_option_check, help="cpu, cuda, cuda:1 ... Default: cuda when available.")
@click.option("--png", is_flag=True, default=False, help="Also write one PNG per sample into OUT/png.")
@click.option("--grid-max", type=click.IntRange(min=1), default=64, show_default=True, help="Images in grid.png.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the run's EMA weights.")
@click.option("--warmup", is_flag=True, default=False, help="Run one untimed batch first (timing only).")
@click.option("--cfg-scale", "cfg_scale", type=float, default=None, help="Teacher CFG scale (teacher parts).")
@click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=None, help="Teacher temperature (teacher parts).")
@click.option("--top-k", "top_k", type=int, default=None, help="Teacher top-k (teacher parts).")
@click.option("--top-p", "top_p", type=float, default=None, help="Teacher top-p (teacher parts).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Samples per shard file (the unit of resume and of the rank split).")
@click.option("--verify", "verify", is_flag=True, default=False,
              help="Only check OUT: shard sizes, sha256 and labels, and samples.npz / tokens.npy against the shards.")
@click.option("--no-progress", is_flag=True, default=False, help="No progress bar.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text-to-image: the prompt file (samples cycle over the prompts as --labels says; "
              "prompts.txt lists them).")
@click.option("--caption-features", "caption_features", type=click.Path(exists=True, file_okay=False), default=None,
              help="Text-to-image: the official feature files, <DIR>/<prompt file stem>/<line>.npy [1, n, D] "
              "(not needed by a teacher with its own text encoder, e.g. digits-t2i).")
def sample_cmd(out, run, steps, timesteps, split, snap, regen, baseline, skip_fill, data, marginal, compare,
               num_samples, batch_size, seed, labels, device, png, grid_max, ema, warmup, cfg_scale,
               temperature, top_k, top_p, shard_size, verify, no_progress, prompts, caption_features):
    """Sample with a DD student (1/2-step, teacher-mixed) or a baseline; write images, tokens, timing.

    \b
      dd sample --run RUN --out OUT                        # DD with all trained timesteps
      dd sample --run RUN --out OUT --steps 1              # one step
      dd sample --run RUN --out OUT --regen 41:81          # pre-trained-41-81 (teacher-mixed)
      dd sample --run RUN --out OUT --baseline skip-106    # teacher, last 106 steps skipped
      dd sample --data DS --out OUT --baseline onestep     # independent token marginals
      dd sample --run RUN --out OUT --compare --num-samples 8
      dd sample --out OUT --verify                         # check a finished OUT
      torchrun --nproc_per_node=K -m distilled_decoding -- sample --run RUN ...   # K ranks

    OUT keeps the samples as shards: re-running the command resumes a killed run, and the outputs
    (samples.npz, tokens.npy, grid.png) are the same whatever the number of ranks or the batch size.
    Under torchrun put `--` before `sample` (torchrun would take --run for its own --run-path).
    """
    if verify:
        return _verify(out)
    num_samples = num_samples or (8 if compare else 64)
    overrides = {"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    modes = [n for n, v in (("--regen", regen), ("--baseline", baseline), ("--compare", compare)) if v]
    if len(modes) > 1:
        _fail(f"{' and '.join(modes)} cannot be combined")
    if (steps is not None or timesteps is not None) and (regen or baseline):
        _fail("--steps/--timesteps apply to DD sampling, not to --regen or --baseline")
    n_skip = None
    if baseline is not None:
        if baseline == "onestep":
            if data is None:
                _fail("--baseline onestep needs --data (a `dd build-dataset` directory)")
        elif baseline == "teacher" or baseline.startswith("skip-"):
            try:
                n_skip = 0 if baseline == "teacher" else int(baseline[5:])
            except ValueError:
                _fail(f"--baseline {baseline!r}: expected skip-N with an integer N, teacher, or onestep")
            if run is None and data is None:
                _fail(f"--baseline {baseline} needs a teacher: give --run or --data")
        else:
            _fail(f"--baseline {baseline!r}: choose skip-N, teacher or onestep")
    elif run is None:
        _fail("give --run (DD sampling) or --baseline with --data")

    _, _, device, own_pg = init_distributed(device)
    try:
        student, info, teacher = None, {}, None
        if run is not None and baseline != "onestep":
            student, info, teacher = _load_run(run, device, ema)
            sampling = _sampling(teacher, _run_sampling_base(info), overrides)
            if data is not None:
                from .pairs import read_manifest, teacher_differences
                wrong = teacher_differences(read_manifest(data)["settings"], teacher)
                if wrong:
                    _fail(f"--data {data}: built by another teacher than --run {run}'s ({'; '.join(wrong)})")
        else:
            from .pairs import read_manifest
            from .teacher_spec import TeacherSpec
            m = read_manifest(data)
            if baseline == "onestep" and not m["complete"]:
                _fail(f"--data {data}: the data set is incomplete ({len(m['shards'])} of {m['num_shards']} "
                      "shards); finish it by re-running its `dd build-dataset` command")
            teacher = TeacherSpec.from_dict(m["teacher_spec"]).load(device)
            sampling = _sampling(teacher, m["settings"].get("sampling"), overrides)
        captions = captions_for_teacher(teacher, prompts, caption_features)
        check_label_spec(labels, teacher.num_classes if captions is None else len(captions))
        trained = tuple(student.config.timesteps) if student is not None else ()
        if split is None and student is not None:
            split = int(student.config.split)
        if compare:
            if captions is not None:
                _fail("--compare is class-conditional only; sample a text-to-image run without it")
            return _compare(out, student, teacher, info, trained, split, snap, regen, sampling, seed,
                            num_samples, labels, device)
        if baseline == "onestep":
            marg = TokenMarginals.from_dataset(data, conditional=marginal == "class")
            plan = SamplePlan("onestep", teacher, marginals=marg)
        elif n_skip is not None:
            if not 0 <= n_skip < teacher.num_steps:
                _fail(f"--baseline skip-{n_skip}: N must be in [0, {teacher.num_steps - 1}]")
            if skip_fill == "drop" and n_skip and not teacher.decodes_prefix:
                _fail(f"--skip-fill drop: the {teacher.family} tokenizer cannot decode a partial token sequence")
            plan = SamplePlan("skip", teacher, sampling=sampling, n_skip=n_skip, skip_fill=skip_fill)
        elif regen is not None:
            a, b = parse_regen(regen)
            check_regen(a, b, trained, teacher.num_steps)
            plan = SamplePlan("regen", teacher, student, split=split, snap=snap, regen=(a, b), sampling=sampling)
        else:
            if timesteps is not None and steps is not None:
                _fail("give --steps or --timesteps, not both")
            if timesteps is not None:
                ts = check_timesteps(parse_timesteps(timesteps), teacher.num_steps)
                untrained = [t for t in ts if t not in trained]
                if untrained:
                    click.echo(f"warning: timesteps {untrained} were not trained (trained: {list(trained)})", err=True)
            else:
                k = len(trained) if steps is None else steps
                if k > len(trained):
                    _fail(f"--steps {k}: the run was trained for {len(trained)} timestep(s) {list(trained)}")
                ts = check_timesteps(trained[:k], teacher.num_steps)
            plan = SamplePlan("dd", teacher, student, timesteps=ts, split=split, snap=snap)
        plan = dataclasses.replace(plan, captions=captions)
        settings = sample_settings(plan, seed=seed, labels=labels, shard_size=shard_size, run=run, ema=ema,
                                   data=data, marginal=marginal)
        build_samples(out, plan, settings, num_samples=num_samples, batch_size=batch_size, device=device,
                      warmup=warmup, png=png, grid_max=grid_max, show_progress=not no_progress,
                      log=click.echo if dist_info()[0] == 0 else (lambda s: None))
        if captions is not None and dist_info()[0] == 0:
            write_prompts(out, captions, settings, num_samples)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)
    finally:
        finish_distributed(own_pg)


def _verify(out: str) -> None:
    try:
        problems = verify_samples(out, log=click.echo)
    except (StoreError, ValueError, OSError) as e:
        _fail(e)
    report_problems(problems)


@torch.no_grad()
def _compare(out, student, teacher, info, trained, split, snap, regen, sampling, seed, num, labels, device):
    """compare.png: teacher (flow map) / DD-1 / DD-2 / teacher-mixed on the same noise and labels."""
    if student is None:
        _fail("--compare needs --run")
    idx = list(range(num))
    lab = make_labels(seed, idx, teacher.num_classes, labels).to(device)
    noise = sample_noise(seed, idx, teacher.num_tokens, teacher.embed_dim).to(device)
    rows = []
    tok = generate_pairs(teacher, lab, noise, sampling, _run_flow_map(info))
    rows.append(("teacher", to_uint8(teacher.decode(tok))))
    x, _ = dd_sample(student, noise, lab, trained[:1], split=split, snap=snap)
    rows.append(("DD-1", to_uint8(teacher.decode(x))))
    if len(trained) >= 2:
        x, _ = dd_sample(student, noise, lab, trained[:2], split=split, snap=snap)
        rows.append(("DD-2", to_uint8(teacher.decode(x))))
    rg = parse_regen(regen) if regen else default_regen(trained)
    if rg is not None:
        check_regen(rg[0], rg[1], trained, teacher.num_steps)
        x, _ = regen_sample(student, teacher, noise, lab, rg, sampling, sample_generators(seed, idx, "draw", device),
                            split=split, snap=snap)
        rows.append((f"mixed {rg[0]}-{rg[1]}", to_uint8(teacher.decode(x))))
    os.makedirs(out, exist_ok=True)
    save_png(labelled_rows(rows), os.path.join(out, "compare.png"))
    click.echo(f"wrote {os.path.join(out, 'compare.png')}: rows {', '.join(n for n, _ in rows)}; "
               f"labels {lab.tolist()}")
