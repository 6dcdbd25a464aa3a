"""`PairDataset`: a built pair data set (`pairs.py`) as a map-style torch Dataset."""
from __future__ import annotations

import bisect
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .pairs import DatasetError, pair_store
from .seeding import noise_fingerprint, sample_noise
from .teacher_spec import TeacherSpec


class PairDataset(Dataset):
    """A built data set as a map-style Dataset over memory-mapped shards.

    item i -> {"noise": [n, C] fp32, "tokens": [n] int64, "label": int64, "index": int64}; the noise
    is read from the shard when stored, else regenerated from (seed, index). Works with shuffled
    DataLoaders and DistributedSampler (each worker process opens its own file handles).
    On opening, every shard must exist, have the recorded size, parse and hold the recorded count;
    `verify=True` also checks each shard's sha256 (reads every byte).
    """

    def __init__(self, root: str, verify: bool = False, allow_incomplete: bool = False):
        self.root = os.fspath(root)
        self.manifest = pair_store(self.root).read_manifest()
        if not self.manifest["complete"] and not allow_incomplete:
            raise DatasetError(f"{self.root} is incomplete: re-run its `dd build-dataset` command to finish it")
        self.settings = self.manifest["settings"]
        shards = self.manifest["shards"]
        store = pair_store(self.root)
        for e in shards:
            try:
                store.check_shard(e, self.settings, verify_hash=verify)
            except DatasetError as err:
                raise DatasetError(f"{self.root}: {err}") from err   # which data set, for `dd train`
        if not self.settings["store_noise"]:
            fp = noise_fingerprint(self.settings["seed"], self.settings["num_tokens"], self.settings["embed_dim"])
            if fp != self.settings["noise_fingerprint"]:
                raise DatasetError(
                    f"{self.root}: this torch ({torch.__version__}) draws different noise from the one that built "
                    f"the data set (torch {self.manifest['build'].get('torch')}); rebuild with --store-noise")
        self.shards = shards
        self._ends = np.cumsum([e["count"] for e in shards]).tolist()
        self._handles: dict = {}
        self._pid = None

    @property
    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec.from_dict(self.manifest["teacher_spec"])

    @property
    def num_tokens(self) -> int:
        return self.settings["num_tokens"]

    @property
    def embed_dim(self) -> int:
        return self.settings["embed_dim"]

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"], d["_pid"] = {}, None
        return d

    def _handle(self, s: int):
        from safetensors import safe_open
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = safe_open(os.path.join(self.root, self.shards[s]["file"]), framework="pt")
        return self._handles[s]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} pairs")
        s = bisect.bisect_right(self._ends, i)
        j = i - (self._ends[s - 1] if s else 0)
        f = self._handle(s)
        index = int(f.get_slice("index")[j:j + 1][0])
        item = {"tokens": f.get_slice("tokens")[j:j + 1][0].long(),
                "label": f.get_slice("labels")[j:j + 1][0].long(),
                "index": torch.tensor(index, dtype=torch.long)}
        if self.settings["store_noise"]:
            item["noise"] = f.get_slice("noise")[j:j + 1][0]
        else:
            item["noise"] = sample_noise(self.settings["seed"], [index], self.num_tokens, self.embed_dim)[0]
        return item

