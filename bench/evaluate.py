"""Benchmark: inference modes of `segpipe evaluate` on this CPU, and the dense CRF's time per VOC-sized image.

    .venv/bin/python bench/evaluate.py [--model deeplab_largefov] [--width 1.0] [--images 3] [--size 375 500]

Builds the model at the paper's width (random weights: speed does not depend on them), saves it as a model
folder and times `pipelines.inference.core.predict_image` (one image per forward pass: `segpipe evaluate`
groups same-size images into pixel-budgeted passes) on H x W RGB images in four settings:
- whole image (one forward pass);
- sliding window (crop 321, stride 214: DeepLab's training crop with 1/3 overlap);
- multi-scale + flip TTA (scales 0.75, 1, 1.25, both flips: six passes);
- the dense CRF alone (DeepLab's 10 mean-field iterations, 21 classes), beside DeepLab's ~0.5 s per image.
Prints images/s (and s per image) for each; `--json-out` saves them.
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

import segmodels
from pipelines.inference.core import InferenceSettings, predict_image
from pipelines.report import format_table
from segmodels.artifact import MemberSpec, ModelSpec, load_model_dir, save_model_dir
from segmodels.crf import CRFParams, dense_crf

NUM_CLASSES = 21


def model_folder(folder: Path, arch: str, width: float) -> Path:
    torch.manual_seed(0)
    args = {"width": width} if arch != "pspnet" else {}
    net = segmodels.build_model(arch, NUM_CLASSES, **args).eval()
    spec = ModelSpec.single(
        "bench",
        MemberSpec(arch=arch, num_classes=NUM_CLASSES, weights="member0.safetensors", model_args=args),
        [f"c{i}" for i in range(NUM_CLASSES)],
        [[(37 * i) % 256, (91 * i) % 256, (53 * i) % 256] for i in range(NUM_CLASSES)],
    )
    return save_model_dir(folder, spec, [net.state_dict()])


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like image (smooth regions with edges) so the CRF's bilateral kernel has structure to use."""
    coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    image = np.kron(coarse, np.ones((25, 25, 1), dtype=np.uint8))[:height, :width]
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def time_per_image(fn, images: list[np.ndarray]) -> float:
    """Seconds per image: one warm-up call, then the mean over every image."""
    fn(images[0])
    started = time.perf_counter()
    for image in images:
        fn(image)
    return (time.perf_counter() - started) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deeplab_largefov", choices=segmodels.MODELS)
    parser.add_argument(
        "--width", type=float, default=1.0, help="channel width of VGG/U-Net models (default: 1)"
    )
    parser.add_argument("--images", type=int, default=3, help="timed images per setting (default: 3)")
    parser.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument("--json-out", default="bench/out/evaluate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    height, width = args.size
    images = [smooth_image(rng, height, width) for _ in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model_dir(model_folder(Path(tmp) / "model", args.model, args.width))
    settings = {
        "whole": InferenceSettings(),
        "sliding window 321/214": InferenceSettings(slide=(321, 214)),
        "TTA 0.75,1,1.25 + flip": InferenceSettings(scales=(0.75, 1.0, 1.25), flip=True),
    }
    seconds = {
        name: time_per_image(lambda im, s=s: predict_image(model, im, s), images)
        for name, s in settings.items()
    }

    probs = {id(im): predict_image(model, im, settings["whole"]) for im in images}
    seconds["dense CRF (10 iterations)"] = time_per_image(
        lambda im: dense_crf(im, probs[id(im)], CRFParams()), images
    )

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads"
    )
    print(
        f"\n{args.model} (width {args.width:g}, {NUM_CLASSES} classes) on {width}x{height} images; {machine}\n"
    )
    print(
        format_table(
            ["setting", "s / image", "images/s"],
            [[name, round(s, 3), round(1 / s, 2)] for name, s in seconds.items()],
        )
    )
    print(
        f"\nDeepLab (ICLR 2015) reports ~0.5 s per VOC image for its CRF on a CPU; here "
        f"{seconds['dense CRF (10 iterations)']:.2f} s."
    )
    result = {
        "machine": machine,
        "model": args.model,
        "width": args.width,
        "image": f"{width}x{height}",
        "images": args.images,
        "seconds_per_image": {k: round(v, 4) for k, v in seconds.items()},
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
