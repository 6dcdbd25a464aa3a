"""Throughput of `dd build-dataset` against plain teacher sampling: what the flow map costs.

For each family, one random teacher and one batch of labels; three timings of the same AR loop:

    sample : teacher.sample (multinomial draw at each step)             <- the baseline
    build  : sample_noise + generate_pairs (flow map at each step)      <- what build-dataset runs
    noise  : sample_noise alone (the per-sample CPU generators)

and the ratios build/sample (pairs/s) and noise/build (time). Configs are moderate random ones that
finish in a couple of minutes on a CPU; the real vocabularies and token counts are kept (V = 16384,
C = 8, 256 tokens for LlamaGen; V = 4096, C = 32, 680 tokens over 10 scales for VAR), since they set
the flow map's cost. Scale the transformers up with --llamagen-config / --var-config (a preset such
as GPT-L / d16, or JSON), and use --device cuda for GPU numbers.

    .venv/bin/python tools/bench_build.py                     # both families, CPU
    .venv/bin/python tools/bench_build.py --family var --var-config d16 --device cuda --batch-size 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distilled_decoding.pairs import generate_pairs  # noqa: E402
from distilled_decoding.seeding import sample_labels, sample_noise  # noqa: E402
from distilled_decoding.flowmap import FlowMapConfig  # noqa: E402
from distilled_decoding.teacher_spec import TeacherSpec, parse_config, resolve_sampling  # noqa: E402

# Moderate teachers: small transformers, real token counts and codebooks.
DEFAULTS = {
    "llamagen": (dict(dim=256, n_layer=4, n_head=4, vocab_size=16384, block_size=256, num_classes=1000),
                 dict(codebook_size=16384, codebook_embed_dim=8, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1],
                      z_channels=32, ch=32, num_res_blocks=1)),
    "var": (dict(depth=4, embed_dim=256, num_heads=4, num_classes=1000, V=4096, Cvae=32),
            dict(V=4096, Cvae=32, ch=32, ch_mult=[1, 1], num_res_blocks=1)),
}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Best wall time of `repeats` runs after one warm-up."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_family(family, config, tok_config, args):
    torch.manual_seed(0)
    spec = TeacherSpec(family, config, tokenizer_config=tok_config, dtype=args.dtype)
    t = spec.load(args.device)
    sampling = resolve_sampling(t)
    fm = FlowMapConfig(nfe=args.nfe)
    B = args.batch_size
    idx = torch.arange(B)
    labels = sample_labels(0, idx, t.num_classes, balanced=True)
    gen = torch.Generator(device=args.device).manual_seed(0)

    def plain():
        t.sample(labels, sampling, generator=gen)

    def build():
        eps = sample_noise(0, idx, t.num_tokens, t.embed_dim)
        generate_pairs(t, labels, eps, sampling, fm)

    def noise():
        sample_noise(0, idx, t.num_tokens, t.embed_dim)

    ts = timed(plain, args.device, args.repeats)
    tb = timed(build, args.device, args.repeats)
    tn = timed(noise, "cpu", args.repeats)
    n_params = sum(p.numel() for p in t.parameters())
    return {"family": family, "device": args.device, "threads": torch.get_num_threads(), "batch": B,
            "tokens": t.num_tokens, "steps": t.num_steps, "V": t.vocab_size, "C": t.embed_dim,
            "params_M": round(n_params / 1e6, 1), "nfe": args.nfe, "sampling": sampling.to_dict(),
            "sample_pairs_s": round(B / ts, 2), "build_pairs_s": round(B / tb, 2),
            "build_over_sample": round(ts / tb, 3), "noise_ms_per_pair": round(1e3 * tn / B, 4),
            "noise_share_of_build": round(tn / tb, 5)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llamagen", "var", "both"], default="both")
    ap.add_argument("--llamagen-config", default=None, help="preset or JSON (default: a moderate random one)")
    ap.add_argument("--var-config", default=None, help="preset or JSON (default: a moderate random one)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nfe", type=int, default=FlowMapConfig().nfe)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    families = ["llamagen", "var"] if args.family == "both" else [args.family]
    results = []
    for fam in families:
        given = getattr(args, f"{fam}_config")
        # a given config gets the family's own tokenizer (VQ-16 / vae_ch160v4096z32)
        config, tok = DEFAULTS[fam] if given is None else (parse_config(given), None)
        r = bench_family(fam, config, tok, args)
        results.append(r)
        print(f"{fam:9s} B={r['batch']} tokens={r['tokens']} V={r['V']} params={r['params_M']}M on {r['device']} "
              f"({r['threads']} threads): sample {r['sample_pairs_s']:.2f} pairs/s, build {r['build_pairs_s']:.2f} "
              f"pairs/s, build/sample = {r['build_over_sample']:.3f} (noise {r['noise_ms_per_pair']:.3f} ms/pair, "
              f"{100 * r['noise_share_of_build']:.2f}% of build time)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
