"""Benchmark: `segpipe predict` against the loop a user would write, on the same folder of JPEG images.

    .venv/bin/python bench/predict.py [--images 500] [--size 375 500] [--width 0.5] [--batch-size 4]

Ray: $RAY_ADDRESS, else the running cluster, else a new local one (RAY_ADDRESS=local forces a new one).

The model is DeepLab-LargeFOV at `--width` (random weights: speed does not depend on them). The loop runs
in one process: read a file, decode it, forward it (torch's default intra-op threads), encode the palette
PNG, write it. `segpipe predict` runs the same steps as a Ray Data pipeline (decode and write tasks, an
actor pool for the model) into --format png. Both write the same masks (checked on a few images). Prints
images/s for each and the speed-up; on a GPU machine also the per-GPU images/s (`--num-gpus 1`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from evaluate import model_folder, smooth_image  # bench/evaluate.py
from PIL import Image

from pipelines.images import decode_image
from pipelines.inference.core import InferenceSettings, predict_batch
from pipelines.inference.predict import PredictConfig, predict
from pipelines.report import format_table, palette_png
from pipelines.runtime import ensure_ray
from segmodels.artifact import load_model_dir


def plain_loop(folder: Path, src: Path, out: Path) -> tuple[float, dict[str, float]]:
    """Seconds for the one-process loop over every image in `src`, and its seconds per stage."""
    model = load_model_dir(folder, device="cuda" if torch.cuda.is_available() else "cpu")
    stages = {"read_decode": 0.0, "forward_argmax": 0.0, "encode_write": 0.0}
    started = time.perf_counter()
    for path in sorted(src.iterdir()):
        t0 = time.perf_counter()
        image = decode_image(path.read_bytes())
        t1 = time.perf_counter()
        mask = predict_batch(model, image[None], InferenceSettings()).argmax(1)[0].byte().cpu().numpy()
        t2 = time.perf_counter()
        (out / f"{path.stem}.png").write_bytes(palette_png(mask, model.spec.palette))
        stages["read_decode"] += t1 - t0
        stages["forward_argmax"] += t2 - t1
        stages["encode_write"] += time.perf_counter() - t2
    return time.perf_counter() - started, stages


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=500, help="images (default: 500, as the issue)")
    parser.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    parser.add_argument(
        "--width", type=float, default=0.5, help="DeepLab-LargeFOV channel width (default: 0.5)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=0, help="model actors (default: segpipe's)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model actor")
    parser.add_argument("--json-out")
    parser.add_argument("--loop-only", action="store_true", help="only the loop and its per-stage times")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="segpipe-bench-") as tmp:
        tmp = Path(tmp)
        folder = model_folder(tmp / "model", "deeplab_largefov", args.width)
        src = tmp / "images"
        src.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray(smooth_image(rng, *args.size)).save(src / f"{i:05d}.jpg", quality=90)
        (tmp / "loop").mkdir()
        loop_s, stages = plain_loop(folder, src, tmp / "loop")
        per_image = {k: round(1000 * v / args.images, 1) for k, v in stages.items()}
        print(
            f"one-process loop: {loop_s:.1f} s for {args.images} images; ms per image {per_image}", flush=True
        )
        if args.loop_only:
            return
        ensure_ray()
        cfg = PredictConfig(
            model_uri=str(folder),
            input=str(src),
            out=str(tmp / "ray"),
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            num_gpus=args.num_gpus,
        )
        result = predict(cfg)
        for name in sorted(os.listdir(tmp / "loop"))[:5]:
            same = np.array_equal(
                np.asarray(Image.open(tmp / "loop" / name)), np.asarray(Image.open(tmp / "ray" / name))
            )
            if not same:
                raise SystemExit(f"{name}: segpipe predict and the loop disagree")
    rows = [
        ["one-process loop", args.images / loop_s, loop_s / args.images],
        ["segpipe predict", result["images_per_s"], result["seconds"] / args.images],
    ]
    print(
        f"{args.images} images {args.size[0]}x{args.size[1]}, DeepLab-LargeFOV width {args.width}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), GPUs per actor {args.num_gpus}"
    )
    print(format_table(["pipeline", "images/s", "s/image"], rows))
    speedup = result["images_per_s"] * loop_s / args.images
    print(f"speed-up: {speedup:.2f}x (target >= 1.7x on 2 cores)")
    if args.json_out:
        payload = {
            "args": vars(args),
            "loop_s": loop_s,
            "loop_ms_per_image": per_image,
            "predict": result,
            "speedup": speedup,
        }
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
