"""Benchmark: training images/s of every architecture at its paper's crop on one accelerator, with MFU.

    .venv/bin/python bench/gpu_train.py [--models fcn8s,pspnet] [--seconds 8] [--peak-tflops 989]

For each architecture, the recipe `pipelines/configs/<arch>_voc.yaml` gives the crop and model arguments
(full width); one training step is the one `segpipe train` runs (`train_one_epoch`: bf16 autocast,
channels_last, the recipe's optimiser and per-layer groups) on random uint8 images and labels already on
the device, so what is timed is the step alone. The batch is the recipe's, raised to `--min-batch`
(batch-1 recipes such as FCN and U-Net would leave the GPU idle). Warm-up steps first (cuDNN autotuning),
then as many steps as fit in `--seconds`.

MFU = 3 x forward FLOPs (`segmodels.complexity`, convolutions and matrix products) x images/s / peak;
the backward pass is counted as twice the forward. `--peak-tflops` is the accelerator's dense bf16 peak
(H100/H200 SXM: 989). On a machine without CUDA it runs on the CPU (`--device cpu`, tiny `--seconds`) as
a smoke test of the script itself; its MFU is meaningless there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

import segmodels
from pipelines.config import TrainConfig
from pipelines.train.loop import build_optimizer, train_one_epoch
from segmodels.complexity import count_gmacs

REPO = Path(__file__).resolve().parent.parent


def recipe(arch: str) -> dict:
    return yaml.safe_load((REPO / "pipelines" / "configs" / f"{arch}_voc.yaml").read_text())


def measure(arch: str, device: torch.device, seconds: float, min_batch: int, width: float) -> dict:
    values = recipe(arch)
    crop = int(values["crop"])
    batch = max(int(values.get("batch_size", 1)), min_batch)
    model_args = dict(values.get("model_args") or {})
    if width != 1.0 and arch != "pspnet":
        model_args["width"] = width
    cfg = TrainConfig(
        model=arch,
        model_args=model_args,
        crop=crop,
        batch_size=batch,
        epochs=1,
        optimizer=values.get("optimizer", "sgd"),
        lr=1e-6,
        amp="bf16",
        channels_last=True,
    )
    torch.manual_seed(0)
    model = segmodels.build_model(arch, 21, **model_args).to(device)
    gmacs = count_gmacs(model, (crop, crop))  # one image, eval mode
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
    images = torch.randint(0, 256, (batch, crop, crop, 3), dtype=torch.uint8, device=device)
    masks = torch.randint(0, 21, (batch, crop, crop), dtype=torch.uint8, device=device)

    def steps(count: int) -> float:
        started = time.perf_counter()
        train_one_epoch(
            model,
            optimizer,
            scaler,
            ({"image": images, "mask": masks} for _ in range(count)),
            cfg,
            device,
            iteration=0,
            iters_per_epoch=10**6,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    steps(3)  # warm-up: cuDNN autotuning, allocator growth
    one = steps(1)
    count = max(2, int(seconds / max(one, 1e-3)))
    elapsed = steps(count)
    rate = count * batch / elapsed
    return {
        "model": arch,
        "model_args": model_args,
        "crop": crop,
        "batch": batch,
        "steps": count,
        "images_per_s": round(rate, 2),
        "fwd_gflops_per_image": round(2 * gmacs, 1),
        "achieved_tflops": round(3 * 2 * gmacs * rate / 1e3, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if device.type == "cuda"
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(segmodels.MODELS), help="comma-separated architectures")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per model (default: 8)")
    parser.add_argument("--min-batch", type=int, default=8, help="smallest batch per step (default: 8)")
    parser.add_argument("--width", type=float, default=1.0, help="channel width (default: 1, the paper's)")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak (default: H100/H200)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", default="bench/out/gpu_train.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    rows = []
    for arch in args.models.split(","):
        row = measure(arch, device, args.seconds, args.min_batch, args.width)
        row["mfu"] = round(row["achieved_tflops"] / args.peak_tflops, 3)
        rows.append(row)
        print(
            f"{arch:17s} crop {row['crop']:4d} batch {row['batch']:3d}: {row['images_per_s']:8.1f} images/s, "
            f"{row['achieved_tflops']:6.1f} TFLOP/s, MFU {row['mfu']:.1%}",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": name, "peak_tflops": args.peak_tflops, "models": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
