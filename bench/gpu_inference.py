"""Benchmark: `segpipe evaluate` images/s on the accelerators of this machine, against the one-process loop.

    .venv/bin/python bench/gpu_inference.py [--images 200] [--size 512 1024] [--model deeplab_largefov]

Writes a Cityscapes-layout dataset of `--images` val images at `--size`, prepares it, saves the model at
full width (random weights: speed does not depend on them) and scores the val split twice, same model, same
images, same settings (sliding 513 windows, stride 342):
- `segpipe evaluate` (Ray Data actor pool, one GPU per actor when the cluster has GPUs: `model_actors`),
  confusion counted on the device;
- the loop a user would write: one process reading the parquet rows, decoding, predicting with the same
  `predict_batch`, argmax and confusion on the device.
Prints images/s of both and their ratio (target >= 1.0 per GPU). Runs on CPUs where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import segmodels
from pipelines.data.dataset import IMAGE, MASK, decode_mask, open_prepared
from pipelines.data.prepare import PrepareConfig, prepare
from pipelines.data.synth import SynthConfig, synthesize
from pipelines.images import decode_image
from pipelines.inference.core import InferenceSettings, predict_batch
from pipelines.inference.evaluate import EvalConfig, evaluate
from pipelines.runtime import ensure_ray
from segmodels.artifact import MemberSpec, ModelSpec, load_model_dir, save_model_dir


def model_folder(folder: Path, arch: str, width: float, data) -> Path:
    """The architecture at `width` with random weights, for the dataset's classes."""
    torch.manual_seed(0)
    args = {"width": width} if arch != "pspnet" else {}
    net = segmodels.build_model(arch, data.num_classes, **args).eval()
    member = MemberSpec(
        arch=arch, num_classes=data.num_classes, weights="member0.safetensors", model_args=args
    )
    spec = ModelSpec.single("bench", member, list(data.classes), data.palette)
    return save_model_dir(folder, spec, [net.state_dict()])


def plain_loop(folder: Path, prepared: str, settings: InferenceSettings, device: str) -> tuple[float, int]:
    """Seconds and images of the one-process loop over the val split."""
    data = open_prepared(prepared)
    model = load_model_dir(folder, device=device)
    classes = data.num_classes
    confusion = torch.zeros(classes * classes, dtype=torch.int64, device=device)
    started = time.perf_counter()
    rows = data.read_rows("val", [IMAGE, MASK])
    images = 0
    for image_bytes, mask_bytes in zip(rows[IMAGE].to_pylist(), rows[MASK].to_pylist(), strict=True):
        image, truth = decode_image(image_bytes), torch.tensor(decode_mask(mask_bytes), device=device)
        pred = predict_batch(model, image[None], settings).argmax(1)[0]
        valid = truth != 255
        confusion += torch.bincount(truth[valid].long() * classes + pred[valid], minlength=classes * classes)
        images += 1
    confusion.cpu()
    return time.perf_counter() - started, images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200, help="val images (default: 200)")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--model", default="deeplab_largefov")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--json-out", default="bench/out/gpu_inference.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="segpipe-gpu-inference-"))
    src = synthesize(
        SynthConfig("cityscapes", str(work / "src"), num_train=0, num_val=args.images, size=tuple(args.size))
    )
    ensure_ray(num_cpus=os.cpu_count())
    prepared = str(work / "prepared")
    prepare(PrepareConfig("cityscapes", str(src), prepared, splits=("val",), progress=False))
    folder = model_folder(work / "model", args.model, args.width, open_prepared(prepared))
    settings = InferenceSettings(slide=(513, 342))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    started = time.perf_counter()
    result = evaluate(EvalConfig(model_uri=str(folder), data=prepared, settings=settings))
    segpipe_s = time.perf_counter() - started
    loop_s, loop_images = plain_loop(folder, prepared, settings, device)
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "gpus": torch.cuda.device_count(),
        "model": f"{args.model} width {args.width}",
        "size": list(args.size),
        "settings": "slide 513/342",
        "segpipe_evaluate_images_per_s": round(result["images"] / segpipe_s, 2),
        "plain_loop_images_per_s": round(loop_images / loop_s, 2),
        "miou": result["metrics"]["miou"],
    }
    figures["ratio"] = round(figures["segpipe_evaluate_images_per_s"] / figures["plain_loop_images_per_s"], 3)
    print(json.dumps(figures, indent=2))
    assert np.isfinite(figures["ratio"])
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
