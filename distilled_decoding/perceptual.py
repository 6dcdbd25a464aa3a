"""The image-space embedding losses of `dd train` (`--emb-loss perceptual | lpips`): the paper's recipe.

Both decode two token-embedding sequences through the teacher's VQ decoder and compare the images:
the full sequence with the student's embedding-head output on the noise positions and the target
rows elsewhere, against the target sequence. Gradients flow through the (frozen) comparison network
and the teacher's decoder back to the student's embedding head; the target image needs none.

- `DigitsPerceptualLoss` (`perceptual`): LPIPS's recipe with a network that runs on this machine,
  the zoo's digits classifier (teachers/zoo). Its maps after the ReLUs that end its two conv blocks
  (conv2 at 16x16, conv4 at 8x8) are unit-normalised over channels at each position (LPIPS's
  normalize_tensor), squared differences are summed over channels, averaged over positions, then
  averaged over the two layers with uniform weights: LPIPS's learned per-channel linear weights exist
  only for its own VGG/AlexNet/SqueezeNet, none were fitted for this network. Only for teachers that
  make 16x16 images (the digits zoo teachers): the classifier knows nothing else.
- `LPIPSEmbLoss` (`lpips`): the `lpips` package (optional extra, needs torchvision), for real images.
"""
from __future__ import annotations

from typing import List, Sequence

import click
import torch

from .errors import DDError

PERCEPTUAL_IMAGE_SIZE = 16      # the digits classifier's input


def normalize_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """f [N, C, h, w] -> f divided by its l2 norm over C at each position (LPIPS's normalize_tensor)."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


def feature_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """a, b: per-layer maps [N, C_l, h_l, w_l] -> [N]: the uniform mean over layers of the spatial
    mean of Σ_C (normalised a − normalised b)²."""
    per_layer = [(normalize_channels(x) - normalize_channels(y)).pow(2).sum(1).mean((1, 2)) for x, y in zip(a, b)]
    return torch.stack(per_layer, 0).mean(0)


class DecodedImageLoss:
    """d(pred, target, mask) -> [B]: `compare(image, reference)` of the teacher's decodings of the full
    sequence (pred on the mask's positions, target elsewhere) and of the target.
    pred, target: [B, n, C]; mask: [B, n] bool; images [B, 3, H, W] in [-1, 1]."""

    name = "image loss"

    def __init__(self, teacher):
        self.teacher = teacher

    def compare(self, img: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        full = torch.where(mask[..., None], pred, target)                       # [B, n, C]
        img = self.teacher.decode_differentiable(full)                          # [B, 3, H, W] in [-1, 1]
        with torch.no_grad():
            ref = self.teacher.decode_differentiable(target)
        return self.compare(img, ref)


class DigitsPerceptualLoss(DecodedImageLoss):
    """LPIPS-style distance in the zoo digits classifier's feature maps (module docstring)."""

    def __init__(self, teacher):
        size = int(getattr(teacher, "image_size", 0))
        if size != PERCEPTUAL_IMAGE_SIZE:
            raise DDError(f"--emb-loss perceptual compares digits-classifier features of {PERCEPTUAL_IMAGE_SIZE}x"
                          f"{PERCEPTUAL_IMAGE_SIZE} digits; this teacher makes {size}x{size} images: use "
                          "--emb-loss lpips (pip install -e '.[lpips]') or --emb-loss mse")
        from teachers.zoo import load_classifier
        super().__init__(teacher)
        self.net = load_classifier(teacher.device)          # eval, requires_grad False: frozen, yet differentiable
        self.name = ("perceptual: digits-classifier conv2/conv4 maps (unit-normalised over channels, uniform "
                     "layer weights) of images decoded by the teacher's VQ decoder")

    def maps(self, img: torch.Tensor) -> List[torch.Tensor]:
        """img [B, 3, 16, 16] in [-1, 1] -> the classifier's maps of it in [0, 1]."""
        return self.net.feature_maps((img + 1) / 2)

    def compare(self, img: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref_maps = self.maps(ref)
        return feature_distance(self.maps(img), ref_maps)


class LPIPSEmbLoss(DecodedImageLoss):
    """LPIPS (the `lpips` package, network `net`) between the decoded images."""

    def __init__(self, teacher, net: str = "vgg"):
        try:
            import lpips  # noqa: PLC0415 - optional dependency
        except ImportError as e:
            raise click.ClickException(
                "--emb-loss lpips needs the `lpips` package, which needs torchvision: "
                "pip install -e '.[lpips]' (or use --emb-loss perceptual on the digits teachers, or mse)") from e
        super().__init__(teacher)
        self.fn = lpips.LPIPS(net=net, verbose=False).to(teacher.device).eval().requires_grad_(False)
        self.name = f"lpips ({net}) on images decoded by the teacher's VQ decoder"

    def compare(self, img: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return self.fn(img, ref).reshape(-1)                                    # [B]
