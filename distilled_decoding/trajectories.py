"""ARD's training data: the DDIM (η = 0) trajectories of a diffusion teacher, kept at S+1 states, on the
shard store (`shard_store.py`: resume, verify, torchrun rank splits). Built by `dd ard build-dataset`
(`ard_cli.py`), read by `TrajectoryDataset`, checked by `verify_trajectories`.

**The data.** Item i runs the teacher's DDIM-`steps` ODE at CFG from x_T = its noise ((seed, i),
`seeding.sample_noise`: torch.randn(C, H, W) of the "noise" stream) with its label ((seed, i),
balanced or uniform) and keeps S+1 states in sampling order: states[0] = x_T, states[S] = the final
x_0. `teacher_trajectories` is the one definition; verify --recompute and the tests reuse it.

**DDIM indices.** As the public ARD code counts them: index j of a `steps`-step run is the state
after steps − j DDIM steps, so j = steps is the noise and j = 0 the final x_0. State j (j ≥ 1) is
where the teacher is evaluated at the original timestep `ts_asc[j − 1]` (`spaced_timesteps`
ascending: 0, 42, ..., 957, 999 for 25 steps); that timestep is its time label (999 for the noise).

**Kept set** (`kept_indices`), as DDIM indices from the noise down to 0:
- `paper`: τ_s = T·s/S with T the teacher's 1000 training timesteps: for 0 < s < S the state whose
  timestep is nearest T·s/S (ties: the noisier). DDIM-25, S = 4: indices 25, 19, 13, 7, 0 at
  timesteps 999, 749, 500, 250 (the public code's labels 999·{1, ¾, ½, ¼}, rounded); S = 2: 25, 13, 0.
- `public`: the public code's indices of a 25-step run: S = 4: 25, 15, 10, 5, 0 (states at 583,
  375, 166); S = 2: 25, 10, 0; S = 1: 25, 0; S = 5: 25, 20, 15, 10, 5, 0.
- an explicit list "25,15,10,5,0" (from `steps` down to 0).
Both rules nest (S = 2 and S = 1 are subsets of S = 4), so one S = 4 data set also trains the S = 2
and S = 1 (knowledge distillation) students (`TrajectoryDataset(path, num_steps=2)`).

**History** (what the student reads at the interior slots 1..S−1): `state` (the paper) stores the ODE
states themselves; `x0` (the public code) stores the teacher's x̂_0 prediction of the DDIM step that
lands on the kept state (for index j: the x̂_0 computed at timestep ts_asc[j], i.e. 624, 416, 208 for
indices 15, 10, 5), slot 0 staying the noise and slot S the final x_0 either way.

**Shards**: `states` [m, S+1, C, H, W] fp32, `labels` [m] int64, `index` [m] int64. The manifest's
settings (compared on resume) hold the teacher's identity (`describe()`), steps, cfg_scale,
cfg_channels, kept indices and rule, timesteps (the S time labels of inputs 0..S−1), history, seed,
labels, shard size; `teacher_spec` beside them rebuilds the teacher.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from teachers.vp_diffusion import spaced_timesteps

from .distributed import dist_info
from .fileio import normalise_json
from .pairs import teacher_differences  # noqa: F401  (any teacher's describe(): re-exported for ard_train)
from .seeding import LABEL_MODES, make_labels, sample_noise
from .shard_store import ShardRows, ShardSchema, ShardStore, StoreError, build_shards
from .teacher_spec import TeacherSpec

KEPT_RULES = ("paper", "public")
HISTORY_KINDS = ("state", "x0")
# the public ARD code's kept DDIM indices of its 25-step trajectories, by S
PUBLIC_KEPT = {1: (25, 0), 2: (25, 10, 0), 4: (25, 15, 10, 5, 0), 5: (25, 20, 15, 10, 5, 0)}
PUBLIC_STEPS = 25


# ---- the kept set ---------------------------------------------------------------------------------
def state_timestep(j: int, steps: Union[int, str], num_train_timesteps: int = 1000) -> int:
    """The original timestep at which the teacher is evaluated on DDIM state j (j ≥ 1) of a
    `steps`-step run: ts_asc[j − 1] (j = steps, the noise: the largest, 999)."""
    ts_asc = spaced_timesteps(num_train_timesteps, steps)[::-1]
    if not 1 <= j <= len(ts_asc):
        raise ValueError(f"DDIM index {j} has no timestep (1..{len(ts_asc)}; index 0 is the final x_0)")
    return int(ts_asc[j - 1])


def parse_kept(text: str) -> Union[str, tuple]:
    """--kept: "paper" | "public" | comma-separated DDIM indices ("25,15,10,5,0") -> rule or tuple."""
    text = str(text).strip()
    if text in KEPT_RULES:
        return text
    try:
        out = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--kept {text!r}: paper, public or comma-separated DDIM indices such as 25,15,10,5,0") from None
    if len(out) < 2:
        raise ValueError(f"--kept {text!r}: at least two indices (the noise and 0)")
    return out


def kept_indices(steps: int, num_steps: int, rule: Union[str, Sequence[int]] = "paper",
                 num_train_timesteps: int = 1000) -> tuple:
    """The S+1 kept DDIM indices (descending, `steps` .. 0) of a `steps`-step run; see the module docstring."""
    S = int(num_steps)
    if not isinstance(rule, str):
        kept = tuple(int(j) for j in rule)
        if len(kept) != S + 1:
            raise ValueError(f"--kept {','.join(map(str, kept))}: {len(kept)} indices, S = {S} needs {S + 1}")
    elif rule == "public":
        if steps != PUBLIC_STEPS or S not in PUBLIC_KEPT:
            raise ValueError(f"--kept public: the public ARD code keeps indices of a {PUBLIC_STEPS}-step run for "
                             f"S in {sorted(PUBLIC_KEPT)} only (asked: {steps} steps, S = {S}); use paper or a list")
        kept = PUBLIC_KEPT[S]
    elif rule == "paper":
        if S < 1:
            raise ValueError(f"S = {S}: need at least one step")
        states = list(range(1, steps + 1))                     # DDIM indices with a timestep
        ts = [state_timestep(j, steps, num_train_timesteps) for j in states]
        inner = []
        for s in range(S - 1, 0, -1):
            target = num_train_timesteps * s / S
            # nearest timestep; on a tie the noisier state (larger j comes first in the key)
            j = min(states, key=lambda jj: (abs(ts[jj - 1] - target), -jj))
            inner.append(j)
        kept = (steps, *inner, 0)
    else:
        raise ValueError(f"kept rule {rule!r}: choose from {KEPT_RULES} or give the indices")
    if kept[0] != steps or kept[-1] != 0 or any(b >= a for a, b in zip(kept, kept[1:])):
        raise ValueError(f"kept DDIM indices {list(kept)}: must run strictly down from {steps} (the noise) to 0 "
                         f"(the final x_0)" + (" - too few DDIM steps for this S" if isinstance(rule, str) else ""))
    return kept


def kept_timesteps(steps: int, kept: Sequence[int], num_train_timesteps: int = 1000) -> tuple:
    """The time labels of the student's inputs 0..S−1: the timestep of each kept state but the last."""
    return tuple(state_timestep(j, steps, num_train_timesteps) for j in kept[:-1])


# ---- the trajectory definition ----------------------------------------------------------------------
def trajectory_noise(seed: int, indices, latent_shape: Sequence[int]) -> torch.Tensor:
    """x_T [B, C, H, W] fp32 (CPU) of global sample indices: torch.randn(C, H, W) per sample, as seeded
    by `seeding.sample_noise` (the same noise for the teacher, its DDIM-S baseline and the students)."""
    C, H, W = (int(v) for v in latent_shape)
    return sample_noise(seed, indices, C, H * W).view(-1, C, H, W)


@torch.no_grad()
def teacher_trajectories(teacher, noise: torch.Tensor, labels: torch.Tensor, *, steps: int, cfg_scale: float,
                         cfg_channels: Union[Optional[int], str], kept: Sequence[int],
                         history: str = "state") -> torch.Tensor:
    """noise x_T [B, C, H, W], labels [B] -> states [B, S+1, C, H, W] fp32 (on the teacher's device):
    the teacher's DDIM (η = 0) run at `cfg_scale`, kept at DDIM indices `kept` (descending)."""
    if history not in HISTORY_KINDS:
        raise ValueError(f"history {history!r}: choose from {HISTORY_KINDS}")
    S = len(kept) - 1
    noise = noise.to(teacher.device, torch.float32)
    out = noise.new_empty(noise.shape[0], S + 1, *noise.shape[1:])
    slot_after = {steps - j: k for k, j in enumerate(kept)}    # DDIM steps done -> slot

    def record(i, t, x, x0):
        # x: the state after i steps (before step i); x0: step i's clean prediction
        if history == "state" and i in slot_after:
            out[:, slot_after[i]] = x
        elif history == "x0" and 0 < slot_after.get(i + 1, 0) < S:
            out[:, slot_after[i + 1]] = x0                       # the x̂_0 of the step landing on the kept state

    final = teacher.sample(labels, steps=steps, cfg_scale=cfg_scale, noise=noise, callback=record,
                           cfg_channels=cfg_channels)
    out[:, 0] = noise
    out[:, S] = final
    return out


# ---- the store --------------------------------------------------------------------------------------
def trajectory_shapes(settings: dict, m: int) -> dict:
    S = len(settings["kept"]) - 1
    return {"states": (m, S + 1, *settings["latent_shape"]), "labels": (m,), "index": (m,)}


TRAJECTORIES = ShardSchema(format="ard-trajectories", version=1, made_by="`dd ard build-dataset`",
                           noun="trajectory set", unit="trajectories", shapes=trajectory_shapes)


def trajectory_store(root: str) -> ShardStore:
    return ShardStore(root, TRAJECTORIES)


def read_manifest(root: str) -> dict:
    """The manifest of a trajectory set (StoreError unless `root` is one)."""
    return trajectory_store(root).read_manifest()


def resolve_cfg_channels(teacher, cfg_channels: Union[Optional[int], str]) -> Optional[int]:
    """"default" -> the teacher's own setting; None = all channels."""
    return teacher.cfg_channels if cfg_channels == "default" else (None if cfg_channels is None else int(cfg_channels))


def trajectory_settings(teacher, spec: TeacherSpec, *, steps: int, cfg_scale: float,
                        cfg_channels: Optional[int], num_steps: int, kept: Union[str, Sequence[int]],
                        history: str, seed: int, labels: str, shard_size: int) -> dict:
    """The settings that decide the data: a directory is only ever completed with equal ones."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels {labels!r}: choose from {LABEL_MODES}")
    if history not in HISTORY_KINDS:
        raise ValueError(f"history {history!r}: choose from {HISTORY_KINDS}")
    idx = kept_indices(steps, num_steps, kept, teacher.num_train_timesteps)
    return normalise_json({
        "teacher": teacher.describe(), "teacher_dtype": spec.dtype,
        "steps": int(steps), "cfg_scale": float(cfg_scale), "cfg_channels": cfg_channels, "eta": 0.0,
        "kept_rule": kept if isinstance(kept, str) else "explicit", "kept": list(idx),
        "timesteps": list(kept_timesteps(steps, idx, teacher.num_train_timesteps)), "history": history,
        "num_train_timesteps": int(teacher.num_train_timesteps), "latent_shape": list(teacher.latent_shape),
        "seed": int(seed), "labels": labels, "num_classes": int(teacher.num_classes), "shard_size": int(shard_size),
    })


def build_trajectories(out: str, teacher, spec: TeacherSpec, *, num_samples: int, steps: Optional[int] = None,
                       cfg_scale: Optional[float] = None, cfg_channels: Union[Optional[int], str] = "default",
                       num_steps: int = 4, kept: Union[str, Sequence[int]] = "paper", history: str = "state",
                       seed: int = 0, labels: str = "balanced", shard_size: int = 1024, batch_size: int = 64,
                       show_progress: bool = True, log: Callable[[str], None] = print) -> Optional[dict]:
    """Build (or complete, or extend) the trajectory set in `out`; the manifest on rank 0. Collective
    under torch.distributed. steps / cfg_scale default to the teacher's (DDIM-25 at CFG 1.5)."""
    if num_samples <= 0 or shard_size <= 0 or batch_size <= 0:
        raise ValueError("num_samples, shard_size and batch_size must be positive")
    steps = int(teacher.default_steps if steps is None else steps)
    cfg_scale = float(teacher.default_cfg_scale if cfg_scale is None else cfg_scale)
    settings = trajectory_settings(teacher, spec, steps=steps, cfg_scale=cfg_scale,
                                   cfg_channels=resolve_cfg_channels(teacher, cfg_channels), num_steps=num_steps,
                                   kept=kept, history=history, seed=seed, labels=labels, shard_size=shard_size)
    build_info = {"torch": torch.__version__, "device": str(teacher.device), "batch_size": batch_size,
                  "world_size": dist_info()[1]}

    def produce(k, start, count, on_batch):
        return build_shard(teacher, settings, start, count, batch_size, on_batch)

    return build_shards(trajectory_store(out), settings, num_samples, produce,
                        extra={"teacher_spec": normalise_json(spec.to_dict())}, build_info=build_info,
                        show_progress=show_progress, desc="ard build-dataset", log=log)


def build_shard(teacher, settings: dict, start: int, count: int, batch_size: int,
                on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """The trajectories of indices [start, start + count), in batches that never straddle shards."""
    index = torch.arange(start, start + count, dtype=torch.long)
    labels = make_labels(settings["seed"], index, settings["num_classes"], settings["labels"])
    states = []
    for b0 in range(0, count, batch_size):
        idx = index[b0:b0 + batch_size]
        noise = trajectory_noise(settings["seed"], idx, settings["latent_shape"])
        states.append(_trajectories_of(teacher, settings, noise, labels[b0:b0 + len(idx)]).cpu())
        if on_batch is not None:
            on_batch(len(idx))
    return {"states": torch.cat(states), "labels": labels, "index": index}


def _trajectories_of(teacher, settings: dict, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return teacher_trajectories(teacher, noise, labels.to(teacher.device), steps=settings["steps"],
                                cfg_scale=settings["cfg_scale"], cfg_channels=settings["cfg_channels"],
                                kept=settings["kept"], history=settings["history"])


# ---- reading ------------------------------------------------------------------------------------------
def subset_slots(settings: dict, num_steps: Optional[int]) -> List[int]:
    """The slots (0..S) of a stored trajectory that make its S'-step sub-trajectory (all when None or S)."""
    kept = list(settings["kept"])
    S = len(kept) - 1
    if num_steps is None or num_steps == S:
        return list(range(S + 1))
    rule = settings["kept_rule"]
    if not 1 <= num_steps < S:
        raise StoreError(f"num_steps {num_steps}: this trajectory set keeps S = {S} steps (ask for 1..{S})")
    if rule == "explicit":
        raise StoreError(f"num_steps {num_steps}: this trajectory set keeps an explicit list {kept}, which defines "
                         f"no {num_steps}-step subset; build one with --num-steps {num_steps}")
    try:
        want = kept_indices(settings["steps"], num_steps, rule, settings["num_train_timesteps"])
    except ValueError as e:
        raise StoreError(f"num_steps {num_steps}: {e}") from None
    missing = [j for j in want if j not in kept]
    if missing:
        raise StoreError(f"num_steps {num_steps}: the {rule} rule keeps DDIM indices {list(want)} for S = {num_steps}, "
                         f"but this set keeps {kept} (no {missing}): they do not nest; build a set with "
                         f"--num-steps {num_steps}")
    return [kept.index(j) for j in want]


class TrajectoryDataset(ShardRows, Dataset):
    """A built trajectory set as a map-style Dataset over memory-mapped shards.

    item i -> {"states": [S'+1, C, H, W] fp32, "labels": int64, "index": int64}. num_steps < S takes the
    nested S'-step sub-trajectory (same rule; StoreError when it does not nest). `.timesteps`: the S'
    time labels of inputs 0..S'−1; `.kept`: their DDIM indices. Every shard must exist, have the recorded
    size and parse (`verify=True`: also its sha256)."""

    noun = "trajectories"

    def __init__(self, root: str, num_steps: Optional[int] = None, verify: bool = False):
        super().__init__(trajectory_store(os.fspath(root)), verify=verify, finish="its `dd ard build-dataset` command")
        st = self.settings
        try:
            self.slots = subset_slots(st, num_steps)
        except StoreError as e:
            raise StoreError(f"{self.root}: {e}") from None
        self.num_steps = len(self.slots) - 1
        self.kept = tuple(st["kept"][s] for s in self.slots)
        self.timesteps = tuple(st["timesteps"][s] for s in self.slots[:-1])

    @property
    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec.from_dict(self.manifest["teacher_spec"])

    @property
    def history(self) -> str:
        return self.settings["history"]

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.settings["latent_shape"])

    def __getitem__(self, i: int) -> dict:
        f, j = self._row(i)
        states = f.get_slice("states")[j:j + 1][0]                       # [S+1, C, H, W]
        if len(self.slots) != states.shape[0]:
            states = states[self.slots]
        return {"states": states.contiguous(), "labels": f.get_slice("labels")[j:j + 1][0].long(),
                "index": f.get_slice("index")[j:j + 1][0].long()}


# ---- checks ----------------------------------------------------------------------------------------
def _check_tensors(st: dict, e: dict, t: dict) -> list:
    """A shard's own checks: labels and noise of (seed, index), finite states."""
    problems = []
    name = e["file"]
    if not torch.equal(t["labels"], make_labels(st["seed"], t["index"], st["num_classes"], st["labels"])):
        problems.append(f"shard {name}: labels differ from those of (seed, index)")
    if not torch.equal(t["states"][:, 0], trajectory_noise(st["seed"], t["index"], st["latent_shape"])):
        problems.append(f"shard {name}: states[:, 0] is not the noise of (seed, index)")
    if not torch.isfinite(t["states"]).all():
        problems.append(f"shard {name}: non-finite states")
    return problems


def verify_trajectories(root: str, recompute: int = 0, *, device: str = "cpu", batch_size: int = 64,
                        spec: Optional[TeacherSpec] = None, atol: float = 1e-4, pick_seed: int = 0,
                        log: Callable[[str], None] = print) -> list:
    """Problems of a trajectory set (empty = good): the store's checks (sizes, sha256, index ranges),
    labels and noise of (seed, index), finite values; with `recompute` > 0 that many random
    trajectories are re-run with the teacher and compared (max |Δ| ≤ atol)."""
    store = trajectory_store(root)
    m = store.read_manifest()
    problems = store.verify(_check_tensors, log=log)
    if recompute <= 0 or problems:
        return problems
    st = m["settings"]
    teacher = (spec or TeacherSpec.from_dict(m["teacher_spec"])).load(device, diffusion=True)
    wrong = teacher_differences(st, teacher)
    if wrong:
        return problems + ["the teacher loaded for --recompute is not the one recorded: " + "; ".join(wrong)]
    ds = TrajectoryDataset(root)
    picks = torch.randperm(len(ds), generator=torch.Generator().manual_seed(pick_seed))[:recompute].tolist()
    worst = 0.0
    for b0 in range(0, len(picks), batch_size):
        items = [ds[i] for i in picks[b0:b0 + batch_size]]
        stored = torch.stack([it["states"] for it in items])
        got = _trajectories_of(teacher, st, stored[:, 0], torch.stack([it["labels"] for it in items])).cpu()
        err = (got - stored).abs().flatten(1).amax(1)
        worst = max(worst, float(err.max()))
        problems += [f"trajectory {int(it['index'])}: recomputed states differ by {float(d):.3g} (> {atol:g})"
                     for it, d in zip(items, err) if d > atol]
    log(f"recomputed {len(picks)} trajectories: max |difference| {worst:.3g}")
    return problems


def trajectory_info(root: str) -> dict:
    m = read_manifest(root)
    st = m["settings"]
    S = len(st["kept"]) - 1
    return {"dir": os.path.abspath(root), "complete": m["complete"], "num_samples": m["num_samples"],
            "shards": f"{len(m['shards'])} of {m['num_shards']} recorded", "bytes": sum(e["bytes"] for e in m["shards"]),
            "teacher": st["teacher"], "teacher_dtype": st["teacher_dtype"],
            "sampler": f"DDIM-{st['steps']} (eta 0), cfg {st['cfg_scale']} on "
                       f"{'all' if st['cfg_channels'] is None else st['cfg_channels']} channels",
            "kept": f"S = {S}: DDIM indices {st['kept']} ({st['kept_rule']})", "timesteps": st["timesteps"],
            "history": st["history"], "states": f"[{S + 1}, {', '.join(map(str, st['latent_shape']))}] float32",
            "seed": st["seed"], "labels": st["labels"], "num_classes": st["num_classes"], "build": m["build"]}
