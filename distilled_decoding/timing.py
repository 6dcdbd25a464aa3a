"""Wall-clock timing of sampling (model vs decoder time), as `dd sample` reports it."""
from __future__ import annotations

import time

import torch


class Stopwatch:
    """Accumulates wall time of `with sw:` blocks, synchronising CUDA before reading the clock."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __enter__(self):
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds += time.perf_counter() - self._t0
        return False


def timing_record(num: int, model_s: float, decode_s: float, total_s: float, **extra) -> dict:
    return {"num_samples": int(num), "model_seconds": model_s, "decode_seconds": decode_s,
            "total_seconds": total_s,
            "images_per_second": num / model_s if model_s > 0 else float("inf"),
            "seconds_per_image": model_s / max(num, 1),
            "images_per_second_with_decode": num / (model_s + decode_s) if model_s + decode_s > 0 else float("inf"),
            **extra}


def timing_line(r: dict) -> str:
    return (f"timing: {r['num_samples']} images, model {r['model_seconds']:.3f}s -> "
            f"{r['images_per_second']:.2f} images/s, {r['seconds_per_image'] * 1e3:.2f} ms/image "
            f"(+ decode {r['decode_seconds']:.3f}s; total {r['total_seconds']:.2f}s; "
            f"{r['mode']}, batch {r['batch_size']}, {r['device']})")
