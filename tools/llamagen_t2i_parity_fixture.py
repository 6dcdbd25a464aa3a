"""Regenerate tests/fixtures/llamagen_t2i_official_tiny.pt and tests/manifests/llamagen_t2i_official.json
from the *official* text-to-image LlamaGen code.

    python tools/llamagen_t2i_parity_fixture.py --official /path/to/FoundationVision/LlamaGen

The checkout (commit ce98ec4) is imported as is: autoregressive/models/gpt.py (`Transformer`,
model_type "t2i"), autoregressive/models/generate.py (`generate`, whose module-level `sample` is
wrapped to record each step's probabilities) and tokenizer/tokenizer_image/vq_model.py (the manifest
of the t2i tokenizer). It needs only torch. CPU, fp32.

Stored: the tiny config (official ModelArgs names), its random weights in the official key layout,
the inputs (T5-like caption features [B, 120, D] with right-padded T5 masks, as T5Embedder returns
them, and the same after sample_t2i.py's left-padding), and the official outputs:
- teacher-forced logits of the training forward (train_t2i.py's call, with dataset/t2i.py's attention
  mask; dropout and caption dropout off) for the caption, for the null caption under the same mask,
  and for the right-padded layout;
- `generate` runs: greedy with CFG (left- and right-padded), seeded multinomial with CFG + top-k +
  top-p + temperature, seeded without CFG; each run's tokens and per-step probabilities;
- the tokenizer (the official VQModel at a tiny config, 8x8 images <-> 16 tokens): encode indices of
  random images and `decode_code` of the greedy run's tokens. Its weights are not stored: they are
  drawn from the key names by `tests/test_llamagen_t2i.py: vq_weights`, which the test re-uses.
The left-padding and the training mask are inside the official scripts' main / dataset classes, so
they are restated here step by step (sample_t2i.py L92-106, dataset/t2i.py L114-128).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(dim=32, n_layer=2, n_head=2, multiple_of=16, vocab_size=64, block_size=16, caption_dim=16,
            cls_token_num=120, model_type="t2i", class_dropout_prob=0.1, token_dropout_p=0.0,
            attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, drop_path_rate=0.0)
VALID = [5, 120, 17]            # T5 token counts of the three captions (one fills all 120 slots)
RUNS = {                        # name: (sampling kwargs of generate, seed or None, left-padded)
    "greedy_cfg": (dict(cfg_scale=4.0, temperature=1.0, top_k=0, top_p=1.0, sample_logits=False), None, True),
    "greedy_cfg_right": (dict(cfg_scale=4.0, temperature=1.0, top_k=0, top_p=1.0, sample_logits=False), None, False),
    "seeded_cfg": (dict(cfg_scale=2.0, temperature=0.9, top_k=20, top_p=0.9, sample_logits=True), 7, True),
    "seeded_nocfg": (dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, sample_logits=True), 8, True),
}


def _test_module():
    path = os.path.join(ROOT, "tests", "test_llamagen_t2i.py")
    spec = importlib.util.spec_from_file_location("test_llamagen_t2i", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(mod)
    return mod


def randomise(model: torch.nn.Module, seed: int) -> dict:
    """Every tensor of the state dict (the null caption buffer too) redrawn so that logits are far
    from uniform: linear maps of unit gain, embeddings N(0, 0.5), norm weights near 1."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("norm.weight"):
            out[k] = 1 + 0.1 * r
        elif k in ("tok_embeddings.weight", "cls_embedding.uncond_embedding"):
            out[k] = 0.5 * r
        else:
            out[k] = 1.5 * r / v.shape[-1] ** 0.5
    model.load_state_dict(out, strict=True)
    return out


def inputs(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, L, D = len(VALID), TINY["cls_token_num"], TINY["caption_dim"]
    feats = torch.randn(B, L, D, generator=g)                   # T5 also outputs at pad positions
    t5_mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(VALID):
        t5_mask[b, :n] = 1
    # sample_t2i.py's left-padding: roll each row's valid tokens to the end, flip the mask
    left = torch.stack([torch.cat([f[int(m.sum()):], f[:int(m.sum())]]) for f, m in zip(feats, t5_mask)])
    left_mask = torch.flip(t5_mask, dims=[-1])
    tokens = torch.randint(0, TINY["vocab_size"], (B, TINY["block_size"]), generator=g)
    return {"t5_features": feats, "t5_mask": t5_mask, "left_features": left, "left_mask": left_mask,
            "tokens": tokens}


def train_mask(emb_mask: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """dataset/t2i.py's attention mask [B, 1, S, S] for caption masks [B, T] (S = T + block_size)."""
    out = []
    for m in emb_mask:
        a = torch.tril(torch.ones(S, S))
        a[:, :T] = a[:, :T] * m.float().unsqueeze(0)
        eye = torch.eye(S, S)
        out.append((a * (1 - eye) + eye).to(torch.bool))
    return torch.stack(out)[:, None]


def manifest(gpt_models, vq_models) -> dict:
    out = {"_source": "State-dict key names and shapes of the official text-to-image LlamaGen modules "
                      "(FoundationVision/LlamaGen @ce98ec4: autoregressive/models/gpt.py "
                      "GPT_models['GPT-XL'](block_size=256, cls_token_num=120, model_type='t2i') as "
                      "sample_t2i.py builds it for t2i_XL_stage1_256.pt (block_size 1024 for the 512-px "
                      "stage-2 file gives the same keys); tokenizer/tokenizer_image/vq_model.py "
                      "VQ_models['VQ-16'](codebook_size=16384, codebook_embed_dim=8) for vq_ds16_t2i.pt), "
                      "built on the meta device by tools/llamagen_t2i_parity_fixture.py. num_elements counts "
                      "every tensor (the persistent buffer cls_embedding.uncond_embedding included)."}
    # Transformer.__init__ reads its drop-path rates with .item(), impossible on meta: that one
    # linspace is made on the CPU while the modules are built on the meta device.
    linspace = torch.linspace
    torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
    try:
        with torch.device("meta"):
            gpt = gpt_models["GPT-XL"](block_size=256, cls_token_num=120, model_type="t2i")
            vq = vq_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8)
    finally:
        torch.linspace = linspace
    for name, m, ign in (("GPT-XL-t2i", gpt, []), ("VQ-16-t2i", vq, ["quantize.codebook_used"])):
        sd = m.state_dict()
        out[name] = {"num_keys": len(sd), "num_elements": sum(v.numel() for v in sd.values()),
                     "ignorable": ign, "keys": {k: list(v.shape) for k, v in sd.items()}}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="checkout of FoundationVision/LlamaGen")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "llamagen_t2i_official_tiny.pt"))
    ap.add_argument("--manifest", default=os.path.join(ROOT, "tests", "manifests", "llamagen_t2i_official.json"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.official))
    import autoregressive.models.generate as gen
    from autoregressive.models.gpt import ModelArgs, Transformer, GPT_models
    from tokenizer.tokenizer_image.vq_model import VQ_models, VQModel
    from tokenizer.tokenizer_image.vq_model import ModelArgs as VQArgs
    T_ = _test_module()
    torch.backends.cuda.matmul.allow_tf32 = False

    model = Transformer(ModelArgs(**TINY))
    sd = randomise(model, 1)
    inp = inputs()
    T, n = TINY["cls_token_num"], TINY["block_size"]
    z = inp["tokens"]
    out = {"config": TINY, "state_dict": {k: v.clone() for k, v in sd.items()}, **inp}

    with torch.no_grad():
        # train_t2i.py: model(cond_idx=c, idx=z[:, :-1], targets=z, mask=attn_mask[:, :, :-1, :-1])
        model.train()
        model.cls_embedding.uncond_prob = 0.0          # no caption dropout in the recorded forward
        null = torch.zeros_like(inp["left_features"]) + model.cls_embedding.uncond_embedding
        for tag, c, m in (("tf_logits", inp["left_features"] * inp["left_mask"][..., None], inp["left_mask"]),
                          ("tf_logits_null", null, inp["left_mask"]),
                          ("tf_logits_right", inp["t5_features"] * inp["t5_mask"][..., None], inp["t5_mask"])):
            mask = train_mask(m, T, T + n)[:, :, :-1, :-1]
            logits, _ = model(cond_idx=c, idx=z[:, :-1], targets=z, mask=mask)
            out[tag] = logits.clone()                   # [B, n, V]
        model.eval()

        orig = gen.sample
        for name, (kw, seed, left) in RUNS.items():
            probs = []

            def recording(logits, **skw):
                idx, p = orig(logits, **skw)
                probs.append(p.clone())
                return idx, p

            gen.sample = recording
            feats, mask = ((inp["left_features"], inp["left_mask"]) if left
                           else (inp["t5_features"], inp["t5_mask"]))
            c = feats * mask[:, :, None]                # sample_t2i.py: c_indices, c_emb_masks
            if seed is not None:
                torch.manual_seed(seed)
            tokens = gen.generate(model, c, n, mask, **kw)
            gen.sample = orig
            out[f"{name}_tokens"] = tokens.long().clone()            # [B, n]
            out[f"{name}_probs"] = torch.stack(probs, dim=1)         # [B, n, V]
        vq = VQModel(VQArgs(**T_.OFFICIAL_VQ)).eval()
        sd = vq.state_dict()
        sd.update(T_.vq_weights({k: v.shape for k, v in sd.items() if k != "quantize.codebook_used"}))
        vq.load_state_dict(sd, strict=True)
        images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
        _, _, info = vq.encode(images)
        out["vq_images"] = images                                    # [2, 3, 8, 8] in [-1, 1]
        out["vq_encode_idx"] = info[2].view(2, -1).clone()           # [2, 16]
        g = out["greedy_cfg_tokens"]
        out["vq_decode"] = vq.decode_code(g, [g.shape[0], T_.OFFICIAL_VQ["codebook_embed_dim"], 4, 4]).clone()
    out["runs"] = {k: {**kw, "seed": seed, "left_padded": left} for k, (kw, seed, left) in RUNS.items()}
    out["_source"] = ("FoundationVision/LlamaGen @ce98ec4 (official t2i code, CPU fp32), "
                      "tools/llamagen_t2i_parity_fixture.py")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    torch.save(out, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")
    man = manifest(GPT_models, VQ_models)
    with open(args.manifest, "w") as f:
        json.dump(man, f, indent=1)
        f.write("\n")
    print(f"wrote {args.manifest}: " + ", ".join(f"{k} {v['num_elements']:,}" for k, v in man.items() if k[0] != "_"))


if __name__ == "__main__":
    main()
