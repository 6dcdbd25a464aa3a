"""`PairDataset`: a built pair data set (`pairs.py`) as a map-style torch Dataset."""
from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from .captions import read_side_table
from .pairs import DatasetError, pair_store
from .shard_store import ShardRows
from .seeding import noise_fingerprint, sample_noise
from .teacher_spec import TeacherSpec


class PairDataset(ShardRows, Dataset):
    """A built data set as a map-style Dataset over memory-mapped shards.

    item i -> {"noise": [n, C] fp32, "tokens": [n] int64, "label": int64, "index": int64}; the noise
    is read from the shard when stored, else regenerated from (seed, index). Works with shuffled
    DataLoaders and DistributedSampler (each worker process opens its own file handles).
    On opening, every shard must exist, have the recorded size, parse and hold the recorded count;
    `verify=True` also checks each shard's sha256 (reads every byte).
    """

    noun = "pairs"

    def __init__(self, root: str, verify: bool = False, allow_incomplete: bool = False):
        super().__init__(pair_store(os.fspath(root)), verify=verify, allow_incomplete=allow_incomplete,
                         finish="its `dd build-dataset` command")
        if not self.settings["store_noise"]:
            fp = noise_fingerprint(self.settings["seed"], self.settings["num_tokens"], self.settings["embed_dim"])
            if fp != self.settings["noise_fingerprint"]:
                raise DatasetError(
                    f"{self.root}: this torch ({torch.__version__}) draws different noise from the one that built "
                    f"the data set (torch {self.manifest['build'].get('torch')}); rebuild with --store-noise")

    @property
    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec.from_dict(self.manifest["teacher_spec"])

    @property
    def captions(self):
        """The `CaptionTable` of a text-to-image data set (items' "label" is a caption index), else None."""
        if "condition" not in self.settings:
            return None
        if getattr(self, "_captions", None) is None:
            self._captions = read_side_table(self.root)
        return self._captions

    @property
    def num_tokens(self) -> int:
        return self.settings["num_tokens"]

    @property
    def embed_dim(self) -> int:
        return self.settings["embed_dim"]

    def __getitem__(self, i: int) -> dict:
        f, j = self._row(i)
        index = int(f.get_slice("index")[j:j + 1][0])
        item = {"tokens": f.get_slice("tokens")[j:j + 1][0].long(),
                "label": f.get_slice("labels")[j:j + 1][0].long(),
                "index": torch.tensor(index, dtype=torch.long)}
        if self.settings["store_noise"]:
            item["noise"] = f.get_slice("noise")[j:j + 1][0]
        else:
            item["noise"] = sample_noise(self.settings["seed"], [index], self.num_tokens, self.embed_dim)[0]
        return item

