"""Check: `segpipe retrain` on a 400-image VOC-size val split, and the driver's peak RSS (target < 2 GB).

    .venv/bin/python bench/retrain_memory.py [--val 400] [--workdir bench/out/retrain_memory] [--crf]

Generates a VOC-layout dataset (32 train images, --val val images, all 500x375), then runs the demo's
retrain recipe (prepare -> tune: U-Net and FCN-8s at width 0.125, one trial of one epoch each ->
ensemble -> promote) in this process, and prints the driver's peak resident memory from getrusage. The
CRF search is off unless --crf: over every selected val image it takes hours on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import yaml

from pipelines.data.synth import SynthConfig, synthesize
from pipelines.jobs.demo import DemoConfig, demo_retrain_config
from pipelines.jobs.retrain import load_retrain, retrain
from pipelines.runtime import ensure_ray


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--val", type=int, default=400, help="val images (default: 400)")
    parser.add_argument("--workdir", default="bench/out/retrain_memory")
    parser.add_argument("--crf", action="store_true", help="also search the CRF over the val split")
    args = parser.parse_args()

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = synthesize(
        SynthConfig(
            layout="voc", out=str(work / "voc"), num_train=32, num_val=args.val, seed=0, size=(375, 500)
        )
    )
    cfg = demo_retrain_config(DemoConfig(workdir=str(work), epochs=1, trials=1), source, work)
    cfg["crf"] = args.crf
    unet = cfg["search"]["architectures"]["unet"]
    cfg["search"]["architectures"] = {
        "unet": unet,
        "fcn8s": {"base": {**unet["base"], "model_args": {"width": 0.125}}, "space": unet["space"]},
    }
    (work / "retrain.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ensure_ray()
    result = retrain(load_retrain(str(work / "retrain.yaml")))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "val_images": args.val,
        "driver_peak_rss_mb": round(peak_mb, 1),
        "target_mb": 2048,
        "wall_s": round(time.perf_counter() - started, 1),
        "steps_s": {k: round(v["seconds"], 1) for k, v in result["steps"].items()},
    }
    print(json.dumps(out, indent=1))
    (work / "result.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
