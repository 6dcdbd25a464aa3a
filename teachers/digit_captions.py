"""Captions of digit images made from what can be measured on them: the digit, the stroke thickness
and the slant. The `digits-t2i` zoo teacher is trained on these captions, and its samples are scored
by measuring the same attributes again (`caption_agreement`).

    "a thick, slanted seven"   "a thin, upright zero"   "a thick two"   "a slanted four"   "a nine"

Grammar: "a" [thin | thick] [","] [upright | slanted] DIGIT, with the comma exactly when both attributes
are given. An attribute that is left out is free: any thickness (slant) agrees with it.

Measures, on the grey level of an image [N, 3, 16, 16] in [0, 1] (both unchanged by an integer shift
that keeps the digit inside the frame):
- ink     = the summed intensity. "thick" when above the digit's threshold, else "thin".
- slant   = the shear of the ink: -cov(x, y) / var(y) under the intensity weights, with x to the right
            and y downwards, so a positive slant leans the top of the digit to the right. "slanted"
            when above the digit's threshold, else "upright".
The thresholds are per digit (`AttributeThresholds`): the digits' medians on the training images, so
both words are equally frequent for every digit (the zoo JSON stores them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .text_encoder import split_words

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS_WORDS = ("thin", "thick")        # index = thick (bool)
SLANT_WORDS = ("upright", "slanted")       # index = slanted (bool)
# The word vocabulary of the digits text encoder; id 0 is padding.
VOCABULARY = ("<pad>", "a", ",") + THICKNESS_WORDS + SLANT_WORDS + DIGIT_WORDS


@dataclass(frozen=True)
class CaptionAttributes:
    """What a caption says: the digit, and thick / slanted (None: not said, anything agrees)."""

    label: int
    thick: Optional[bool] = None
    slanted: Optional[bool] = None


def caption_text(a: CaptionAttributes) -> str:
    """Attributes -> the caption, e.g. CaptionAttributes(7, True, True) -> "a thick, slanted seven"."""
    words = []
    if a.thick is not None:
        words.append(THICKNESS_WORDS[int(a.thick)])
    if a.slanted is not None:
        words.append(SLANT_WORDS[int(a.slanted)])
    return " ".join(["a", ", ".join(words), DIGIT_WORDS[a.label]] if words else ["a", DIGIT_WORDS[a.label]])


def parse_caption(text: str) -> CaptionAttributes:
    """The inverse of `caption_text`; ValueError (one line, naming the caption) outside the grammar."""
    w = split_words(text)
    bad = ValueError(f"caption {text!r} is not of the form \"a [thin|thick][,] [upright|slanted] DIGIT\" "
                     f"(DIGIT one of {', '.join(DIGIT_WORDS)})")
    if len(w) < 2 or w[0] != "a" or w[-1] not in DIGIT_WORDS:
        raise bad
    mid = w[1:-1]
    thick = slanted = None
    if mid and mid[0] in THICKNESS_WORDS:
        thick = mid.pop(0) == "thick"
        if mid:
            if mid[0] != ",":
                raise bad
            mid.pop(0)
            if not mid:
                raise bad
    if mid and mid[0] in SLANT_WORDS:
        slanted = mid.pop(0) == "slanted"
    if mid:
        raise bad
    return CaptionAttributes(DIGIT_WORDS.index(w[-1]), thick, slanted)


def all_captions() -> List[str]:
    """The 40 full captions, digit-major: for each digit thin-upright, thin-slanted, thick-upright,
    thick-slanted (a balanced prompt set)."""
    return [caption_text(CaptionAttributes(d, thick, slanted))
            for d in range(10) for thick in (False, True) for slanted in (False, True)]


# ---- measures -----------------------------------------------------------------------------------
def ink(images: torch.Tensor) -> torch.Tensor:
    """images [N, C, H, W] in [0, 1] -> summed grey intensity [N] fp32."""
    return images.float().mean(1).sum((1, 2))


def slant(images: torch.Tensor) -> torch.Tensor:
    """images [N, C, H, W] in [0, 1] -> shear -cov(x, y) / var(y) of the ink [N] fp32 (positive: the
    top leans right). A blank image has slant 0."""
    w = images.float().mean(1)                                           # [N, H, W]
    H, W = w.shape[-2:]
    y = torch.arange(H, dtype=torch.float32, device=w.device)[:, None].expand(H, W)
    x = torch.arange(W, dtype=torch.float32, device=w.device)[None, :].expand(H, W)
    m = w.sum((1, 2)).clamp_min(1e-6)
    my, mx = (w * y).sum((1, 2)) / m, (w * x).sum((1, 2)) / m
    dy, dx = y[None] - my[:, None, None], x[None] - mx[:, None, None]
    cov = (w * dx * dy).sum((1, 2)) / m
    var = (w * dy * dy).sum((1, 2)) / m
    return -cov / var.clamp_min(1e-6)


@dataclass(frozen=True)
class AttributeThresholds:
    """Per-digit thresholds: ink [10] ("thick" above), slant [10] ("slanted" above)."""

    ink: Tuple[float, ...]
    slant: Tuple[float, ...]

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor) -> "AttributeThresholds":
        """The per-digit medians of `images` [N, 3, H, W] with digit `labels` [N]."""
        i, s = ink(images), slant(images)
        return cls(tuple(float(i[labels == d].median()) for d in range(10)),
                   tuple(float(s[labels == d].median()) for d in range(10)))

    def to_dict(self) -> dict:
        return {"ink": list(self.ink), "slant": list(self.slant)}

    @classmethod
    def from_dict(cls, d: dict) -> "AttributeThresholds":
        if set(d) != {"ink", "slant"} or len(d["ink"]) != 10 or len(d["slant"]) != 10:
            raise ValueError(f"attribute thresholds need 10 'ink' and 10 'slant' values, got {d}")
        return cls(tuple(map(float, d["ink"])), tuple(map(float, d["slant"])))

    def measure(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images [N, 3, H, W], digits labels [N] (whose thresholds apply) -> (thick [N], slanted [N]) bool."""
        labels = labels.long().cpu()
        ti, ts = torch.tensor(self.ink), torch.tensor(self.slant)
        return ink(images).cpu() > ti[labels], slant(images).cpu() > ts[labels]

    def captions(self, images: torch.Tensor, labels: torch.Tensor) -> List[CaptionAttributes]:
        """The full caption attributes of real images with known digits."""
        thick, slanted = self.measure(images, labels)
        return [CaptionAttributes(int(y), bool(a), bool(b)) for y, a, b in zip(labels.tolist(), thick, slanted)]


def caption_agreement(captions: Sequence[CaptionAttributes], predicted: torch.Tensor, images: torch.Tensor,
                      thresholds: AttributeThresholds) -> dict:
    """How well images [N, 3, H, W] follow their captions [N], given the classifier's digits
    `predicted` [N]: {"digit": fraction whose predicted digit is the caption's, "caption": fraction
    whose digit AND every stated attribute agree (attributes measured with the caption's digit's
    thresholds), "thickness" / "slant": agreement among captions that state it (nan if none)}."""
    if not (len(captions) == len(predicted) == len(images)):
        raise ValueError(f"{len(captions)} captions, {len(predicted)} predictions, {len(images)} images")
    want = torch.tensor([c.label for c in captions])
    thick, slanted = thresholds.measure(images, want)
    digit_ok = predicted.long().cpu() == want
    ok_t = torch.tensor([c.thick is None or c.thick == bool(t) for c, t in zip(captions, thick)])
    ok_s = torch.tensor([c.slanted is None or c.slanted == bool(s) for c, s in zip(captions, slanted)])
    said_t = torch.tensor([c.thick is not None for c in captions])
    said_s = torch.tensor([c.slanted is not None for c in captions])

    def frac(ok, among):
        return float(ok[among].float().mean()) if bool(among.any()) else float("nan")

    return {"digit": float(digit_ok.float().mean()), "caption": float((digit_ok & ok_t & ok_s).float().mean()),
            "thickness": frac(ok_t, said_t), "slant": frac(ok_s, said_s)}
