"""Caption conditions of text-to-image teachers: a prompt file plus precomputed caption features in the
official LlamaGen format, read into one table (`CaptionTable`), and that table as a data set's side file.

**The feature files** (LlamaGen `language/extract_t5_feature.py`): for line i (0-based) of a prompt
file `<stem>.jsonl` / `<stem>.txt`, the file `<DIR>/<stem>/<i>.npy` holds float32 [1, n, D]: the n real
T5 tokens only. As the official data set (`dataset/t2i.py`) does, they are left-padded into the
model's `cls_token_num` slots (real tokens last, mask True there, features zero elsewhere). The
official code silently truncates a caption over the slot count; we refuse it.

**Checked before anything is written**: every prompt line non-empty, every feature file present (the
error names the prompt), of shape [1, n, D] with D = the model's caption_dim and 1 <= n <= slots.

**A teacher's own text encoder.** A teacher with a `prompt_encoder` (the `digits-t2i` zoo teacher)
needs only the prompt file: `encode_captions` runs its encoder on the prompts (a prompt outside its
vocabulary is a one-line error naming it). Feature files, when given, are still read instead.

**Side file.** A data set stores the table once (`captions.safetensors`: features [P, slots, D] fp32,
mask [P, slots] uint8, the prompts in its metadata); each pair stores a caption index in `labels`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from teachers.base import Caption

SIDE_FILE = "captions.safetensors"


class CaptionError(ValueError):
    """Bad prompts or caption features (one line, naming the prompt)."""


@dataclass(frozen=True)
class CaptionTable:
    """prompts [P]; features [P, slots, D] fp32 (zero at padded slots); mask [P, slots] bool (left-padded);
    prompts_sha256: of the prompt file's bytes."""

    prompts: List[str]
    features: torch.Tensor
    mask: torch.Tensor
    prompts_sha256: str

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def slots(self) -> int:
        return self.features.shape[1]

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    def caption(self, index: torch.Tensor) -> Caption:
        """index [B] caption ids -> Caption ([B, slots, D], [B, slots])."""
        index = index.long().cpu()
        return Caption(self.features[index], self.mask[index])

    def to_bytes(self) -> bytes:
        """The side file's bytes (deterministic: the same table gives the same bytes)."""
        from safetensors.torch import save
        return save({"features": self.features.contiguous(), "mask": self.mask.to(torch.uint8).contiguous()},
                    # one metadata key: safetensors writes several in hash-map order (bytes would vary)
                    metadata={"prompts": json.dumps({"prompts": self.prompts, "sha256": self.prompts_sha256})})

    def settings(self) -> dict:
        """What decides the data (a data set's `settings["condition"]`)."""
        return {"kind": "caption", "prompts_sha256": self.prompts_sha256, "num_prompts": len(self),
                "caption_slots": self.slots, "caption_dim": self.dim,
                "table_sha256": hashlib.sha256(self.to_bytes()).hexdigest()}


def read_prompts(path: str) -> List[str]:
    """One prompt a line (a .jsonl line may be a JSON object with "prompt" or "text", or a JSON string)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CaptionError(f"cannot read the prompt file {path}: {e.strerror}") from e
    if not lines:
        raise CaptionError(f"the prompt file {path} is empty")
    prompts = []
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith(("{", '"')):
            try:
                obj = json.loads(text)
                text = obj if isinstance(obj, str) else str(obj.get("prompt", obj.get("text", "")))
            except (json.JSONDecodeError, AttributeError):
                pass
        if not text.strip():
            raise CaptionError(f"{path}: line {i + 1} is an empty prompt (one non-empty prompt a line)")
        prompts.append(text.strip())
    return prompts


def _prompts_and_sha(path: str) -> Tuple[List[str], str]:
    """`read_prompts` and the sha256 of the file (a data set's `prompts_sha256`)."""
    prompts = read_prompts(path)
    with open(path, "rb") as f:
        return prompts, hashlib.sha256(f.read()).hexdigest()


def feature_path(features_dir: str, prompts_path: str, line: int) -> str:
    """The official file of prompt line `line` (0-based): <DIR>/<prompt file stem>/<line>.npy."""
    stem = os.path.splitext(os.path.basename(prompts_path))[0]
    return os.path.join(features_dir, stem, f"{line}.npy")


def load_captions(prompts_path: str, features_dir: str, slots: int, dim: int) -> CaptionTable:
    """Read and check every prompt and its features (CaptionError on the first problem), left-padded
    into `slots` positions of dimension `dim`."""
    import numpy as np

    prompts, sha = _prompts_and_sha(prompts_path)
    features = torch.zeros(len(prompts), slots, dim)
    mask = torch.zeros(len(prompts), slots, dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        p = feature_path(features_dir, prompts_path, i)
        name = f"prompt {i + 1} ({_short(prompt)})"
        if not os.path.isfile(p):
            raise CaptionError(f"no caption features for {name}: {p} is missing")
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CaptionError(f"caption features of {name} do not load ({p}: {e})") from e
        if a.ndim != 3 or a.shape[0] != 1 or a.shape[1] < 1:
            raise CaptionError(f"caption features of {name} have shape {list(a.shape)}, expected [1, n, {dim}] ({p})")
        if a.shape[2] != dim:
            raise CaptionError(f"caption features of {name} have dimension {a.shape[2]}, the teacher's caption_dim "
                               f"is {dim} ({p})")
        n = a.shape[1]
        if n > slots:
            raise CaptionError(f"{name} has {n} caption tokens, over the teacher's {slots} caption slots ({p})")
        features[i, slots - n:] = torch.from_numpy(np.ascontiguousarray(a[0], dtype=np.float32))
        mask[i, slots - n:] = True
    return CaptionTable(prompts, features, mask, sha)


def encode_captions(prompts_path: str, encoder, slots: int, dim: int) -> CaptionTable:
    """The table of a prompt file made by a teacher's own `prompt_encoder` (prompts -> Caption),
    checked against the teacher's (slots, dim)."""
    prompts, sha = _prompts_and_sha(prompts_path)
    try:
        cap = encoder(prompts)
    except ValueError as e:
        raise CaptionError(f"{prompts_path}: {e}") from e
    if tuple(cap.features.shape[1:]) != (slots, dim):
        raise CaptionError(f"the teacher's text encoder gives captions of {list(cap.features.shape[1:])}, the "
                           f"teacher takes [{slots}, {dim}]")
    return CaptionTable(prompts, cap.features.float().cpu().contiguous(), cap.mask.cpu(), sha)


def teacher_caption_shape(teacher) -> Optional[tuple]:
    """(slots, caption_dim) of a text-conditional teacher; None for a class-conditional one."""
    if not getattr(teacher, "text_conditional", False):
        return None
    cfg = teacher.gpt.config
    return cfg.cls_token_num, cfg.caption_dim


def caption_shape_if_given(teacher, given: bool) -> Optional[tuple]:
    """`teacher_caption_shape`, with a CaptionError unless captions are `given` exactly to a
    text-to-image teacher."""
    shape = teacher_caption_shape(teacher)
    if shape is None and given:
        raise CaptionError("this teacher is class-conditional: drop --prompts / --caption-features")
    if shape is not None and not given:
        raise CaptionError("this teacher is text-to-image: give --prompts FILE"
                           + ("" if getattr(teacher, "prompt_encoder", None) is not None else " --caption-features DIR"))
    return shape


def captions_for_teacher(teacher, prompts: Optional[str], features_dir: Optional[str]) -> Optional[CaptionTable]:
    """The table of a command's --prompts / --caption-features, in the teacher's shape (CaptionError
    unless given exactly when the teacher is text-to-image, and together unless the teacher has its
    own `prompt_encoder`); None for class labels."""
    encoder = getattr(teacher, "prompt_encoder", None)
    if (features_dir is not None and prompts is None) or (prompts is not None and features_dir is None and encoder is None):
        raise CaptionError("--prompts and --caption-features go together")
    shape = caption_shape_if_given(teacher, prompts is not None)
    if shape is None:
        return None
    if features_dir is None:
        return encode_captions(prompts, encoder, *shape)
    return load_captions(prompts, features_dir, *shape)


def read_side_table(root: str) -> CaptionTable:
    """The caption table a data set stores (`SIDE_FILE` in `root`)."""
    from safetensors import safe_open
    with safe_open(os.path.join(root, SIDE_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["prompts"])
        return CaptionTable(meta["prompts"], f.get_tensor("features"), f.get_tensor("mask").bool(), meta["sha256"])


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
