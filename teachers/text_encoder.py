"""A small text encoder that turns prompts into caption features, the role FLAN-T5 plays for LlamaGen's
text-to-image model, small enough to train and ship with a zoo teacher (`digits-t2i`).

    enc = PromptEncoder(WordTokenizer(vocabulary, slots=8), TextEncoder(config))
    cap = enc(["a thick, slanted seven", "a two"])          # teachers.base.Caption [2, 8, out_dim]

- `WordTokenizer`: lower-case words and commas, looked up in a fixed word list (id 0 = padding);
  an unknown word or a caption longer than the slots is a one-line ValueError naming the prompt.
  Captions are LEFT-padded (real tokens last), as the official t2i pipeline feeds T5 features.
- `TextEncoder`: word embeddings + embeddings of the position within the caption (counted from its
  first real token, so the padding never changes a token's features), `n_layer` pre-norm transformer
  blocks whose attention sees only the real tokens (key padding mask), a final LayerNorm and a linear
  map to `out_dim` (the teacher's caption_dim). Features at padded slots are zero.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Caption

_WORD = re.compile(r"[a-z]+|,")


def split_words(text: str) -> list:
    """Lower-cased words and commas of a prompt; a one-line ValueError naming it on any other character."""
    t = text.strip().lower()
    odd = _WORD.sub("", t).replace(" ", "")
    if odd:
        raise ValueError(f"caption {text!r}: characters {odd!r} are not words of the text encoder")
    return _WORD.findall(t)


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 17
    slots: int = 8            # caption positions = the teacher's cls_token_num
    dim: int = 32
    n_layer: int = 2
    n_head: int = 2
    out_dim: int = 32         # = the teacher's caption_dim

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"text encoder dim {self.dim} is not divisible by n_head {self.n_head}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TextEncoderConfig fields: {sorted(unknown)}")
        return cls(**d)


class WordTokenizer:
    """Prompts -> (ids [B, slots] int64, mask [B, slots] bool), left-padded; id 0 is padding."""

    def __init__(self, vocabulary: Sequence[str], slots: int):
        self.vocabulary = tuple(vocabulary)
        self.slots = slots
        self._ids = {w: i for i, w in enumerate(self.vocabulary)}

    def __call__(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.slots, dtype=torch.long)
        for b, text in enumerate(prompts):
            words = split_words(text)
            unknown = [w for w in words if w not in self._ids or self._ids[w] == 0]
            if unknown:
                raise ValueError(f"prompt {text!r}: unknown word(s) {unknown}; the text encoder knows "
                                 f"{list(self.vocabulary[1:])}")
            if not 1 <= len(words) <= self.slots:
                raise ValueError(f"prompt {text!r} has {len(words)} tokens; the text encoder takes 1 to "
                                 f"{self.slots}")
            ids[b, self.slots - len(words):] = torch.tensor([self._ids[w] for w in words])
        return ids, ids != 0


class EncoderBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.fc2 = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """h [B, L, dim], keys [B, 1, L, L] bool (True = attend) -> [B, L, dim]"""
        B, L, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class TextEncoder(nn.Module):
    """(ids [B, slots], mask [B, slots]) -> caption features [B, slots, out_dim] fp32, zero at padding."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.slots, cfg.dim)
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.out_dim)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        L = ids.shape[1]
        if L != self.config.slots:
            raise ValueError(f"the text encoder takes {self.config.slots} slots, got {L}")
        # position within the caption, counted from its first real token (padding-independent)
        pos = (mask.long().cumsum(1) - 1).clamp_min(0)
        h = self.tok_embeddings(ids) + self.pos_embeddings(pos)
        eye = torch.eye(L, dtype=torch.bool, device=ids.device)
        keys = (mask[:, None, None, :] | eye[None, None]).expand(-1, 1, L, L)   # padded rows see themselves
        for layer in self.layers:
            h = layer(h, keys)
        return self.output(self.norm(h)) * mask[..., None].to(h.dtype)


class PromptEncoder:
    """Prompts -> `Caption` with a tokenizer and a TextEncoder (kept on the CPU, eval mode, no grad).
    A plain object, not a module: attached to a teacher it adds nothing to the teacher's state dict."""

    def __init__(self, tokenizer: WordTokenizer, encoder: TextEncoder):
        if tokenizer.slots != encoder.config.slots or len(tokenizer.vocabulary) != encoder.config.vocab_size:
            raise ValueError(f"tokenizer ({len(tokenizer.vocabulary)} words, {tokenizer.slots} slots) does not "
                             f"fit the encoder {encoder.config}")
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)

    @property
    def slots(self) -> int:
        return self.tokenizer.slots

    @property
    def dim(self) -> int:
        return self.encoder.config.out_dim

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Caption:
        ids, mask = self.tokenizer(list(prompts))
        dev = self.encoder.output.weight.device
        return Caption(self.encoder(ids.to(dev), mask.to(dev)).float(), mask.to(dev))
