"""Benchmark: images/s per CPU core that the training data path delivers, against the tight-loop limit.

    .venv/bin/python bench/feed.py [--recipes deeplab_largefov_voc,pspnet_voc,pspnet_cityscapes] [--images 48]

For each recipe (its crop and augmentation, on synthetic images at the published size: VOC 500x375,
Cityscapes 2048x1024), in the same run:
- tight loop: one process, no Ray, decodes and augments the prepared rows with `augment_batch` (the
  encoded bytes are read beforehand): the most one core can deliver;
- segpipe feed: the Ray Dataset a training run streams (`pipelines.train.trainer.train_feed`: parquet read with
  file shuffle -> augment), consumed as a worker does (`streaming_split(1, equal=True)` then
  `pipelines.train.loop.iter_train_batches`, i.e. local shuffle, collate to tensors, prefetch), with no
  model, for --epochs epochs; Ray has every core of the machine.
Target: feed >= 0.8 x tight loop x cores. Also records the CPU seconds of both (all processes), which say
where the time goes when the target is missed. `--json-out` saves the figures.
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
from prepare import tree_cpu_seconds  # bench/prepare.py, beside this script

from pipelines.config import CONFIG_DIR, load_train_config
from pipelines.data.augment import AugmentParams, augment_batch
from pipelines.data.dataset import IMAGE, MASK, open_prepared
from pipelines.data.prepare import PrepareConfig, prepare
from pipelines.data.synth import SynthConfig, synthesize

SOURCE_SIZE = {"voc": (375, 500), "cityscapes": (1024, 2048)}  # (H, W) as published


def tight_loop(data, params: AugmentParams, batch: int = 8) -> dict[str, float]:
    """images/s and CPU s/image of decode + augment in this process alone (the per-core limit)."""
    rows = data.read_rows("train", [IMAGE, MASK])
    images, masks = (
        np.array(rows[IMAGE].to_pylist(), dtype=object),
        np.array(rows[MASK].to_pylist(), dtype=object),
    )
    cpu, started = time.process_time(), time.perf_counter()
    for i in range(0, len(images), batch):
        augment_batch({"image": images[i : i + batch], "mask": masks[i : i + batch]}, params)
    wall = time.perf_counter() - started
    return {"images_per_s": len(images) / wall, "cpu_s_per_image": (time.process_time() - cpu) / len(images)}


def ray_feed(data, cfg, epochs: int) -> dict:
    """images/s of the training feed per epoch, no model, and the CPU s/image all processes spent."""
    import torch

    from pipelines.train.loop import iter_train_batches
    from pipelines.train.trainer import train_feed

    shard = train_feed(cfg, data).streaming_split(1, equal=True)[0]
    rates, first_batch_s = [], []
    cpu = tree_cpu_seconds()
    for _ in range(epochs):
        started, count, first = time.perf_counter(), 0, None
        for batch in iter_train_batches(shard, cfg, torch.device("cpu")):
            first = first or time.perf_counter() - started
            count += len(batch["image"])
        rates.append(count / (time.perf_counter() - started))
        first_batch_s.append(first)
    cpu = tree_cpu_seconds() - cpu
    images = cfg.batch_size * (data.manifest.splits["train"].rows // cfg.batch_size) * epochs
    return {"per_epoch": rates, "first_batch_s": first_batch_s, "cpu_s_per_image": cpu / images}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", default="deeplab_largefov_voc,pspnet_voc,pspnet_cityscapes")
    parser.add_argument("--images", type=int, default=192, help="VOC training images (default: 192)")
    parser.add_argument(
        "--cityscapes-images", type=int, default=32, help="Cityscapes training images (default: 32)"
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="feed epochs; the first is warm-up (default: 3)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default="bench/out/feed")
    parser.add_argument("--json-out", default="bench/out/feed.json")
    args = parser.parse_args()

    import logging

    import ray

    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    # A fresh local instance even when another Ray runs on this machine; no dashboard: nothing here needs
    # its state API, and it is one process fewer on the cores measured.
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepared: dict[str, str] = {}
    count = {"voc": args.images, "cityscapes": args.cityscapes_images}
    figures = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    figures |= {"ray_cpus": args.num_cpus, "images": count, "recipes": {}}
    for recipe in args.recipes.split(","):
        layout = recipe.rsplit("_", 1)[1]
        if layout not in prepared:
            src = synthesize(
                SynthConfig(
                    layout, str(work / layout), num_train=count[layout], num_val=0, size=SOURCE_SIZE[layout]
                )
            )
            prepared[layout] = str(work / f"{layout}-prepared")
            prepare(PrepareConfig(layout, str(src), prepared[layout], splits=("train",), progress=False))
        cfg = load_train_config(
            CONFIG_DIR / f"{recipe}.yaml", data=prepared[layout], batch_size=args.batch_size
        )
        data = open_prepared(cfg.data)
        tight = tight_loop(data, AugmentParams.from_train_config(cfg))
        feed = ray_feed(data, cfg, args.epochs)
        steady = statistics.median(feed["per_epoch"][1:]) if args.epochs > 1 else feed["per_epoch"][0]
        ratio = steady / (tight["images_per_s"] * args.num_cpus)
        figures["recipes"][recipe] = {
            "crop": cfg.crop,
            "images": data.manifest.splits["train"].rows,
            "source": "x".join(map(str, SOURCE_SIZE[layout][::-1])),
            "tight_images_per_s": round(tight["images_per_s"], 2),
            "tight_cpu_s_per_image": round(tight["cpu_s_per_image"], 4),
            "feed_images_per_s": round(steady, 2),
            "feed_images_per_s_per_core": round(steady / args.num_cpus, 2),
            "feed_per_epoch": [round(r, 2) for r in feed["per_epoch"]],
            "feed_first_batch_s": [round(s, 2) for s in feed["first_batch_s"]],
            "feed_cpu_s_per_image": round(feed["cpu_s_per_image"], 4),
            "feed_vs_limit_x_cores": round(ratio, 3),
        }
        print(f"{recipe}: {json.dumps(figures['recipes'][recipe])}", flush=True)
    ray.shutdown()

    print(f"\n{count} training images, {args.num_cpus} cores for Ray, on {figures['machine']}:")
    for recipe, f in figures["recipes"].items():
        print(
            f"  {recipe:22s} crop {f['crop']:3d} from {f['source']:9s}: tight loop {f['tight_images_per_s']:6.2f}"
            f" img/s/core, feed {f['feed_images_per_s']:6.2f} img/s = {f['feed_images_per_s_per_core']:6.2f}"
            f"/core -> {f['feed_vs_limit_x_cores']:.3f} x limit x cores (target >= 0.8)"
        )
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
