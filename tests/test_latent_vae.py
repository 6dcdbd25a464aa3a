"""The latent VAE (diffusers AutoencoderKL) on a tiny random config: directory and file loading,
strictness, the 0.18215-style latent scale, and a DiT teacher decoding through it."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason='the DiT extra: pip install "distilled-decoding[dit]"')

from teachers import load_teacher  # noqa: E402
from teachers.checkpoint import CheckpointMismatchError  # noqa: E402
from teachers.latent_vae import LatentVAE, autoencoder_kl_class, load_vae  # noqa: E402

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                block_out_channels=[8, 16], act_fn="silu", sample_size=16,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                scaling_factor=0.18215)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    vae = autoencoder_kl_class()(**TINY_VAE).eval()
    with torch.no_grad():      # diffusers zero-initialises nothing that matters here, but make decode non-trivial
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def test_directory_and_file_load_agree(ref, tmp_path):
    ref.save_pretrained(tmp_path / "vae")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode(z / 0.18215).sample.add(1).mul(0.5).clamp(0, 1)
    from_dir = load_vae(tmp_path / "vae")
    sd = ref.state_dict()
    # a file with the pre-0.14 attention names (as some released .bin files): renamed on load
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in sd.items()}
    assert any(".query." in k for k in old)
    torch.save(old, tmp_path / "vae.pt")
    from_file = load_vae(tmp_path / "vae.pt", config=TINY_VAE)
    for vae in (from_dir, from_file):
        assert isinstance(vae, LatentVAE) and vae.scaling_factor == 0.18215
        img = vae.decode(z)
        assert img.shape == (2, 3, 16, 16) and 0 <= img.min() and img.max() <= 1
        torch.testing.assert_close(img, want, rtol=0, atol=1e-5)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mean = ref.encode(x * 2 - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(from_file.encode(x), mean, rtol=0, atol=1e-5)
    drawn = from_file.encode(x, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == mean.shape and not torch.equal(drawn, mean)
    bad = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"decoder\.conv_out\.bias"):
        load_vae(bad, config=TINY_VAE)
    with pytest.raises(ValueError, match="config.json"):
        load_vae(tmp_path / "vae", config=TINY_VAE)


def test_dit_teacher_decodes_through_vae(ref, tmp_path):
    ref.save_pretrained(tmp_path / "vae")
    t = load_teacher("dit", dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10),
                     vae=tmp_path / "vae", seed=0)
    z = t.sample(torch.tensor([1, 2]), steps=2, generator=torch.Generator().manual_seed(0))
    img = t.decode(z)
    torch.testing.assert_close(img, t.vae.decode(z))
    assert img.shape == (2, 3, 16, 16) and t.describe()["vae"]["scaling_factor"] == 0.18215
    assert t.encode(img).shape == (2, 4, 8, 8)
