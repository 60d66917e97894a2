"""Benchmark: peak memory and time of `segmodels.inference` on one Cityscapes-size image, before and after.

    .venv/bin/python bench/inference_memory.py [--before REV] [--size 1024 2048] [--scales 0.5 1.0 1.5]

A trivial network (one 1x1 convolution to 19 classes) on one 2048x1024 image, so what is measured is the
inference buffers, not the network: whole image, sliding window (crop 713, stride 476, PSPNet's) and
--scales x flip with that sliding window. Each run is a fresh process on CPU with freed buffers returned to
the OS at once (MALLOC_MMAP_THRESHOLD_); the peak is its VmHWM, reset just before the call, less its RSS
then, in MB and in full-resolution 19-class float32 maps (the result itself is one). "before" is
segmodels/inference.py at git revision --before (default: the last one that kept full-resolution maps per
scale and flip), "after" the working tree's. Takes about a minute on 2 cores: on a shared machine run it
under the heavy-work lock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "c5728d1"  # full-resolution maps per scale and flip, a count map and a quotient for sliding
CLASSES, CROP, STRIDE = 19, 713, 476

CHILD = """
import importlib.util, json, sys, time

import torch
from torch import nn

spec = importlib.util.spec_from_file_location("inference_under_test", sys.argv[1])
inference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inference)
height, width, classes = map(int, sys.argv[2:5])
kwargs = json.loads(sys.argv[5])


def status_bytes(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


torch.manual_seed(0)
model = nn.Conv2d(3, classes, 1)
inference.predict_tta(model, torch.randn(1, 3, 800, 800), **kwargs)  # lazy initialisation, kernels paged in
image = torch.randn(1, 3, height, width)
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")
before = status_bytes("VmRSS")
start = time.perf_counter()
probs = inference.predict_tta(model, image, **kwargs)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_bytes": status_bytes("VmHWM") - before, "map_bytes": probs.nbytes}))
"""


def run(module: Path, height: int, width: int, kwargs: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(module),
        str(height),
        str(width),
        str(CLASSES),
        json.dumps(kwargs),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", default=BEFORE, help=f"git revision to compare with (default: {BEFORE})")
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    args = parser.parse_args()
    old = subprocess.run(
        ["git", "show", f"{args.before}:segmodels/inference.py"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    slide = {"mode": "slide", "crop": CROP, "stride": STRIDE}
    configs = {
        "whole": {},
        f"sliding {CROP}/{STRIDE}": slide,
        f"{len(args.scales)} scales x flip, sliding": {**slide, "scales": args.scales, "flip": True},
    }
    height, width = args.size
    print(f"{width}x{height} image, {CLASSES} classes, 1x1-conv network, torch on {os.cpu_count()} CPUs")
    print(f"{'':>28} {'before MB':>10} {'maps':>5} {'s':>6} | {'after MB':>9} {'maps':>5} {'s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        before_module = Path(tmp) / "inference_before.py"
        before_module.write_text(old)
        for name, kwargs in configs.items():
            row = [
                run(m, height, width, kwargs) for m in (before_module, ROOT / "segmodels" / "inference.py")
            ]
            cells = [
                f"{r['peak_bytes'] / 2**20:>{w}.0f} {r['peak_bytes'] / r['map_bytes']:5.2f} {r['seconds']:6.1f}"
                for r, w in zip(row, (10, 9), strict=True)
            ]
            print(f"{name:>28} {cells[0]} | {cells[1]}")


if __name__ == "__main__":
    main()
