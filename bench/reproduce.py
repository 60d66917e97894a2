"""Benchmark: every `segpipe reproduce` recipe's `--tiny` run end to end, timed stage by stage.

    .venv/bin/python bench/reproduce.py [--recipes fcn,deconvnet,...] [--num-cpus N] [--json-out F]

Generates a VOC-layout dataset (64 train / 12 val images), prepares it, starts one local
Ray instance and an MLflow store (sqlite), then runs each recipe with `--tiny` (narrow networks, 64-pixel crops,
one epoch) in order; `deconvnet` gets a proposals file with two boxes per val image and runs after `fcn`
(its EDeconvNet averages with FCN-8s). Prints, per recipe, each stage's seconds (as recorded in the recipe's
state file), the final val scoring and the wall time of the whole recipe; the machine is printed beside them.
Ray Train's controller polls every 0.2 s / 0.5 s here, as in the tests (`tests/conftest.py`); with Ray's
defaults each training stage takes a few seconds longer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")

ORDER = ["fcn", "fcn_atonce", "deeplab", "dilation", "deconvnet", "unet", "pspnet"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=",".join(ORDER))
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--json-out", default="bench/out/reproduce.json")
    args = ap.parse_args()
    recipes = [r for r in ORDER if r in args.recipes.split(",")]
    if "deconvnet" in recipes and "fcn" not in recipes:
        raise SystemExit("deconvnet's EDeconvNet averages with FCN-8s: include fcn in --recipes")

    import ray

    from pipelines.data.dataset import open_prepared
    from pipelines.data.prepare import PrepareConfig, prepare
    from pipelines.data.synth import SynthConfig, synthesize
    from pipelines.jobs.reproduce import ReproduceConfig, reproduce

    root = Path(tempfile.mkdtemp(prefix="bench-reproduce-"))
    ray.init(
        num_cpus=args.num_cpus, logging_level=logging.WARNING, include_dashboard=True, log_to_driver=False
    )
    src = synthesize(SynthConfig(layout="voc", out=str(root / "src"), num_train=64, num_val=12, seed=3))
    data = str(root / "prepared")
    prepare(PrepareConfig(dataset="voc", root=str(src), out=data, splits=("train", "val")))
    ids = open_prepared(data).split("val", columns=["image_id"]).to_pandas()["image_id"]
    proposals = root / "proposals.json"
    proposals.write_text(json.dumps({i: [[0, 0, 40, 40], [10, 10, 60, 50]] for i in ids}))

    results = {}
    for name in recipes:
        started = time.perf_counter()
        out = reproduce(
            ReproduceConfig(
                recipe=name,
                data=data,
                tiny=True,
                tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                storage=str(root / "ray"),
                proposals=str(proposals) if name == "deconvnet" else "",
            )
        )
        wall = time.perf_counter() - started
        steps = out["step_seconds"]
        results[name] = {
            "stages": {s: round(steps[s], 1) for s in out["stages"]},
            "evaluate_s": round(steps["evaluate"], 1),
            "wall_s": round(wall, 1),
            "miou": out["table"]["ours"]["miou"],
        }
        stages = ", ".join(f"{s} {t:.1f}" for s, t in results[name]["stages"].items())
        print(
            f"{name:11s} wall {wall:6.1f} s | stages: {stages} | val scoring "
            f"{results[name]['evaluate_s']:.1f} s | tiny mIoU {out['table']['ours']['miou']}",
            flush=True,
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Ray num_cpus={args.num_cpus}"
    )
    print(f"machine: {machine}")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"machine": machine, "recipes": results}, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
