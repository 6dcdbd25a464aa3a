"""Which teacher: one description shared by build-dataset, train and sample.

A `TeacherSpec` names a teacher (a family or a zoo name), its config (a preset name or a dict of the
official hyper-parameter names), its checkpoints and how to load them. It round-trips through JSON
(`to_dict` / `from_dict`), so a data set manifest or a student checkpoint can say exactly which
teacher made it, and `load(device)` rebuilds that teacher.

The CLI side is one decorator, `teacher_options`, which adds

    --teacher --config --checkpoint --tokenizer-config --tokenizer-checkpoint --dtype --ema
    --unsafe-load --cfg-scale --temperature --top-k --top-p

to a click command and hands it two keyword arguments instead: `teacher_spec` (a TeacherSpec) and
`sampling_overrides` (a dict holding only the sampling options given on the command line).
`resolve_sampling(teacher, sampling_overrides)` lays those over the family's `default_sampling`,
so a default lives in exactly one place: the teacher class.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Optional, Union

import click
import torch

from teachers.base import SamplingConfig, Teacher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_config(value: Union[str, dict, None]) -> Union[str, dict, None]:
    """A config as the CLI takes it: a JSON object string or a `.json` file path -> dict; a preset
    name stays a string; None stays None."""
    if value is None or isinstance(value, dict):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from e
    elif text.endswith(".json"):
        if not os.path.exists(text):
            raise FileNotFoundError(f"config file not found: {text}")
        with open(text) as f:
            out = json.load(f)
    else:
        return text
    if not isinstance(out, dict):
        raise ValueError(f"a JSON config must be an object, got {type(out).__name__}")
    return out


def _abspath(p: Optional[str]) -> Optional[str]:
    return None if p is None else os.path.abspath(os.fspath(p))


@dataclass(frozen=True)
class TeacherSpec:
    """Everything needed to rebuild a teacher. Paths are stored absolute.

    teacher: a family ("llamagen", "var") or a zoo name ("digits-llamagen").
    config / tokenizer_config: preset name or dict (see `parse_config`); None = the family default.
    checkpoint / tokenizer_checkpoint: file paths; None = random weights (tests, benchmarks).
    dtype: "float32" | "bfloat16" | "float16" for the transformer.
    ema: load the EMA weights of a checkpoint that has them.
    weights_only: safe unpickling; False only for trusted legacy pickles (CLI: --unsafe-load).
    """

    teacher: str
    config: Union[str, dict, None] = None
    checkpoint: Optional[str] = None
    tokenizer_config: Union[str, dict, None] = None
    tokenizer_checkpoint: Optional[str] = None
    dtype: str = "float32"
    ema: bool = False
    weights_only: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose from {sorted(DTYPES)}")
        object.__setattr__(self, "config", parse_config(self.config))
        object.__setattr__(self, "tokenizer_config", parse_config(self.tokenizer_config))
        object.__setattr__(self, "checkpoint", _abspath(self.checkpoint))
        object.__setattr__(self, "tokenizer_checkpoint", _abspath(self.tokenizer_checkpoint))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TeacherSpec fields: {sorted(unknown)}")
        return cls(**d)

    def load(self, device: Union[str, torch.device] = "cpu", diffusion: bool = False) -> Teacher:
        """Build the teacher on `device`, in eval mode: an AR `Teacher` (what DD distils), or with
        `diffusion` a `teachers.diffusion_base.DiffusionTeacher` (what ARD distils)."""
        from teachers import load_teacher
        options = {}
        if self.ema:  # only passed when asked for: not every family/zoo loader takes it
            options["ema"] = True
        if not self.weights_only:
            options["weights_only"] = False
        teacher = load_teacher(self.teacher, self.config, self.checkpoint,
                               tokenizer_config=self.tokenizer_config,
                               tokenizer_checkpoint=self.tokenizer_checkpoint,
                               device=device, dtype=DTYPES[self.dtype], **options)
        if diffusion:
            from teachers.diffusion_base import DiffusionTeacher
            if not isinstance(teacher, DiffusionTeacher):
                raise ValueError(f"{self.teacher!r} is an AR teacher ({type(teacher).__name__}); ARD distils "
                                 "diffusion teachers only (dit, digits-dit)")
        elif not isinstance(teacher, Teacher):
            raise ValueError(f"{self.teacher!r} is a diffusion teacher ({type(teacher).__name__}); DD distils "
                             "AR teachers only")
        return teacher.eval()


SAMPLING_FIELDS = ("cfg_scale", "temperature", "top_k", "top_p")


def resolve_sampling(teacher: Teacher, overrides: Optional[dict] = None) -> SamplingConfig:
    """The teacher family's `default_sampling` with the given fields replaced (None = keep)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"unknown sampling fields: {sorted(unknown)}")
    return dataclasses.replace(teacher.default_sampling, **overrides)


def _teacher_choices_help() -> str:
    try:
        from teachers import FAMILIES, zoo_names
        return ", ".join(sorted(FAMILIES) + zoo_names())
    except Exception:  # noqa: BLE001 - help text only
        return "llamagen, var or a zoo name"


_TEACHER_OPTIONS = [
    click.option("--teacher", "teacher", required=True,
                 help=f"Teacher family or zoo name ({_teacher_choices_help()})."),
    click.option("--config", "config", default=None,
                 help="Preset name (GPT-L, d16, ...), a JSON object, or a .json file. Default: the family's."),
    click.option("--checkpoint", "checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="Transformer checkpoint (omit for random weights)."),
    click.option("--tokenizer-config", "tokenizer_config", default=None,
                 help="Tokenizer preset, JSON object or .json file. Default: the family's."),
    click.option("--tokenizer-checkpoint", "tokenizer_checkpoint",
                 type=click.Path(exists=True, dir_okay=False), default=None,
                 help="Tokenizer (VQ / VQVAE) checkpoint (omit for random weights)."),
    click.option("--dtype", "dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
                 help="Precision of the teacher transformer."),
    click.option("--ema", "ema", is_flag=True, default=False, help="Load the checkpoint's EMA weights."),
    click.option("--unsafe-load", "unsafe_load", is_flag=True, default=False,
                 help="Unpickle trusted legacy checkpoints with weights_only=False."),
    click.option("--cfg-scale", "cfg_scale", type=float, default=None,
                 help="Classifier-free guidance scale. Default: the teacher family's DD setting."),
    click.option("--temperature", "temperature", type=click.FloatRange(min=0.0, min_open=True), default=None,
                 help="Sampling temperature. Default: the teacher family's DD setting."),
    click.option("--top-k", "top_k", type=int, default=None,
                 help="Top-k (<= 0 keeps all). Default: the teacher family's DD setting."),
    click.option("--top-p", "top_p", type=float, default=None,
                 help="Top-p (<= 0 or >= 1 keeps all). Default: the teacher family's DD setting."),
]


def check_teacher_options(spec: TeacherSpec) -> None:
    """Refuse, naming the option, what would otherwise fail deep in the loader or be silently
    ignored: an unknown teacher, a config of another family (preset or keys), files or configs given to a zoo teacher
    (whose weights and config are fixed; they would be ignored yet recorded in the manifest)."""
    from teachers import FAMILIES, family_module, zoo_names
    if spec.teacher not in FAMILIES:
        if spec.teacher not in zoo_names():
            raise click.BadParameter(f"unknown teacher {spec.teacher!r}; families: {sorted(FAMILIES)}, "
                                     f"zoo: {zoo_names()}", param_hint="'--teacher'")
        given = [name for name, value in (("--config", spec.config), ("--checkpoint", spec.checkpoint),
                                          ("--tokenizer-config", spec.tokenizer_config),
                                          ("--tokenizer-checkpoint", spec.tokenizer_checkpoint)) if value]
        if given:
            raise click.BadParameter(f"zoo teacher {spec.teacher!r} has its own weights and config; "
                                     f"drop {', '.join(given)} (or use its family with them)",
                                     param_hint=f"'{given[0]}'")
        return
    try:
        family_module(spec.teacher).as_config(spec.config)
    except (ValueError, TypeError) as e:
        raise click.BadParameter(f"not a {spec.teacher} config: {e}", param_hint="'--config'") from e


def teacher_options(f):
    """Click decorator: adds the teacher and sampling options; the command receives
    `teacher_spec: TeacherSpec` and `sampling_overrides: dict` (only the sampling options given)."""

    @functools.wraps(f)
    def wrapper(*args, teacher, config, checkpoint, tokenizer_config, tokenizer_checkpoint, dtype, ema,
                unsafe_load, cfg_scale, temperature, top_k, top_p, **kwargs):
        try:
            spec = TeacherSpec(teacher=teacher, config=config, checkpoint=checkpoint,
                               tokenizer_config=tokenizer_config, tokenizer_checkpoint=tokenizer_checkpoint,
                               dtype=dtype, ema=ema, weights_only=not unsafe_load)
        except (ValueError, FileNotFoundError) as e:
            raise click.BadParameter(str(e)) from e
        check_teacher_options(spec)
        overrides = {k: v for k, v in (("cfg_scale", cfg_scale), ("temperature", temperature),
                                       ("top_k", top_k), ("top_p", top_p)) if v is not None}
        return f(*args, teacher_spec=spec, sampling_overrides=overrides, **kwargs)

    # functools.wraps shares f's __click_params__ list; give the wrapper its own copy.
    wrapper.__click_params__ = list(getattr(f, "__click_params__", []))
    for opt in reversed(_TEACHER_OPTIONS):
        wrapper = opt(wrapper)
    return wrapper
