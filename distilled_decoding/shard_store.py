"""A resumable, verifiable, multi-rank store of per-sample tensors in shards: the one on-disk format
of every stage that makes N samples (training pairs, generated images), parameterised by a
`ShardSchema` (which tensors a shard holds) and a producer (shard -> tensors).

**Shards.** Shard k always covers global indices [k*S, min((k+1)*S, N)) (S = `settings["shard_size"]`),
so its contents do not depend on batch size, rank count or interruptions. Each shard is a safetensors
file `shard-<k:05d>.safetensors` holding the schema's tensors, one row per sample, plus `index` [m]
int64. Files are written atomically (temporary file, fsync, rename), followed by a record
`.progress/shard-<k:05d>.json` (count, sha256, size). `manifest.json` holds the settings, the
producer's extra entries, `num_samples`, a `complete` flag and, once complete, the shard list with
counts and sha256.

**Resume.** Re-running the same build skips finished shards (recorded, present, right size,
parseable) and recomputes the rest. A larger `num_samples` extends a store. A directory made with
other settings is refused, naming each differing setting; nothing already written is ever deleted
except stale temporary files. A complete store asked for again is left byte-identical.

**Integrity.** The manifest also records `settings_sha256` (of the settings as sorted JSON): a
manifest whose settings were edited afterwards is refused by every reader (stores written before
this field are read as they are). A resumed build re-hashes the finished shards before trusting
them, so a corrupt shard is named and rebuilt, never kept.

**Side files.** A build may also store whole-store files once beside the shards (e.g. the caption
table of a text-to-image data set): written by rank 0 after the settings check, recorded in the
manifest's `side_files` (bytes, sha256), checked by `verify`; one damaged since is named and rewritten
on resume (its hash is part of the settings of whoever uses one, so the bytes are fixed).

**One builder at a time.** The build holds `.lock` (O_EXCL, holding the builder's host and pid) in
the directory; a second build into it is refused, naming the holder. A lock whose process is gone
(same host) is stale and taken over.

**Several processes.** Under torchrun every rank calls `build_shards` alike: rank 0 checks the
directory and lists the shards still to do, rank r produces every world-th of them, and rank 0
writes the final manifest after a barrier.
"""
from __future__ import annotations

import bisect
import datetime
import glob
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from .distributed import barrier, broadcast_object, dist_info
from .fileio import atomic_write, file_sha256, json_bytes, pid_alive, sha256_bytes

MANIFEST = "manifest.json"
PROGRESS_DIR = ".progress"
LOCK_FILE = ".lock"

# (settings, count) -> {tensor name: shape} of a shard of `count` samples ("index" included)
ShapesFn = Callable[[dict, int], Dict[str, tuple]]
# (k, start, count, on_batch(num_done)) -> {tensor name: tensor [count, ...]} ("index" included)
Producer = Callable[[int, int, int, Optional[Callable[[int], None]]], Dict[str, torch.Tensor]]


class StoreError(RuntimeError):
    """A store directory that cannot be used as asked (other settings, corrupt shard, ...)."""


@dataclass(frozen=True)
class ShardSchema:
    """What one kind of store holds. format / version: the manifest's tag; made_by: the command that
    writes it (for messages); noun: what a directory of it is called; unit: what a sample is called
    (plural); shapes: the tensors of a shard; upgrade: completes a manifest written by older code (settings
    it lacks get the values that code used), so that old directories read, verify and resume as what they are."""

    format: str
    version: int
    made_by: str
    noun: str
    unit: str
    shapes: ShapesFn
    upgrade: Optional[Callable[[dict], dict]] = None


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_bounds(k: int, shard_size: int, num_samples: int) -> tuple:
    """(start, count) of shard k."""
    start = k * shard_size
    return start, max(0, min(shard_size, num_samples - start))


def num_shards(num_samples: int, shard_size: int) -> int:
    return -(-num_samples // shard_size)


def settings_sha256(settings: dict) -> str:
    """The hash a manifest records of its settings (sorted-key JSON)."""
    return sha256_bytes(json.dumps(settings, sort_keys=True).encode())


def diff_settings(old, new, prefix: str = "") -> list:
    """Dotted names of the leaves that differ between two JSON-like trees, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append((name, "<absent>", new[k]))
            elif k not in new:
                out.append((name, old[k], "<absent>"))
            else:
                out += diff_settings(old[k], new[k], name)
        return out
    return [] if old == new else [(prefix or "<root>", old, new)]


class ShardStore:
    """One store directory `root` of `schema`: manifest, shard files and progress records."""

    def __init__(self, root: str, schema: ShardSchema):
        self.root, self.schema = os.fspath(root), schema

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _progress_path(self, k: int) -> str:
        return os.path.join(self.root, PROGRESS_DIR, f"shard-{k:05d}.json")

    # ---- reading and checking --------------------------------------------------------------------
    def read_manifest(self) -> dict:
        path = self.path(MANIFEST)
        sc = self.schema
        if not os.path.exists(path):
            raise StoreError(f"{self.root}: no {MANIFEST} (not a {sc.noun} made by {sc.made_by})")
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: unreadable manifest ({e})") from e
        if m.get("format") != sc.format or m.get("format_version") != sc.version:
            raise StoreError(f"{path}: format {m.get('format')!r} v{m.get('format_version')}, "
                             f"this code reads {sc.format!r} v{sc.version}")
        want = m.get("settings_sha256")
        if want is not None and settings_sha256(m.get("settings")) != want:
            raise StoreError(f"{path}: its settings were edited after the build (settings_sha256 does not match); "
                             f"restore them or rebuild the {sc.noun}")
        return sc.upgrade(m) if sc.upgrade is not None else m

    def check_shard(self, entry: dict, settings: dict, *, verify_hash: bool) -> None:
        """Raise StoreError naming the shard unless its file exists, has the recorded size (and sha256
        when `verify_hash`), parses as safetensors and holds tensors of the recorded count and shapes."""
        from safetensors import safe_open
        path = self.path(entry["file"])
        name = entry["file"]
        if not os.path.exists(path):
            raise StoreError(f"shard {name} is missing ({path})")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise StoreError(f"shard {name} is corrupt or truncated: {size} bytes, manifest says {entry['bytes']}")
        if verify_hash:
            digest = file_sha256(path)
            if digest != entry["sha256"]:
                raise StoreError(f"shard {name} is corrupt: sha256 {digest[:16]}..., manifest says "
                                 f"{entry['sha256'][:16]}...")
        want = {k: tuple(v) for k, v in self.schema.shapes(settings, entry["count"]).items()}
        try:
            with safe_open(path, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt shard
            raise StoreError(f"shard {name} is corrupt: it does not parse as safetensors ({e})") from e
        if shapes != want:
            raise StoreError(f"shard {name} is corrupt: tensors {shapes}, expected {want}")

    def load_shard(self, entry: dict) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        return load_file(self.path(entry["file"]))

    def verify(self, check_tensors: Optional[Callable[[dict, dict, dict], list]] = None,
               log: Callable[[str], None] = print) -> list:
        """Problems (empty = good) of a store: completeness; every shard present with the recorded
        size and sha256, parsing, covering its range with `index`; then `check_tensors(settings,
        entry, tensors) -> [problem]` of the producer."""
        m = self.read_manifest()
        st = m["settings"]
        problems = []
        if not m["complete"]:
            problems.append(f"{self.root} is incomplete ({len(m['shards'])} of {m['num_shards']} shards recorded)")
        expected = [shard_bounds(k, st["shard_size"], m["num_samples"]) for k in range(m["num_shards"])]
        for k, e in enumerate(m["shards"]):
            if e["shard"] != k or (e["start"], e["count"]) != expected[k]:
                problems.append(f"manifest entry {k} ({e['file']}) covers start {e['start']} count {e['count']}, "
                                f"expected {expected[k]}")
                continue
            try:
                self.check_shard(e, st, verify_hash=True)
            except StoreError as err:
                problems.append(str(err))
                continue
            t = self.load_shard(e)
            if not torch.equal(t["index"], torch.arange(e["start"], e["start"] + e["count"])):
                problems.append(f"shard {e['file']}: index is not [{e['start']}, {e['start'] + e['count']})")
            elif check_tensors is not None:
                problems += check_tensors(st, e, t)
        for name, rec in m.get("side_files", {}).items():
            path = self.path(name)
            if not os.path.isfile(path):
                problems.append(f"side file {name} is missing ({path})")
            elif file_sha256(path) != rec["sha256"]:
                problems.append(f"side file {name} is corrupt: its sha256 differs from the manifest's")
        log(f"checked {len(m['shards'])} shards, {sum(e['count'] for e in m['shards'])} {self.schema.unit}: "
            + ("ok" if not problems else f"{len(problems)} problem(s)"))
        return problems

    # ---- writing ---------------------------------------------------------------------------------
    def write_shard(self, k: int, tensors: Dict[str, torch.Tensor]) -> dict:
        """Write shard k atomically, then its progress record; return the record."""
        from safetensors.torch import save
        data = save({name: t.contiguous() for name, t in tensors.items()},
                    metadata={"format": f"{self.schema.format}/{self.schema.version}"})
        atomic_write(self.path(shard_name(k)), data)
        index = tensors["index"]
        entry = {"shard": k, "file": shard_name(k), "start": int(index[0]) if len(index) else 0,
                 "count": int(index.numel()), "bytes": len(data), "sha256": sha256_bytes(data)}
        atomic_write(self._progress_path(k), json_bytes(entry))
        return entry

    def finished_shards(self, manifest: Optional[dict], settings: dict, num_samples: int,
                        warn: Callable[[str], None], verify_hash: bool = False) -> dict:
        """{k: entry} of the shards that are done for `num_samples` and intact on disk (size + parse,
        + sha256 when `verify_hash`)."""
        records = {}
        for e in (manifest or {}).get("shards", []):
            records[e["shard"]] = e
        for p in sorted(glob.glob(os.path.join(self.root, PROGRESS_DIR, "shard-*.json"))):
            try:
                with open(p) as f:
                    e = json.load(f)
                records[e["shard"]] = e
            except (OSError, json.JSONDecodeError, KeyError):
                warn(f"ignoring unreadable progress record {p}")
        done = {}
        S = settings["shard_size"]
        for k, e in sorted(records.items()):
            start, count = shard_bounds(k, S, num_samples)
            if count == 0 or e.get("start") != start or e.get("count") != count:
                continue  # e.g. the old last shard of a store being extended: rebuilt
            try:
                self.check_shard(e, settings, verify_hash=verify_hash)
            except StoreError as err:
                warn(f"{err}; rebuilding it")
                continue
            done[k] = e
        return done

    def manifest(self, settings: dict, extra: dict, num_samples: int, build_info: dict, shards: list,
                 complete: bool) -> dict:
        return {"format": self.schema.format, "format_version": self.schema.version, "complete": complete,
                "num_samples": int(num_samples), "num_shards": num_shards(num_samples, settings["shard_size"]),
                "settings": settings, "settings_sha256": settings_sha256(settings), **extra,
                "build": dict(build_info, updated=datetime.datetime.now().isoformat(timespec="seconds")),
                "shards": shards}

    def write_side_files(self, side_files: Dict[str, bytes], warn: Callable[[str], None]) -> None:
        """Write each side file unless it already holds these bytes (a differing one is damaged: rewritten)."""
        for name, data in side_files.items():
            path = self.path(name)
            if os.path.isfile(path):
                if file_sha256(path) == sha256_bytes(data):
                    continue
                warn(f"side file {name} differs from the recorded one; rewriting it")
            atomic_write(path, data)

    def prepare(self, settings: dict, extra: dict, num_samples: int, build_info: dict,
                warn: Callable[[str], None], side_files: Optional[Dict[str, bytes]] = None) -> dict:
        """Rank 0, before any shard is written: check the directory, clean temporaries, plan the work."""
        out = self.root
        old = None
        if os.path.exists(self.path(MANIFEST)):
            old = self.read_manifest()
            diffs = diff_settings(old["settings"], settings)
            if diffs:
                lines = "\n".join(f"  {name}: {a!r} in {out} vs {b!r} now" for name, a, b in diffs)
                raise StoreError(f"{out} holds a {self.schema.noun} built with other settings:\n{lines}\n"
                                 "Use another --out, or the settings it was built with.")
            if num_samples < old["num_samples"]:
                raise StoreError(f"{out} holds {old['num_samples']} samples; --num-samples {num_samples} "
                                 "would shrink it (take a subset when loading instead)")
        elif glob.glob(self.path("shard-*.safetensors")):
            raise StoreError(f"{out} holds shards but no {MANIFEST}; refusing to mix {self.schema.noun}s")
        os.makedirs(os.path.join(out, PROGRESS_DIR), exist_ok=True)
        self.write_side_files(side_files or {}, warn)
        for p in glob.glob(self.path("*.tmp.*")) + glob.glob(os.path.join(out, PROGRESS_DIR, "*.tmp.*")):
            # temporaries of an interrupted run (files, or a folder such as png.tmp.<pid>); finished
            # files are never touched. The build lock keeps any live writer out of this directory.
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.remove(p)
        # Re-hash what an earlier run wrote: a shard corrupted since is named and rebuilt, not kept.
        done = self.finished_shards(old, settings, num_samples, warn, verify_hash=True)
        todo = [k for k in range(num_shards(num_samples, settings["shard_size"])) if k not in done]
        if old is not None and old.get("complete") and not todo and old["num_samples"] == num_samples:
            # Nothing to do: leave manifest.json byte-identical (consumers record its sha256).
            self._drop_progress_dir()
            return {"done": sorted(done), "todo": [], "unchanged": True}
        shards = [done[k] for k in sorted(done)]
        atomic_write(self.path(MANIFEST),
                     json_bytes(self.manifest(settings, extra, num_samples, build_info, shards, complete=not todo)))
        return {"done": sorted(done), "todo": todo}

    def finalise(self, settings: dict, extra: dict, num_samples: int, build_info: dict,
                 warn: Callable[[str], None]) -> dict:
        """Rank 0, after every rank's barrier: collect the shard records into the final manifest."""
        old = self.read_manifest()
        done = self.finished_shards(old, settings, num_samples, warn)
        expected = num_shards(num_samples, settings["shard_size"])
        missing = [k for k in range(expected) if k not in done]
        if missing:
            raise StoreError(f"{self.root}: shards {missing[:10]} are missing after the build")
        manifest = self.manifest(settings, extra, num_samples, build_info, [done[k] for k in range(expected)], True)
        atomic_write(self.path(MANIFEST), json_bytes(manifest))
        for p in glob.glob(os.path.join(self.root, PROGRESS_DIR, "shard-*.json")):
            os.remove(p)  # the manifest now holds these records
        self._drop_progress_dir()
        return manifest

    # ---- the build lock ----------------------------------------------------------------------------
    def lock(self) -> None:
        """Take `.lock` (O_EXCL) for this process; StoreError naming the holder when another live
        process holds it. A lock of a process gone from this host is stale and taken over."""
        os.makedirs(self.root, exist_ok=True)
        path = self.path(LOCK_FILE)
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    with open(path) as f:
                        host, pid = f.read().split()
                    pid = int(pid)
                except (OSError, ValueError):
                    host, pid = None, None   # being written right now, or garbage: check again
                    time.sleep(0.2)
                    try:
                        with open(path) as f:
                            host, pid = f.read().split()
                        pid = int(pid)
                    except FileNotFoundError:
                        continue
                    except (OSError, ValueError):
                        raise StoreError(f"{path}: an unreadable build lock; if no build is running "
                                         "into this directory, remove it") from None
                if host == socket.gethostname() and not pid_alive(pid):
                    try:
                        os.remove(path)  # stale: its process is gone
                    except FileNotFoundError:
                        pass
                    continue
                raise StoreError(f"{self.root} is being built by process {pid} on {host} (lock {path}); "
                                 "wait for it to finish, or remove the lock if that process is gone")
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return
        raise StoreError(f"{path}: could not take the build lock")

    def unlock(self) -> None:
        try:
            with open(self.path(LOCK_FILE)) as f:
                mine = f.read().split() == [socket.gethostname(), str(os.getpid())]
        except OSError:
            return
        if mine:
            os.remove(self.path(LOCK_FILE))

    def _drop_progress_dir(self) -> None:
        try:
            os.rmdir(os.path.join(self.root, PROGRESS_DIR))
        except OSError:
            pass


class ShardRows:
    """A built store read as a map-style Dataset over memory-mapped shards (the readers of every schema
    derive from it). Opening checks that the store is complete (`allow_incomplete` skips that) and that
    every shard exists, has the recorded size and parses (`verify`: also its sha256; reads every byte).
    `_row(i) -> (shard handle, row j)`; each forked DataLoader worker opens its own handles.
    `finish`: the command that completes an incomplete store, for the error."""

    noun = "items"

    def __init__(self, store: "ShardStore", verify: bool = False, allow_incomplete: bool = False,
                 finish: str = "the command that built it"):
        self.root = store.root
        self.manifest = store.read_manifest()
        if not self.manifest["complete"] and not allow_incomplete:
            raise StoreError(f"{self.root} is incomplete: re-run {finish} to finish it")
        self.settings = self.manifest["settings"]
        self.shards = self.manifest["shards"]
        for e in self.shards:
            try:
                store.check_shard(e, self.settings, verify_hash=verify)
            except StoreError as err:
                raise StoreError(f"{self.root}: {err}") from err   # which store, for the command reading it
        ends, total = [], 0
        for e in self.shards:
            total += e["count"]
            ends.append(total)
        self._ends = ends
        self._handles: dict = {}
        self._pid = None

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"], d["_pid"] = {}, None
        return d

    def _row(self, i: int):
        """(safe_open handle of the shard holding item i, its row in that shard)."""
        from safetensors import safe_open
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} {self.noun}")
        s = bisect.bisect_right(self._ends, i)
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = safe_open(os.path.join(self.root, self.shards[s]["file"]), framework="pt")
        return self._handles[s], i - (self._ends[s - 1] if s else 0)


def build_shards(store: ShardStore, settings: dict, num_samples: int, produce: Producer, *, extra: dict,
                 build_info: dict, show_progress: bool = True, desc: str = "build",
                 log: Callable[[str], None] = print, side_files: Optional[Dict[str, bytes]] = None
                 ) -> Optional[dict]:
    """Build (or complete, or extend) `store` with `produce`. Returns the manifest on rank 0 (None on
    the other ranks). Collective under torch.distributed: every rank calls it with the same arguments.

    settings: what decides the data (compared on resume; holds "shard_size"); extra: more manifest
    entries written beside the settings, not compared; build_info: how it was built, not compared;
    side_files: {file name: bytes} stored once in the directory (see the module docstring).
    """
    rank, world = dist_info()
    shard_size = settings["shard_size"]
    if num_samples <= 0 or shard_size <= 0:
        raise ValueError("num_samples and shard_size must be positive")
    warn = (lambda msg: log(f"warning: {msg}")) if rank == 0 else (lambda msg: None)
    if side_files:
        extra = dict(extra, side_files={name: {"bytes": len(data), "sha256": sha256_bytes(data)}
                                        for name, data in sorted(side_files.items())})

    plan = None
    locked = False
    if rank == 0:
        try:
            store.lock()
            locked = True
            plan = store.prepare(settings, extra, num_samples, build_info, warn, side_files)
        except StoreError as e:
            plan = {"error": str(e)}
    try:
        return _build(store, settings, num_samples, produce, plan, extra=extra, build_info=build_info,
                      show_progress=show_progress, desc=desc, log=log, warn=warn)
    finally:
        if locked:
            store.unlock()


def _build(store, settings, num_samples, produce, plan, *, extra, build_info, show_progress, desc, log, warn):
    """build_shards after rank 0 took the lock and planned the work (`plan`, None on other ranks)."""
    rank, world = dist_info()
    shard_size = settings["shard_size"]
    out, unit = store.root, store.schema.unit
    plan = broadcast_object(plan, rank, world)
    if "error" in plan:
        raise StoreError(plan["error"])
    if plan.get("unchanged"):
        if rank == 0:
            log(f"{out}: complete, {num_samples} {unit} with these settings; nothing to build")
        return store.read_manifest() if rank == 0 else None
    todo = plan["todo"]
    mine = todo[rank::world]
    S = shard_size
    my_total = sum(shard_bounds(k, S, num_samples)[1] for k in mine)
    if rank == 0:
        log(f"{out}: {num_shards(num_samples, S)} shards of {S}; {len(plan['done'])} done, {len(todo)} to build"
            + (f" on {world} ranks" if world > 1 else "") + f"; {num_samples} {unit} in all")

    bar = None
    if show_progress and rank == 0 and mine:
        from tqdm.auto import tqdm
        bar = tqdm(total=my_total, unit=unit.rstrip("s"), desc=desc + (f" (rank 0 of {world})" if world > 1 else ""),
                   dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    try:
        for k in mine:
            start, count = shard_bounds(k, S, num_samples)
            store.write_shard(k, produce(k, start, count, bar.update if bar is not None else None))
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    barrier(world)
    manifest = None
    if rank == 0:
        manifest = store.finalise(settings, extra, num_samples, build_info, warn)
        if my_total:
            log(f"built {len(todo)} shards; rank 0: {my_total} {unit} in {elapsed:.1f}s "
                f"({my_total / max(elapsed, 1e-9):.2f} {unit}/s)")
    barrier(world)
    return manifest
