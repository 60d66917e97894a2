"""Benchmark: listing a COCO-size annotation file (the driver's part of `segpipe prepare --dataset coco`).

    .venv/bin/python bench/coco_listing.py [--images 118287] [--annotations 860001] [--json-out F]

Writes, streaming (the generator holds one annotation at a time), a synthetic `instances_train2017.json`
shaped like COCO 2017's (118k image entries with their URLs and dates, 860k annotations of ~24-point
polygons, 1% crowds as uncompressed RLE, each image's annotations scattered through the file; about
430 MB) and an empty file per image, then lists it in a fresh process as prepare's driver does
(`Coco.list_split`) and reports: seconds, the process's peak RSS (ru_maxrss), the RSS it still holds
after listing with the samples alive (what the driver carries through the run), both beside the file's
size, and the workers' side: milliseconds per image to read its byte ranges back (`read_ms_per_image`)
and to read them and rasterise the mask (`mask_ms_per_image`).

`--compare` also lists it as before streaming (`json.loads` of the whole file, each image's annotations
carried in its sample), in another fresh process, for before/after figures from the same run.
`rehearse(tmpdir)` does the same and returns the figures, for bench/fullsize.py.
Target (issue 22): peak at most ~1.5x the file size, nothing that grows with the annotations held after
listing. Before this reader: 35-46 s, 3.2 GB peak, 1.37 GB held on a 425 MB file.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COCO_TRAIN_IMAGES, COCO_TRAIN_ANNOTATIONS = 118_287, 860_001
POLYGON_VARIANTS = 997  # distinct polygons, reused: generating 860k would dominate the bench


def _polygon(rng: random.Random, width: int, height: int) -> str:
    """About 24 points on a rough circle, as COCO writes them (two decimals)."""
    import math

    cx, cy, r = rng.uniform(60, width - 60), rng.uniform(60, height - 60), rng.uniform(10, 55)
    points = []
    for k in range(rng.randint(18, 30)):
        angle = 2 * math.pi * k / 24
        rk = r * rng.uniform(0.7, 1.0)
        points += [round(cx + rk * math.cos(angle), 2), round(cy + rk * math.sin(angle), 2)]
    return json.dumps([points])


def _crowd(rng: random.Random, width: int, height: int) -> str:
    """Uncompressed RLE (column-major run lengths) of a few hundred runs, as COCO stores crowds."""
    total, counts = width * height, []
    while total > 0:
        run = min(total, rng.randint(1, 3000))
        counts.append(run)
        total -= run
    return json.dumps({"counts": counts, "size": [height, width]})


def write_annotation_file(root: Path, images: int, annotations: int, seed: int = 0) -> Path:
    """`root/annotations/instances_train2017.json` + empty `root/train2017/*.jpg`, written streaming."""
    rng = random.Random(seed)
    width, height = 640, 480
    polygons = [_polygon(rng, width, height) for _ in range(POLYGON_VARIANTS)]
    crowds = [_crowd(rng, width, height) for _ in range(7)]
    image_ids = rng.sample(range(1, 600_000), images)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / "instances_train2017.json"
    with open(path, "w") as out:
        out.write('{"info": {"description": "segpipe bench COCO", "year": 2017}, "licenses": [], "images": [')
        for n, image_id in enumerate(image_ids):
            name = f"{image_id:012d}.jpg"
            (root / "train2017" / name).touch()
            out.write(
                ("," if n else "")
                + f'{{"license": 3, "file_name": "{name}", "coco_url": "http://images.cocodataset.org/train2017/'
                f'{name}", "height": {height}, "width": {width}, "date_captured": "2013-11-14 11:18:45", '
                f'"flickr_url": "http://farm9.staticflickr.com/8186/{image_id}_2d0d8f8c5b_z.jpg", "id": {image_id}}}'
            )
        out.write('], "annotations": [')
        for ann_id in range(1, annotations + 1):
            crowd = rng.random() < 0.01
            segmentation = rng.choice(crowds) if crowd else rng.choice(polygons)
            out.write(
                ("," if ann_id > 1 else "")
                + f'{{"segmentation": {segmentation}, "area": {rng.uniform(50, 9000):.2f}, '
                f'"iscrowd": {int(crowd)}, "image_id": {rng.choice(image_ids)}, '
                f'"bbox": [{rng.uniform(0, 500):.2f}, {rng.uniform(0, 400):.2f}, 58.12, 47.31], '
                f'"category_id": {rng.choice((1, 3, 18, 44, 62, 90))}, "id": {ann_id}}}'
            )
        out.write('], "categories": [{"supercategory": "person", "id": 1, "name": "person"}]}')
    return path


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _child(root: str, sample_masks: int) -> dict:
    """Runs in a fresh process: list as prepare's driver does, then read a few masks as a worker would."""
    import pycocotools.mask  # noqa: F401

    from pipelines import storage
    from pipelines.data.layouts import get_layout
    from pipelines.data.layouts.coco import read_annotations

    layout = get_layout("coco")
    storage.filesystem(root)  # imports pyarrow: the interpreter's baseline, not what listing costs
    gc.collect()
    before = _rss_mb()
    start = time.perf_counter()
    samples, rejected = layout.list_split(root, "train")
    seconds = time.perf_counter() - start
    gc.collect()
    held = _rss_mb() - before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ranges = [len(json.loads(s.annotations)["ranges"]) for s in samples]
    timed = samples[:sample_masks]
    start = time.perf_counter()
    for sample in timed:
        record = json.loads(sample.annotations)
        read_annotations(record["source"], record["ranges"])
    read_ms = 1000 * (time.perf_counter() - start) / max(1, len(timed))
    start = time.perf_counter()
    for sample in timed:
        layout.label_to_mask(sample, None)
    mask_ms = 1000 * (time.perf_counter() - start) / max(1, len(timed))
    return {
        "samples": len(samples),
        "rejected": len(rejected),
        "list_seconds": round(seconds, 1),
        "rss_before_mb": round(before),
        "peak_rss_mb": round(peak),
        "peak_over_before_mb": round(peak - before),
        "held_after_listing_mb": round(held),
        "sample_text_mb": round(sum(len(s.annotations) for s in samples) / 2**20, 1),
        "reads_per_image": round(sum(ranges) / max(1, len(ranges)), 2),
        "read_ms_per_image": round(read_ms, 2),
        "mask_ms_per_image": round(mask_ms, 2),
    }


def _whole_file_child(root: str) -> dict:
    """The listing before streaming, for comparison in the same run: `json.loads` of the whole file and
    every image's annotations (id, category, crowd, segmentation) carried as JSON in its sample."""
    from collections import defaultdict

    gc.collect()
    before = _rss_mb()
    start = time.perf_counter()
    data = json.loads((Path(root) / "annotations" / "instances_train2017.json").read_bytes())
    per_image = defaultdict(list)
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(
            {k: ann.get(k) for k in ("id", "category_id", "iscrowd", "segmentation")}
        )
    samples = [
        json.dumps({"height": i["height"], "width": i["width"], "anns": per_image.get(i["id"], [])})
        for i in data["images"]
    ]
    seconds = time.perf_counter() - start
    del data, per_image
    gc.collect()
    return {
        "samples": len(samples),
        "list_seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "held_after_listing_mb": round(_rss_mb() - before),
    }


def rehearse(
    tmpdir: str | Path,
    images: int = COCO_TRAIN_IMAGES,
    annotations: int = COCO_TRAIN_ANNOTATIONS,
    sample_masks: int = 200,
    compare: bool = False,
) -> dict:
    """Generate the file under `tmpdir`, list it in a child process; the figures as a dict (with
    `compare`, also the whole-file listing's, as `whole_file_*`)."""
    root = Path(tmpdir) / "coco"
    start = time.perf_counter()
    path = write_annotation_file(root, images, annotations)
    generate_seconds = time.perf_counter() - start
    generator_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = subprocess.run(
        [sys.executable, __file__, "--child", str(root), "--sample-masks", str(sample_masks)],
        check=True,
        capture_output=True,
        text=True,
    )
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    if compare:
        whole = subprocess.run(
            [sys.executable, __file__, "--whole-file-child", str(root)],
            check=True,
            capture_output=True,
            text=True,
        )
        figures.update(
            {f"whole_file_{k}": v for k, v in json.loads(whole.stdout.strip().splitlines()[-1]).items()}
        )
    file_mb = path.stat().st_size / 2**20
    return {
        "file_mb": round(file_mb),
        "images": images,
        "annotations": annotations,
        "generate_seconds": round(generate_seconds, 1),
        "generator_peak_rss_mb": round(generator_peak),
        **figures,
        "peak_over_file": round(figures["peak_rss_mb"] / file_mb, 2),
        "target_peak_mb": round(1.5 * file_mb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--annotations", type=int, default=COCO_TRAIN_ANNOTATIONS)
    parser.add_argument("--sample-masks", type=int, default=200, help="masks rasterised to time the workers")
    parser.add_argument("--json-out", help="also write the figures to this file")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also list the file the way it was before streaming (~3 GB peak)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--whole-file-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.sample_masks)))
        return
    if args.whole_file_child:
        print(json.dumps(_whole_file_child(args.whole_file_child)))
        return
    with tempfile.TemporaryDirectory(prefix="segpipe-coco-listing-") as tmpdir:
        figures = rehearse(tmpdir, args.images, args.annotations, args.sample_masks, args.compare)
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
