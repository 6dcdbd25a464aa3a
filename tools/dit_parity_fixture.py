"""Regenerate tests/fixtures/dit_official_tiny.pt and tests/manifests/dit_official.json from the
*official* DiT code (facebookresearch/DiT @ed81ce2: models.py, diffusion/).

    pip install --no-deps --target /tmp/timm_site timm        # timm is never installed in the venv
    python tools/dit_parity_fixture.py --official /path/to/DiT --timm-site /tmp/timm_site

DiT's models.py imports timm (PatchEmbed, Attention, Mlp), and timm imports torchvision, which does
not import here: an import-time stand-in answers every `torchvision.*` name (timm's data transforms
only need the names to exist; none of them run). The official modules then run unchanged, on CPU in
fp32, with timm's fused (SDPA) attention.

Fixture: a tiny DiT (`tests/test_dit.py: OFFICIAL_TINY`) with every parameter redrawn from its key
name by `tests/test_dit.py: fill_state` (the official init zeroes adaLN and the head, which would
make every output 0); `pos_embed` keeps the official sin-cos table. Recorded: forward,
forward_with_cfg, and DDIM-5 loops (`create_diffusion("5")`, clip_denoised=False) with and without
CFG from fixed noise, every step's sample and x̂0. Weights are not stored.
Manifest: key names and shapes of DiT-XL/2 at 256 and 512 px, built on the meta device.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_module():
    spec = importlib.util.spec_from_file_location("test_dit", os.path.join(ROOT, "tests", "test_dit.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(mod)
    return mod


class _NameBag(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return name


class _AnyModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _NameBag(name, (), {"__init__": lambda self, *a, **k: None})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _AnyModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        module.__version__ = "0.0.0"


def _import_official(path: str, timm_site: str):
    if importlib.util.find_spec("torchvision") is None:
        sys.meta_path.insert(0, _TorchvisionStandIn())
    if timm_site:
        sys.path.insert(0, os.path.abspath(timm_site))
    sys.path.insert(0, os.path.abspath(path))
    import models as dit_models
    from diffusion import create_diffusion
    return dit_models, create_diffusion


def _manifest(dit_models) -> dict:
    out = {"_source": "State-dict key names and shapes of the official DiT (facebookresearch/DiT @ed81ce2, "
                      "models.py DiT_models['DiT-XL/2'](input_size=32 | 64)), built on the meta device by "
                      "tools/dit_parity_fixture.py. DiT has no buffers; num_elements counts every tensor "
                      "(pos_embed, a frozen parameter, included)."}
    for px in (256, 512):
        with torch.device("meta"):
            m = dit_models.DiT_models["DiT-XL/2"](input_size=px // 8)
        sd = m.state_dict()
        out[f"DiT-XL/2-{px}"] = {"num_keys": len(sd), "num_elements": sum(v.numel() for v in sd.values()),
                                 "keys": {k: list(v.shape) for k, v in sd.items()}}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="checkout of facebookresearch/DiT")
    ap.add_argument("--timm-site", default="", help="a directory holding timm (pip install --target)")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "dit_official_tiny.pt"))
    ap.add_argument("--manifest", default=os.path.join(ROOT, "tests", "manifests", "dit_official.json"))
    args = ap.parse_args()
    T = _test_module()
    dit_models, create_diffusion = _import_official(args.official, args.timm_site)
    torch.set_num_threads(1)

    oc = T.OFFICIAL_TINY
    model = dit_models.DiT(**oc)
    sd = model.state_dict()
    sd.update(T.fill_state({k: v.shape for k, v in sd.items() if k != "pos_embed"}, T.WEIGHT_SEED))
    model.load_state_dict(sd, strict=True)
    model.eval()

    inp = T.official_inputs()
    x, t, y, z = inp["x"], inp["t"], inp["labels"], inp["noise"]
    B, null = y.shape[0], oc["num_classes"]
    y_cfg = torch.cat([y, torch.full_like(y, null)])
    out = {"pos_embed": model.pos_embed.detach().clone()}
    with torch.no_grad():
        out["forward"] = model(x, t, y).clone()
        out["forward_with_cfg"] = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y_cfg,
                                                         T.CFG_SCALE).clone()
        diffusion = create_diffusion(str(T.DDIM_STEPS))
        out["timestep_map"] = torch.tensor(diffusion.timestep_map)
        for tag, fn, noise, kw in (("cfg", model.forward_with_cfg, torch.cat([z, z]), dict(y=y_cfg, cfg_scale=T.CFG_SCALE)),
                                   ("nocfg", model.forward, z, dict(y=y))):
            steps = list(diffusion.ddim_sample_loop_progressive(fn, list(noise.shape), noise=noise, clip_denoised=False,
                                                                model_kwargs=kw, device="cpu", eta=0.0))
            out[f"ddim_{tag}_samples"] = torch.stack([s["sample"][:B] for s in steps]).clone()
            out[f"ddim_{tag}_x0"] = torch.stack([s["pred_xstart"][:B] for s in steps]).clone()

    out["_source"] = "facebookresearch/DiT @ed81ce2 (official code, CPU fp32, timm fused attention), tools/dit_parity_fixture.py"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    torch.save(out, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items() if torch.is_tensor(v)))
    man = _manifest(dit_models)
    with open(args.manifest, "w") as f:
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in man.items()) + "\n}\n")
    print(f"wrote {args.manifest}: " + ", ".join(f"{k} {v['num_elements']:,}" for k, v in man.items() if k[0] != "_"))


if __name__ == "__main__":
    main()
