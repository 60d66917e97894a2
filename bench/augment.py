"""Benchmark: CPU milliseconds per training sample, whole-image augmentation against crop-first.

    .venv/bin/python bench/augment.py [--samples 60] [--images 4]

Times `pipelines.data.augment.augment_sample` (crop-first: sample the geometry, resample only the crop window)
against the previous whole-image path kept below as the baseline (resize, rotate and blur the whole
image, then pad and crop), on the same decoded images with the same seeds, in one process and one thread,
old and new alternating in blocks so that load from other processes falls on both. Recipes:
- DeepLab VOC: crop 321, scale 0.5-2, flip, from 500x375;
- PSPNet VOC: crop 473, scale 0.5-2, rotation +-10, blur p=0.5, flip, from 500x375;
- PSPNet Cityscapes: crop 713 from 2048x1024, same operations;
- PSPNet VOC at a fixed scale 2 (the worst case of the range);
- U-Net VOC: crop 572, rotation +-10, elastic deformation, jitter 0.2, flip (scale 1).
Prints CPU ms per sample (process time, so waiting for a core is not counted), the crop-first path's
window sampling and resampling alone, and the speed-up; `--json-out` saves them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pipelines.data.augment import (
    IGNORE,
    MEAN_RGB,
    AugmentParams,
    augment_sample,
    elastic_deform,
    photometric_jitter,
    sample_window,
    warp_window,
)
from pipelines.report import format_table

VOC, CITYSCAPES = (375, 500), (1024, 2048)
PSPNET = {"scale_min": 0.5, "scale_max": 2.0, "rotate_deg": 10.0, "blur": 0.5, "flip": True}
RECIPES = {
    "DeepLab VOC (321)": (AugmentParams(crop=321, scale_min=0.5, scale_max=2.0, flip=True), VOC),
    "PSPNet VOC (473)": (AugmentParams(crop=473, **PSPNET), VOC),
    "PSPNet Cityscapes (713)": (AugmentParams(crop=713, **PSPNET), CITYSCAPES),
    "PSPNet VOC (473), scale 2": (AugmentParams(crop=473, **{**PSPNET, "scale_min": 2.0}), VOC),
    "U-Net VOC (572)": (
        AugmentParams(crop=572, scale_min=1.0, scale_max=1.0, rotate_deg=10.0, jitter=0.2, elastic=True),
        VOC,
    ),
}


def whole_image_augment(
    image: np.ndarray, mask: np.ndarray, p: AugmentParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The previous `augment_sample`, verbatim: every operation on the whole (resized) image, then crop."""
    pil_img, pil_mask = Image.fromarray(image), Image.fromarray(mask)
    scale = rng.uniform(p.scale_min, p.scale_max)
    if scale != 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        pil_img = pil_img.resize(size, Image.BILINEAR)
        pil_mask = pil_mask.resize(size, Image.NEAREST)
    if p.rotate_deg:
        angle = rng.uniform(-p.rotate_deg, p.rotate_deg)
        pil_img = pil_img.rotate(angle, Image.BILINEAR, fillcolor=MEAN_RGB)
        pil_mask = pil_mask.rotate(angle, Image.NEAREST, fillcolor=IGNORE)
    if p.blur and rng.random() < p.blur:
        pil_img = pil_img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    img, msk = np.asarray(pil_img), np.asarray(pil_mask)
    if p.elastic:
        img, msk = elastic_deform(img, msk, rng)
    h, w = msk.shape
    ph, pw = max(p.crop - h, 0), max(p.crop - w, 0)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        img[h:, :, :] = MEAN_RGB
        img[:, w:, :] = MEAN_RGB
        msk = np.pad(msk, ((0, ph), (0, pw)), constant_values=IGNORE)
    y = int(rng.integers(0, msk.shape[0] - p.crop + 1))
    x = int(rng.integers(0, msk.shape[1] - p.crop + 1))
    img, msk = img[y : y + p.crop, x : x + p.crop], msk[y : y + p.crop, x : x + p.crop]
    if p.flip and rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    if p.jitter:
        img = photometric_jitter(img, p.jitter, rng)
    return np.ascontiguousarray(img), np.ascontiguousarray(msk)


def labelled_image(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A blocky 21-class mask with a void border around each block and a noisy image coloured by class."""
    block = 32
    coarse = rng.integers(0, 21, (height // block + 1, width // block + 1), dtype=np.uint8)
    mask = np.kron(coarse, np.ones((block, block), dtype=np.uint8))[:height, :width]
    mask[::block, :] = IGNORE
    mask[:, ::block] = IGNORE
    colours = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    image = np.clip(colours[mask] + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    return image, mask


def cpu_ms_per_sample(paths, params, pairs, samples: int, block: int = 5) -> dict[str, float]:
    """Process-time ms per sample for each path; paths alternate every `block` samples, same seeds."""
    totals = dict.fromkeys(paths, 0.0)
    for fn in paths.values():  # warm-up: imports, first allocations
        fn(*pairs[0], params, np.random.default_rng(0))
    for start in range(0, samples, block):
        for name, fn in paths.items():
            begun = time.process_time()
            for seed in range(start, min(start + block, samples)):
                fn(*pairs[seed % len(pairs)], params, np.random.default_rng(seed))
            totals[name] += time.process_time() - begun
    return {name: 1000 * total / samples for name, total in totals.items()}


def window_only(image, mask, p: AugmentParams, rng: np.random.Generator):
    """The crop-first path's geometry alone (sample the window, resample it): the rest is blur, elastic,
    padding and jitter."""
    return warp_window(image, mask, sample_window(*mask.shape, p, rng), p.crop)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=60, help="timed samples per path and recipe")
    parser.add_argument("--images", type=int, default=4, help="distinct source images per size")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--json-out", default="bench/out/augment.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sources = {size: [labelled_image(rng, *size) for _ in range(args.images)] for size in (VOC, CITYSCAPES)}
    paths = {
        "whole image (previous)": whole_image_augment,
        "crop-first": augment_sample,
        "crop-first, window only": window_only,
    }
    ms = {}
    for name in args.recipes:
        params, size = RECIPES[name]
        ms[name] = cpu_ms_per_sample(paths, params, sources[size], args.samples)
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms[name].items()), flush=True)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread"
    print(f"\nCPU ms per sample, {args.samples} samples per path and recipe; {machine}\n")
    old, new, window = paths
    rows = [
        [name, f"{m[old]:.1f}", f"{m[new]:.1f}", f"{m[window]:.1f}", f"{m[old] / m[new]:.1f}x"]
        for name, m in ms.items()
    ]
    headers = ["recipe", "whole image ms", "crop-first ms", "of which window ms", "speed-up"]
    print(format_table(headers, rows))
    result = {
        "machine": machine,
        "samples": args.samples,
        "cpu_ms_per_sample": {k: {p: round(v, 3) for p, v in m.items()} for k, m in ms.items()},
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
