"""Benchmark: `segpipe train` (Ray Train, one worker, fed by Ray Data) against the loop a user would write instead.

    .venv/bin/python bench/train.py [--model unet] [--width 0.25] [--crop 128] [--batch-size 8] [--epochs 4]
                                    [--device cuda]

Writes a synthetic VOC dataset, prepares it to parquet, then, in the same run, on the same model, data,
batch, optimiser and training step (`pipelines.train.loop.train_one_epoch`), each with one compute thread:
- `segpipe train`: TorchTrainer with one worker (1 CPU), the train split streamed by Ray Data with the
  augmentation in `map_batches` on the remaining cores; images/s of its training phase per epoch (the
  `images_per_s` metric it logs to MLflow), first epoch left out as warm-up;
- a plain PyTorch loop: a torch DataLoader(num_workers=2, persistent_workers=True) decoding and augmenting
  the same parquet rows with the same function, feeding the same step;
- pre-loaded tensors: every batch decoded and augmented beforehand, so only the step is timed.
Reports images/s of the three, segpipe / plain (target >= 0.95) and segpipe / pre-loaded (the data-stall
ratio); `--json-out` saves the figures. `--device cuda` runs all three on one GPU (segpipe with `use_gpu`),
in bf16 with channels_last, the step the GPU check (`bench/gpu_check.sh`) compares.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipelines import tracking
from pipelines.config import TrainConfig
from pipelines.data.augment import AugmentParams, augment_sample
from pipelines.data.dataset import IMAGE, MASK, decode_mask, open_prepared
from pipelines.data.prepare import PrepareConfig, prepare
from pipelines.data.synth import SynthConfig, synthesize
from pipelines.images import decode_image
from pipelines.train.loop import build_optimizer, train_one_epoch
from pipelines.train.trainer import train
from segmodels import build_model


class ParquetRows(torch.utils.data.Dataset):
    """The train split's parquet rows, decoded and augmented per item exactly as Ray Data's UDF does."""

    def __init__(self, data, params: AugmentParams):
        table = data.read_rows("train", [IMAGE, MASK])
        self.rows = list(zip(table[IMAGE].to_pylist(), table[MASK].to_pylist(), strict=True))
        self.params = params

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image, mask = self.rows[index]
        rng = np.random.default_rng()
        img, msk = augment_sample(decode_image(image), decode_mask(mask), self.params, rng)
        return {"image": img, "mask": msk}


def timed_epochs(cfg: TrainConfig, batches_per_epoch, epochs: int, device: torch.device) -> list[float]:
    """images/s of `train_one_epoch` for each epoch on `device`, on fresh batches from the callable."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, 21, **cfg.model_args).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    rates, iteration = [], 0
    for _ in range(epochs):
        started = time.perf_counter()
        _, images, iteration = train_one_epoch(
            model,
            optimizer,
            scaler,
            batches_per_epoch(),
            cfg,
            device,
            iteration=iteration,
            iters_per_epoch=10**6,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(images / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="unet")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs of each; the first is warm-up (default: 4)"
    )
    parser.add_argument("--num-train", type=int, default=96)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: one GPU, bf16")
    parser.add_argument("--workdir", default="bench/out/train")
    parser.add_argument("--json-out", default="bench/out/train.json")
    args = parser.parse_args()

    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    src = synthesize(
        SynthConfig("voc", str(work / "src"), num_train=args.num_train, num_val=4, size=(192, 256))
    )
    import ray

    from pipelines.runtime import ensure_ray

    ensure_ray(num_cpus=os.cpu_count())
    prepare(PrepareConfig("voc", str(src), str(work / "prepared"), progress=False))

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    model_args = {"width": args.width, **({"padding": "same"} if args.model == "unet" else {})}
    cfg = TrainConfig(
        model=args.model,
        data=str(work / "prepared"),
        model_args=model_args,
        crop=args.crop,
        batch_size=args.batch_size,
        epochs=args.epochs,
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
        num_workers=1,
        cpus_per_worker=1,
        use_gpu=gpu,
        amp="bf16" if gpu else "off",
        channels_last=gpu,
        num_overlays=0,
        storage=str(work / "ray"),
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
        experiment="bench",
        run_name="bench-train",
    )
    params = AugmentParams.from_train_config(cfg)

    started = time.perf_counter()
    result = train(cfg)
    segpipe_wall = time.perf_counter() - started
    history = tracking.connect(cfg.tracking_uri).get_metric_history(result.run_id, "images_per_s")
    segpipe_rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    ray.shutdown()

    if not gpu:
        torch.set_num_threads(1)  # as the Ray Train worker (cpus_per_worker=1)
    rows = ParquetRows(open_prepared(cfg.data), params)
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        # CPU: 2 loader processes beside the 1-thread step, as on a 2-core machine; GPU: every core but the
        # step's, the cores Ray Data gets on the segpipe side.
        num_workers=max(2, (os.cpu_count() or 2) - 1) if gpu else 2,
        persistent_workers=True,
        pin_memory=gpu,
    )
    plain_rates = timed_epochs(cfg, lambda: iter(loader), args.epochs, device)
    preloaded = [batch for batch in loader]
    preloaded_rates = timed_epochs(cfg, lambda: iter(preloaded), args.epochs, device)

    def steady(rates: list[float]) -> float:
        return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]

    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "model": f"{args.model} {model_args}",
        "crop": args.crop,
        "batch_size": args.batch_size,
        "train_images": args.num_train,
        "segpipe_images_per_s": round(steady(segpipe_rates), 2),
        "plain_loop_images_per_s": round(steady(plain_rates), 2),
        "preloaded_images_per_s": round(steady(preloaded_rates), 2),
        "per_epoch": {
            "segpipe": [round(r, 2) for r in segpipe_rates],
            "plain": [round(r, 2) for r in plain_rates],
            "preloaded": [round(r, 2) for r in preloaded_rates],
        },
        "segpipe_wall_s": round(segpipe_wall, 1),
    }
    figures["segpipe_vs_plain"] = round(
        figures["segpipe_images_per_s"] / figures["plain_loop_images_per_s"], 3
    )
    figures["data_stall_ratio"] = round(
        figures["segpipe_images_per_s"] / figures["preloaded_images_per_s"], 3
    )
    print(
        f"\n{figures['model']}, crop {args.crop}, batch {args.batch_size}, {args.num_train} images/epoch, "
        f"on {figures['machine']}, {figures['device']} (median of epochs 2..{args.epochs}):\n"
        f"  segpipe train (Ray Train + Ray Data): {figures['segpipe_images_per_s']:7.2f} images/s\n"
        f"  plain loop (DataLoader, 2 workers)  : {figures['plain_loop_images_per_s']:7.2f} images/s\n"
        f"  pre-loaded tensors                  : {figures['preloaded_images_per_s']:7.2f} images/s\n"
        f"  segpipe / plain = {figures['segpipe_vs_plain']:.3f} (target >= 0.95); "
        f"data-stall ratio segpipe / pre-loaded = {figures['data_stall_ratio']:.3f}\n"
        f"  whole `segpipe train` call: {figures['segpipe_wall_s']} s for {args.epochs} epochs "
        f"(start-up, validation, checkpoints, MLflow logging included)"
    )
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
