"""The tiny digits teachers shipped with the repo (trained by tools/train_digits_zoo.py; the
diffusion one, digits-dit, by tools/train_digits_dit.py).

Two class-conditional AR teachers of scikit-learn's bundled 8x8 digits, upscaled to 16x16 RGB, plus
a small CNN classifier that scores their samples (FID features and class accuracy):

    from teachers import load_teacher
    t = load_teacher("digits-llamagen")            # LlamaGen layout: 64 steps of 1 token (8x8 grid)
    t = load_teacher("digits-var")                 # VAR layout: 6 scales (1, 2, 3, 4, 6, 8), 130 tokens
    d = load_teacher("digits-dit")                 # a pixel-space DiT (DiffusionTeacher): d.sample(labels)
    w = load_teacher("digits-t2i")                 # text-to-image LlamaGen + its own text encoder:
    w.sample(w.prompt_encoder(["a thick, slanted seven"]), w.default_sampling)
    tokens = t.sample(torch.arange(10), t.default_sampling)
    images = t.decode(tokens)                      # [10, 3, 16, 16] in [0, 1]

    from teachers.zoo import digits_data, load_classifier
    x, y = digits_data("test")                     # the held-out split the teachers never saw
    clf = load_classifier()                        # clf(x) -> logits [N, 10]; clf.features(x) -> [N, 128]
    maps = clf.feature_maps(x)                     # [[N, 32, 16, 16], [N, 64, 8, 8]] (perceptual loss)

digits-t2i's file also holds its text encoder (under "text."; TEXT_ENCODERS), its JSON the encoder
config, vocabulary and caption attribute thresholds (`attribute_thresholds()`); its VQ is digits-llamagen's.

ZOO maps a name to (family, file stem); the weights and config of `<stem>` live beside this file as
`<stem>.safetensors` (one file: the transformer under "gpt." / "var.", the tokenizer under "vq." /
"vae.") and `<stem>.json` (official hyper-parameter names, the DD sampling defaults, how it was
trained and what it measured).

`dd eval --extractor digits` wraps the classifier (`distilled_decoding.extractors.DigitsExtractor`);
like everything in `teachers/`, the zoo imports nothing from `distilled_decoding/`.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

ZOO_DIR = os.path.dirname(os.path.abspath(__file__))
TRAIN_COMMAND = "python tools/train_digits_zoo.py"
TRAIN_COMMANDS = {"digits-dit": "python tools/train_digits_dit.py"}     # stems not made by TRAIN_COMMAND

# name -> (family, file stem, prefix of the transformer's keys, prefix of the tokenizer's keys or
# None: the pixel-space DiT has no tokenizer)
ZOO: dict = {
    "digits-llamagen": ("llamagen", "digits-llamagen", "gpt.", "vq."),
    "digits-var": ("var", "digits-var", "var.", "vae."),
    "digits-dit": ("dit", "digits-dit", "dit.", None),
    "digits-t2i": ("llamagen", "digits-t2i", "gpt.", "vq."),
}
# Zoo teachers that ship a text encoder (teachers/text_encoder.py): name -> prefix of its keys. The
# loaded teacher's `prompt_encoder` turns prompts into its Caption.
TEXT_ENCODERS: dict = {"digits-t2i": "text."}
CLASSIFIER_STEM = "digits-classifier"

# ---- data --------------------------------------------------------------------------------------
IMAGE_SIZE = 16
NUM_CLASSES = 10
NUM_TEST = 297          # held-out split: the LAST 297 images of load_digits() in its bundled order
DATA_RULE = ("sklearn.datasets.load_digits() in its bundled order (1797 images): train = indices "
             "[0, 1500), test = indices [1500, 1797); pixels / 16 -> [0, 1], bilinear upscale 8x8 -> "
             "16x16 (F.interpolate, align_corners=False, then clamped to [0, 1]), grey replicated to 3 "
             "channels")


def digits_data(split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """The digits split the zoo was trained on: ("train" | "test" | "all") ->
    (images [N, 3, 16, 16] float32 in [0, 1], labels [N] int64). Train: 1500, test: 297."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).div_(16.0)[:, None]      # [1797, 1, 8, 8]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(d.target, dtype=torch.long)
    n = x.shape[0]
    if split == "train":
        sl = slice(0, n - NUM_TEST)
    elif split == "test":
        sl = slice(n - NUM_TEST, n)
    elif split == "all":
        sl = slice(0, n)
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    return x[sl].contiguous(), y[sl].contiguous()


# ---- the classifier ----------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """A small CNN on [N, 3, 16, 16] images in [0, 1].

    conv3x3(3->c1) ReLU conv3x3(c1->c1) ReLU maxpool2 -> 8x8; conv3x3(c1->c2) ReLU conv3x3(c2->c2)
    ReLU maxpool2 -> 4x4; flatten -> fc(16*c2 -> feature_dim) = the FEATURES (pre-activation,
    so no dead dimensions in the covariance); ReLU -> fc(feature_dim -> 10) = the logits.
    """

    def __init__(self, c1: int = 32, c2: int = 64, feature_dim: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c1, 3, padding=1)
        self.conv3 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv4 = nn.Conv2d(c2, c2, 3, padding=1)
        self.fc = nn.Linear(16 * c2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x [N, 3, 16, 16] in [0, 1] -> the maps after the ReLUs that end the two conv blocks
        (conv2: [N, c1, 16, 16], conv4: [N, c2, 8, 8]), fp32; differentiable in x (the perceptual
        embedding loss of `dd train` compares them, LPIPS-style)."""
        x = x.float()
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the digits classifier takes {IMAGE_SIZE}x{IMAGE_SIZE} images, got {tuple(x.shape)}")
        h2 = F.relu(self.conv2(F.relu(self.conv1(x))))
        h4 = F.relu(self.conv4(F.relu(self.conv3(F.max_pool2d(h2, 2)))))
        return [h2, h4]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, 16, 16] in [0, 1] -> [N, feature_dim] fp32."""
        return self.fc(F.max_pool2d(self.feature_maps(x)[1], 2).flatten(1))

    def features_and_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(F.relu(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, 16, 16] in [0, 1] -> logits [N, 10]."""
        return self.features_and_logits(x)[1]


def _paths(stem: str) -> Tuple[str, str]:
    base = os.path.join(ZOO_DIR, stem)
    st, js = base + ".safetensors", base + ".json"
    for p in (st, js):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"zoo file not found: {p}. Create it with "
                                    f"`{TRAIN_COMMANDS.get(stem, TRAIN_COMMAND)}` (a few minutes on CPU).")
    return st, js


def read_meta(stem: str) -> dict:
    """The JSON config of a zoo file stem ("digits-llamagen", "digits-var", "digits-classifier")."""
    with open(_paths(stem)[1]) as f:
        return json.load(f)


def load_classifier(device: Union[str, torch.device] = "cpu") -> DigitsClassifier:
    """The shipped digits classifier, strict load, eval mode, no grad."""
    from safetensors.torch import load_file

    st, js = _paths(CLASSIFIER_STEM)
    with open(js) as f:
        meta = json.load(f)
    model = DigitsClassifier(**meta["config"])
    model.load_state_dict(load_file(st), strict=True)
    return model.to(device).eval().requires_grad_(False)


# ---- the teachers ------------------------------------------------------------------------------
def load(name: str, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = torch.float32,
         weights_only: bool = True, **options):
    """Build the zoo teacher `name` (see ZOO) on `device`: the family's own `load` with the JSON's
    dict configs and the in-memory state dicts of the safetensors file (strict). `default_sampling`
    is set on the instance from the JSON. dtype: the transformer's precision (tokenizers stay fp32).
    weights_only is accepted for interface compatibility (safetensors never unpickle)."""
    from safetensors.torch import load_file

    from ..base import SamplingConfig
    from ..checkpoint import file_sha256
    from ..families import family_module

    if name not in ZOO:
        raise ValueError(f"unknown zoo teacher {name!r}; choose from {sorted(ZOO)}")
    if options:
        raise TypeError(f"zoo teacher {name!r} takes no options {sorted(options)} "
                        "(one set of weights, fixed configs)")
    family, stem, pre_t, pre_k = ZOO[name]
    st, js = _paths(stem)
    with open(js) as f:
        meta = json.load(f)
    state = load_file(st)
    if pre_k is None:
        return _load_diffusion(name, family, st, meta, state, pre_t, device, dtype)
    pre_x = TEXT_ENCODERS.get(name)
    prefixes = tuple(p for p in (pre_t, pre_k, pre_x) if p)
    model_sd = {k[len(pre_t):]: v for k, v in state.items() if k.startswith(pre_t)}
    tok_sd = {k[len(pre_k):]: v for k, v in state.items() if k.startswith(pre_k)}
    stray = sorted(k for k in state if not k.startswith(prefixes))
    if stray or not model_sd or not tok_sd:
        raise ValueError(f"{st}: expected keys under {' and '.join(map(repr, prefixes))} only (stray: {stray[:5]})")
    teacher = family_module(family).load(meta["config"], model_sd, tokenizer_config=meta["tokenizer_config"],
                                         tokenizer_checkpoint=tok_sd, device=device,
                                         dtype=torch.float32 if dtype is None else dtype)
    teacher.default_sampling = SamplingConfig(**meta["default_sampling"])
    sha = file_sha256(st)[:16]          # one file holds both parts
    teacher.ids.update({"zoo": name, "checkpoint": sha, "tokenizer_checkpoint": sha})
    if pre_x:
        teacher.prompt_encoder = prompt_encoder(meta, {k[len(pre_x):]: v for k, v in state.items()
                                                       if k.startswith(pre_x)}, where=st)
    return teacher


def prompt_encoder(meta: dict, state: dict, where: str = "text encoder"):
    """The PromptEncoder of a zoo JSON (`text_encoder_config`, `vocabulary`) and its state dict
    (strict: a missing, unexpected or misshapen key is named)."""
    from ..checkpoint import load_strict
    from ..text_encoder import PromptEncoder, TextEncoder, TextEncoderConfig, WordTokenizer

    cfg = TextEncoderConfig.from_dict(meta["text_encoder_config"])
    enc = load_strict(lambda: TextEncoder(cfg), state, what=f"{where}: text encoder {cfg}")
    return PromptEncoder(WordTokenizer(meta["vocabulary"], cfg.slots), enc)


def attribute_thresholds(name: str = "digits-t2i"):
    """The caption attribute thresholds a text-to-image zoo teacher was trained with
    (`teachers.digit_captions.AttributeThresholds`, from its JSON)."""
    from ..digit_captions import AttributeThresholds
    return AttributeThresholds.from_dict(read_meta(ZOO[name][1])["attribute_thresholds"])


def _load_diffusion(name, family, st, meta, state, prefix, device, dtype):
    """A zoo diffusion teacher: one model under `prefix`, no tokenizer; the JSON's default sampler."""
    from ..checkpoint import file_sha256
    from ..families import family_module

    stray = sorted(k for k in state if not k.startswith(prefix))
    if stray:
        raise ValueError(f"{st}: expected keys under {prefix!r} only (stray: {stray[:5]})")
    sd = {k[len(prefix):]: v for k, v in state.items()}
    teacher = family_module(family).load(meta["config"], sd, pixel_space=meta["pixel_space"],
                                         cfg_channels=meta["cfg_channels"], device=device,
                                         dtype=torch.float32 if dtype is None else dtype)
    teacher.default_steps = int(meta["default_sampling"]["steps"])
    teacher.default_cfg_scale = float(meta["default_sampling"]["cfg_scale"])
    teacher.ids.update({"zoo": name, "checkpoint": file_sha256(st)[:16]})
    return teacher
