"""Benchmark: ensemble selection and CRF search, in-driver (the previous algorithm) vs shards on Ray.

    .venv/bin/python bench/ensemble.py [--images 400 100] [--size 375 500] [--num-cpus 2] [--crf-images 20]

Generates VOC-size val images and three untrained candidates (DeepLab-LargeFOV width 0.25, FCN-8s width
0.25, PSPNet-ResNet18; untrained is enough: the cost does not depend on the weights), then, each in a
fresh process so that its peak driver RSS is its own:
- in-driver: every image decoded in the driver, every candidate run image by image there, all float32
  maps kept, greedy selection in memory (the algorithm the test keeps as its reference), on the first
  of --images;
- cluster: `score_candidates` (Ray Data actor pool) + `greedy_select` (Ray tasks over shards), on every
  --images count, to show the driver's RSS does not grow with the split;
- CRF search on --crf-images images: the same (setting, shard) work serially in one process vs
  `search_crf`'s Ray tasks.
Prints wall times, peak driver RSS and the ratios; `--json-out` saves them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = {
    "deeplab_largefov": {"width": 0.25},
    "fcn8s": {"width": 0.25},
    "pspnet": {"backbone": "resnet18"},
}


class PeakRSS:
    """Samples this process's resident set size every 20 ms while active (MB)."""

    def __enter__(self):
        self.peak, self.done = self.now(), threading.Event()
        self.start = self.peak
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def now() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def watch(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.now())


def make_input(work: Path, images: int, size: tuple[int, int]) -> tuple[str, list[str]]:
    """Prepared val split of `images` synthetic VOC images, and the three candidate model folders."""
    import torch

    from pipelines.data.dataset import open_prepared
    from pipelines.data.prepare import PrepareConfig, prepare
    from pipelines.data.synth import SynthConfig, synthesize
    from segmodels import build_model
    from segmodels.artifact import MemberSpec, ModelSpec, save_model_dir

    data_dir = work / f"data-{images}"
    if not (data_dir / "manifest.json").exists():
        src = synthesize(
            SynthConfig("voc", str(work / f"src-{images}"), num_train=0, num_val=images, size=size)
        )
        prepare(PrepareConfig("voc", str(src), str(data_dir), splits=("val",), progress=False))
    data = open_prepared(str(data_dir))
    folders = []
    for seed, (arch, args) in enumerate(CANDIDATES.items()):
        folder = work / "candidates" / arch
        if not (folder / "model.json").exists():
            torch.manual_seed(seed)
            net = build_model(arch, data.num_classes, **args)
            member = MemberSpec(
                arch=arch, num_classes=data.num_classes, weights="m.safetensors", model_args=args
            )
            spec = ModelSpec.single(arch, member, data.classes, data.palette)
            save_model_dir(folder, spec, [net.state_dict()])
        folders.append(str(folder))
    return str(data_dir), folders


def reference_greedy():
    """The in-memory greedy selection kept by tests/pipelines/select/test_ensemble_shards.py as the reference."""
    path = ROOT / "tests" / "pipelines" / "select" / "test_ensemble_shards.py"
    spec = importlib.util.spec_from_file_location("ensemble_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_greedy


def in_driver(data_dir: str, folders: list[str], rounds: int) -> dict:
    """The previous algorithm: everything in the driver process."""
    import numpy as np

    from pipelines.data.dataset import decode_mask, open_prepared
    from pipelines.images import decode_image
    from pipelines.inference.core import InferenceSettings, predict_image
    from segmodels.artifact import load_model_dir

    greedy = reference_greedy()
    data = open_prepared(data_dir)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        rows = data.split("val").take(data.manifest.splits["val"].rows)
        images = [decode_image(r["image"]) for r in rows]
        truths = [decode_mask(r["mask"]) for r in rows]
        probs = []
        for folder in folders:
            model = load_model_dir(folder)
            probs.append(
                [
                    predict_image(model, im, InferenceSettings()).astype(np.float16).astype(np.float32)
                    for im in images
                ]
            )
        counts, miou, _ = greedy(probs, truths, data.num_classes, rounds)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_start_mb": rss.start, "rss_peak_mb": rss.peak, "images": len(images)}


def on_cluster(data_dir: str, folders: list[str], rounds: int, crf_images: int, work: Path) -> dict:
    from pipelines.data.dataset import open_prepared
    from pipelines.select.ensemble.crf_search import coarse_settings, crf_confusion, fine_settings, search_crf
    from pipelines.select.ensemble.scoring import score_candidates
    from pipelines.select.ensemble.selection import greedy_select

    data = open_prepared(data_dir)
    out = str(work / f"shards-{os.getpid()}")
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        shards = score_candidates(folders, data, "val", out)
        scored = time.perf_counter() - t0
        selection = greedy_select(shards, len(folders), data.num_classes, rounds)
        seconds = time.perf_counter() - t0
    result = {
        "seconds": seconds,
        "scoring_s": scored,
        "rss_start_mb": rss.start,
        "rss_peak_mb": rss.peak,
        "images": sum(s.images for s in shards),
    }
    if crf_images:
        weights = selection.candidate_weights
        t0 = time.perf_counter()
        found = search_crf(shards, weights, data.num_classes, crf_images)
        result["crf_parallel_s"] = time.perf_counter() - t0
        # The same (setting, shard) work one after another in this process.
        plan, left = [], crf_images
        for shard in shards:
            if left > 0:
                plan.append((shard.uri, min(left, shard.images)))
                left -= shard.images
        coarse = coarse_settings()
        t0 = time.perf_counter()
        for setting in [None, *coarse, *fine_settings(coarse[0], coarse)]:
            for uri, limit in plan:
                crf_confusion(uri, limit, weights, setting, data.num_classes)
        result["crf_serial_s"] = time.perf_counter() - t0
        result["crf_settings"] = found.settings_tried + 1
        result["crf_images"] = found.images
    return result


def child(args) -> None:
    import logging

    import ray

    # address="local": a fresh instance with exactly --num-cpus (prepare reuses it), never another's cluster.
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    work = Path(args.workdir)
    data_dir, folders = make_input(work, args.child_images, tuple(args.size))
    if args.child == "in-driver":
        result = in_driver(data_dir, folders, args.rounds)
    else:
        result = on_cluster(data_dir, folders, args.rounds, args.crf_images, work)
    print(json.dumps(result))


def run_child(args, mode: str, images: int, crf_images: int = 0) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--child-images",
        str(images),
        "--workdir",
        args.workdir,
    ]
    cmd += ["--size", *map(str, args.size), "--num-cpus", str(args.num_cpus), "--rounds", str(args.rounds)]
    cmd += ["--crf-images", str(crf_images)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):  # on a busy machine Ray's node may miss its 30 s start-up deadline: start afresh
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if "timed out during startup" not in out.stderr:
            break
    if out.returncode:
        raise SystemExit(f"{mode} on {images} images failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, nargs="+", default=[400, 100], help="val split sizes")
    parser.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=5, help="selection rounds (default: 5)")
    parser.add_argument("--crf-images", type=int, default=20)
    parser.add_argument("--workdir", default="bench/out/ensemble")
    parser.add_argument("--json-out", default="bench/out/ensemble.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    load = os.getloadavg()[0]
    first, *others = args.images
    figures = {
        "size": f"{args.size[1]}x{args.size[0]}",
        "cores": os.cpu_count(),
        "ray_cpus": args.num_cpus,
        "load_average_1min_before": round(load, 2),
        "in_driver": run_child(args, "in-driver", first),
        "cluster": {str(first): run_child(args, "cluster", first, args.crf_images)},
    }
    for n in others:
        figures["cluster"][str(n)] = run_child(args, "cluster", n)
    old, new = figures["in_driver"], figures["cluster"][str(first)]
    figures["speedup"] = round(old["seconds"] / new["seconds"], 2)
    figures["crf_speedup"] = (
        round(new["crf_serial_s"] / new["crf_parallel_s"], 2) if args.crf_images else None
    )
    print(f"ensemble selection, {figures['size']} images, 3 candidates, {args.num_cpus} Ray CPUs:")
    print(
        f"  in-driver on {first} images: {old['seconds']:.1f} s, peak driver RSS {old['rss_peak_mb']:.0f} MB\n"
        f"  cluster   on {first} images: {new['seconds']:.1f} s (scoring {new['scoring_s']:.1f} s), peak driver "
        f"RSS {new['rss_peak_mb']:.0f} MB -> {figures['speedup']:.2f}x (target >= 1.8x)"
    )
    for n in others:
        r = figures["cluster"][str(n)]
        print(f"  cluster   on {n} images: {r['seconds']:.1f} s, peak driver RSS {r['rss_peak_mb']:.0f} MB")
    if args.crf_images:
        print(
            f"  CRF search, {new['crf_settings']} settings x {new['crf_images']} images: serial "
            f"{new['crf_serial_s']:.1f} s, Ray tasks {new['crf_parallel_s']:.1f} s -> {figures['crf_speedup']:.2f}x "
            "(target >= 1.8x)"
        )
    print(f"  (load average before the run {figures['load_average_1min_before']})")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
