"""Regenerate tests/fixtures/dd_official_tiny.pt: outputs of the *released* DD students on tiny models.

    python tools/dd_parity_fixture.py --official /path/to/microsoft/distilled_decoding [--out ...]

The checkout (commit 3b95d33) is imported as is: LlamaGen/autoregressive/models/dd.py (`DDTransformer`)
and VAR/models/dd.py (`DD_Model`, built by `build_vae_dd`'s recipe). Modules the models do not use at
run time (torchvision, huggingface_hub, VAR's repo-local `dist` when missing) are stubbed;
flash-attn / xformers must not be installed. CPU, fp32.

Stored per family: the tiny config, the random weights in the released key layout (buffers
included, as a released file may carry them), the inputs (labels, x, the authors' t = paper t − 1)
and the released forward's outputs (logits, emb). tests/test_student.py nests the weights as the
release does ("ema" / trainer.ema_parameters), loads them with `load_official` and compares.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMAGEN_TINY = dict(dim=32, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10, multiple_of=16)
VAR_TINY = dict(depth=2, embed_dim=32, num_heads=2, num_classes=10, patch_nums=[1, 2, 3], V=64, Cvae=4)
CODEBOOK_DIM = 4
B = 4


def _stub(name: str, **attrs) -> None:
    if name not in sys.modules:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m


def randomise(model: torch.nn.Module, seed: int) -> dict:
    """Every parameter redrawn (unit-gain linear maps, norm weights near 1, AdaLN gammas of order 1)
    so that no path of the forward is near-identity; returns the full state dict (buffers too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("scale_mul_1H11"):
                p.copy_(math.log(4.0) + 0.3 * r)
            elif p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * r)
            elif p.ndim >= 2 and "embed" not in name and "pos_" not in name and "scale_shift" not in name:
                p.copy_(r / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.5 * r)
    return {k: v.clone() for k, v in model.state_dict().items()}


def llamagen(official: str) -> dict:
    sys.path.insert(0, os.path.join(official, "LlamaGen"))
    from autoregressive.models.dd import DDTransformer, ModelArgs
    model = DDTransformer(ModelArgs(**LLAMAGEN_TINY, codebook_dim=CODEBOOK_DIM)).eval()
    sd = randomise(model, 1)
    n = LLAMAGEN_TINY["block_size"]
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, LLAMAGEN_TINY["num_classes"], (B,), generator=g)
    t_code = torch.tensor([0, 3, 7, n])                       # n: every token data
    x = torch.randn(B, n, CODEBOOK_DIM, generator=g)
    with torch.no_grad():
        emb, logits = model(x, labels, t_code)
    return {"config": LLAMAGEN_TINY, "state_dict": sd, "labels": labels, "x": x, "t_code": t_code,
            "logits": logits.clone(), "emb": emb.clone()}


def var(official: str) -> dict:
    sys.path.insert(0, os.path.join(official, "VAR"))
    _stub("torchvision")
    _stub("torchvision.utils", save_image=None)
    sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
    _stub("huggingface_hub", PyTorchModelHubMixin=type("PyTorchModelHubMixin", (), {}))
    from models.dd import DD_Model
    from models.vqvae import VQVAE
    c = VAR_TINY
    vae = VQVAE(vocab_size=c["V"], z_channels=c["Cvae"], ch=32, test_mode=True, share_quant_resi=4,
                v_patch_nums=tuple(c["patch_nums"]))
    model = DD_Model(vae_local=vae, num_classes=c["num_classes"], depth=c["depth"], embed_dim=c["embed_dim"],
                     num_heads=c["num_heads"], norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1,
                     attn_l2_norm=True, patch_nums=tuple(c["patch_nums"]), flash_if_available=False,
                     fused_if_available=False, n_d_embed_enable=True, layerwise_n_d_embed=True).eval()
    sd = randomise(model, 2)
    n = sum(p * p for p in c["patch_nums"])
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, c["num_classes"], (B,), generator=g)
    t_code = torch.tensor([0, 1, 2, len(c["patch_nums"])])   # the last: every scale data
    x = torch.randn(B, n, c["Cvae"], generator=g)
    with torch.no_grad():
        emb, logits = model(labels, x, t_code)
    return {"config": VAR_TINY, "state_dict": sd, "labels": labels, "x": x, "t_code": t_code,
            "logits": logits.clone(), "emb": emb.clone()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="checkout of microsoft/distilled_decoding")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "dd_official_tiny.pt"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {"llamagen": llamagen(args.official), "var": var(args.official),
           "codebook_dim": CODEBOOK_DIM,
           "_source": "microsoft/distilled_decoding @3b95d33 (released DD students, CPU fp32), "
                      "tools/dd_parity_fixture.py"}
    torch.save(out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
