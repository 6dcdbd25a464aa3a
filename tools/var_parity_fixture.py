"""Regenerate tests/fixtures/var_official_tiny.pt: outputs of the *official* VAR code on a tiny model.

    python tools/var_parity_fixture.py --official /path/to/FoundationVision/VAR [--out tests/fixtures/var_official_tiny.pt]

The official checkout (commit 78b9539) is imported as is; its repo-local `dist` module and the
`huggingface_hub` import are stubbed when missing, flash-attn / xformers must not be installed
(they change the numerics). Weights are not stored: every tensor is drawn from its key name by
`tests/test_var.py: fill_state`, so the test rebuilds the same weights for our re-implementation.
Run on CPU in fp32.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_module():
    spec = importlib.util.spec_from_file_location("test_var", os.path.join(ROOT, "tests", "test_var.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(mod)
    return mod


def _import_official(path: str):
    sys.path.insert(0, os.path.abspath(path))
    if importlib.util.find_spec("dist") is None:
        dist = types.ModuleType("dist")
        dist.get_device = lambda: "cpu"
        dist.initialized = lambda: False
        sys.modules["dist"] = dist
    if importlib.util.find_spec("huggingface_hub") is None:
        hf = types.ModuleType("huggingface_hub")
        hf.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hf
    import models.var as var_mod
    from models.var import VAR
    from models.vqvae import VQVAE
    return var_mod, VAR, VQVAE


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="checkout of FoundationVision/VAR")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "var_official_tiny.pt"))
    args = ap.parse_args()
    T = _test_module()
    var_mod, VAR, VQVAE = _import_official(args.official)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    oc = T.OFFICIAL_TINY
    vae = VQVAE(vocab_size=oc["V"], z_channels=oc["Cvae"], ch=oc["ch"], test_mode=True,
                share_quant_resi=4, v_patch_nums=oc["patch_nums"])
    var = VAR(vae_local=vae, num_classes=oc["num_classes"], depth=oc["depth"], embed_dim=oc["embed_dim"],
              num_heads=oc["num_heads"], norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.0,
              attn_l2_norm=True, patch_nums=oc["patch_nums"], flash_if_available=False, fused_if_available=False)
    for m, seed in ((var, T.VAR_SEED), (vae, T.VAE_SEED)):
        sd = m.state_dict()
        bufs = {n for n, _ in m.named_buffers()}
        sd.update(T.fill_state({k: v.shape for k, v in sd.items() if k not in bufs}, seed))
        m.load_state_dict(sd, strict=True)
    # the same tiny VAR with shared AdaLN (the d36 layout), for teacher-forced logits only
    saln = VAR(vae_local=vae, num_classes=oc["num_classes"], depth=oc["depth"], embed_dim=oc["embed_dim"],
               num_heads=oc["num_heads"], norm_eps=1e-6, shared_aln=True, cond_drop_rate=0.0,
               attn_l2_norm=True, patch_nums=oc["patch_nums"], flash_if_available=False, fused_if_available=False)
    sd = saln.state_dict()
    bufs = {n for n, _ in saln.named_buffers()}
    sd.update(T.fill_state({k: v.shape for k, v in sd.items() if k not in bufs}, T.SALN_SEED))
    saln.load_state_dict(sd, strict=True)
    var.eval(), vae.eval(), saln.eval()

    inp = T.official_inputs()
    labels, tokens = inp["labels"], inp["tokens"]
    B = labels.shape[0]
    pns = oc["patch_nums"]
    offs = [0]
    for pn in pns:
        offs.append(offs[-1] + pn * pn)
    ms = [tokens[:, offs[s]:offs[s + 1]] for s in range(len(pns))]
    rows = T.FIXTURE_ROWS
    out = {}
    with torch.no_grad():
        x = vae.quantize.idxBl_to_var_input(ms)
        out["tf_logits"] = var(labels, x)[:, rows].clone()                         # [B, r, V]
        out["saln_tf_logits"] = saln(labels, x)[:, rows].clone()
        ms_h = [vae.quantize.embedding(i).transpose(1, 2).reshape(B, oc["Cvae"], pn, pn) for i, pn in zip(ms, pns)]
        out["fhat"] = vae.quantize.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=True).clone()
        img = vae.idxBl_to_img(ms, same_shape=True, last_one=True).add(1).mul(0.5)
        out["image_px"] = img.flatten()[T.image_pixels(img.numel())].clone()
        emb = inp["embeddings"]                                                     # [B, L, Cvae]
        ms_e = [emb[:, offs[s]:offs[s + 1]].transpose(1, 2).reshape(B, oc["Cvae"], pn, pn) for s, pn in enumerate(pns)]
        out["fhat_from_embeddings"] = vae.quantize.embed_to_fhat(ms_e, all_to_max_scale=True, last_one=True).clone()
        x_img = inp["images"].add(inp["images"]).add_(-1)
        out["encode_idx"] = torch.cat(vae.img_to_idxBl(x_img), dim=1)

        # The generation loop's final f_hat is recorded instead of decoded (the decoder is checked above).
        fhats = []

        def record_fhat(f_hat):
            fhats.append(f_hat.clone())
            return torch.zeros(B, 3, 1, 1)

        vae.fhat_to_img = record_fhat
        orig = var_mod.sample_with_top_k_top_p_
        sp = T.FIXTURE_SAMPLING

        # The KV-cached CFG loop with the tokens forced to `tokens`: record the raw guided logits and
        # the filtered logits (after top-k / top-p) at each scale.
        rec = {"guided": [], "filtered": []}

        def forced(logits_BlV, rng=None, top_k=0, top_p=0.0, num_samples=1):
            rec["guided"].append(logits_BlV.clone())
            orig(logits_BlV, rng=rng, top_k=top_k, top_p=top_p, num_samples=1)
            rec["filtered"].append(logits_BlV.clone())
            return ms[len(rec["guided"]) - 1].unsqueeze(-1)

        var_mod.sample_with_top_k_top_p_ = forced
        var.autoregressive_infer_cfg(B, labels, cfg=sp["cfg"], top_k=sp["top_k"], top_p=sp["top_p"])
        out["cfg_fhat"] = fhats.pop()
        out["cfg_guided"] = torch.cat(rec["guided"], dim=1)[:, rows].clone()
        out["cfg_filtered"] = torch.cat(rec["filtered"], dim=1)[:, rows].clone()

        # Genuinely sampled runs with the official CPU generator (g_seed), recording the tokens.
        drawn = []

        def recording(logits_BlV, rng=None, top_k=0, top_p=0.0, num_samples=1):
            idx = orig(logits_BlV, rng=rng, top_k=top_k, top_p=top_p, num_samples=num_samples)
            drawn.append(idx[:, :, 0].clone())
            return idx

        var_mod.sample_with_top_k_top_p_ = recording
        for smooth in (False, True):
            drawn.clear()
            var.autoregressive_infer_cfg(B, labels, g_seed=sp["g_seed"], cfg=sp["cfg"], top_k=sp["top_k"],
                                         top_p=sp["top_p"], more_smooth=smooth)
            tag = "smooth" if smooth else "plain"
            out[f"sampled_tokens_{tag}"] = torch.cat(drawn, dim=1).clone()
            out[f"sampled_fhat_{tag}"] = fhats.pop()
        var_mod.sample_with_top_k_top_p_ = orig

    out["_source"] = "FoundationVision/VAR @78b9539 (official code, CPU fp32), tools/var_parity_fixture.py"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    torch.save(out, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items() if torch.is_tensor(v)))


if __name__ == "__main__":
    main()
