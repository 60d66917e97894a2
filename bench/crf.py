"""Benchmark: time and peak memory of one dense CRF (`segmodels.crf.dense_crf`, 10 mean-field iterations).

    .venv/bin/python bench/crf.py [--sizes 375x500x21 2048x1024x19] [--crf-images 100]

Each size (HEIGHTxWIDTHxCLASSES) runs in a fresh process on a photo-like synthetic image (smooth colour
regions plus sensor noise) with softmax probabilities of random logits. The peak is that process's
`ru_maxrss` less its resident size before the inputs were made, so it counts the float32 probabilities the
CRF is given as well as pydensecrf's own buffers; `segmodels.crf.crf_memory_bytes` is printed beside it (the
reservation CRF tasks make, calibrated from these runs). The last column estimates a CRF search
(`pipelines.select.ensemble.crf_search`: every coarse grid setting and the finer ones, at most one step
either side of the best per parameter) on --crf-images images of that size, in CPU-hours: one CRF per image
per setting, one core each.
The 2048x1024 run takes over a minute: on a shared machine run it under the heavy-work lock.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def photo_like(height: int, width: int, seed: int = 0):
    """uint8 H,W,3: 24 x 12 blocks of random colour, bilinearly smoothed, plus noise of std 6."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    blocks = torch.from_numpy(rng.uniform(0, 255, (1, 3, 12, 24)).astype(np.float32))
    smooth = F.interpolate(blocks, size=(height, width), mode="bilinear", align_corners=False)[0]
    noisy = smooth.permute(1, 2, 0).numpy() + rng.normal(0, 6, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def measure(height: int, width: int, classes: int) -> dict:
    """In this process: one dense CRF; seconds and peak RSS over the RSS before its inputs existed."""
    import numpy as np

    from segmodels.crf import dense_crf

    image = photo_like(height, width)
    before = rss_bytes()
    logits = np.random.default_rng(1).normal(0, 2, (classes, height, width)).astype(np.float32)
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    del logits
    start = time.perf_counter()
    dense_crf(image, probs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_bytes": peak - before}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["375x500x21", "2048x1024x19"])
    parser.add_argument("--crf-images", type=int, default=100)
    parser.add_argument("--crf-grid", default="deeplab", help="deeplab (default) or small")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*map(int, args.child.split("x")))))
        return

    from pipelines.select.ensemble.crf_search import coarse_settings, crf_grid
    from segmodels.crf import crf_memory_bytes

    settings = len(coarse_settings(args.crf_grid)) + 2 * len(crf_grid(args.crf_grid).fine_step)
    print(f"CRF search: {settings} settings x {args.crf_images} images")
    print(f"{'H x W x C':>16} {'seconds':>8} {'peak GB':>8} {'reserved GB':>12} {'search CPU-h':>13}")
    for size in args.sizes:
        height, width, classes = map(int, size.split("x"))
        out = subprocess.run(
            [sys.executable, __file__, "--child", size], check=True, capture_output=True, text=True, cwd=ROOT
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        search_hours = result["seconds"] * args.crf_images * settings / 3600
        print(
            f"{size:>16} {result['seconds']:8.1f} {result['peak_bytes'] / 1e9:8.2f} "
            f"{crf_memory_bytes(height, width, classes) / 1e9:12.2f} {search_hours:13.1f}"
        )


if __name__ == "__main__":
    main()
