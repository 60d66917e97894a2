"""Check: a training worker's memory for validation on Cityscapes-shaped val data (2048x1024 images).

    .venv/bin/python bench/val_memory.py [--val 24] [--world 2] [--batch 4] [--slide 768 512]
                                         [--workdir bench/out/val_memory]

Generates a Cityscapes-layout dataset (2 train, --val val images at 2048x1024) and prepares it once, then
runs one fresh process per rank of a --world-worker run that does what a training worker does for
validation: open the prepared dataset, build its `ValShard`, `validate` --passes times (U-Net at width 0.125, one
torch thread). Each process reports its resident memory (VmRSS) after building the model (baseline), after
building the ValShard (held for the whole run), at the peak of each validation (VmHWM, reset before it)
and after it (held between epochs), in MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path

import torch

from pipelines.config import TrainConfig
from pipelines.data.dataset import open_prepared
from pipelines.train.loop import ValShard, validate
from segmodels import build_model


def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


data_path, rank, world, batch, passes, slide = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
torch.set_num_threads(1)
cfg = TrainConfig(data=data_path, val_batch_size=batch, **({"val_slide": json.loads(slide)} if slide else {}))
data = open_prepared(data_path)
net = build_model("unet", data.num_classes, width=0.125, padding="same")
out = {"rank": rank, "baseline_mb": status("VmRSS")}
reset_peak()
shard = ValShard(data, batch, rank, world)
out["shard_peak_mb"], out["after_shard_mb"] = status("VmHWM"), status("VmRSS")
for epoch in range(1, passes + 1):
    reset_peak()
    started = time.perf_counter()
    validate(net, shard, data.num_classes, cfg, torch.device("cpu"))
    out[f"val{epoch}_s"] = round(time.perf_counter() - started, 1)
    out[f"val{epoch}_peak_mb"], out[f"after_val{epoch}_mb"] = status("VmHWM"), status("VmRSS")
print("RESULT", json.dumps(out))
"""


def prepared_dataset(work: Path, num_val: int) -> str:
    """Synthetic Cityscapes at the published size, prepared once per (work dir, --val)."""
    out = work / f"prepared-{num_val}"
    if (out / "manifest.json").is_file():
        return str(out)
    from pipelines.data.prepare import PrepareConfig, prepare
    from pipelines.data.synth import SynthConfig, synthesize

    source = synthesize(
        SynthConfig(
            layout="cityscapes",
            out=str(work / f"src-{num_val}"),
            num_train=2,
            num_val=num_val,
            size=(1024, 2048),
        )
    )
    prepare(PrepareConfig(dataset="cityscapes", root=str(source), out=str(out), progress=False))
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--val", type=int, default=24, help="val images at 2048x1024 (default: 24)")
    parser.add_argument("--world", type=int, default=2, help="training workers sharing val (default: 2)")
    parser.add_argument("--batch", type=int, default=4, help="val_batch_size (default: 4)")
    parser.add_argument(
        "--slide", type=int, nargs=2, metavar=("CROP", "STRIDE"), help="val_slide (default: whole images)"
    )
    parser.add_argument("--passes", type=int, default=2, help="validations per process (default: 2)")
    parser.add_argument("--workdir", default="bench/out/val_memory")
    args = parser.parse_args()

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepared_dataset(work, args.val)
    slide = json.dumps(args.slide) if args.slide else ""
    ranks = []
    for rank in range(args.world):  # one at a time: each figure is one process's own
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                data,
                str(rank),
                str(args.world),
                str(args.batch),
                str(args.passes),
                slide,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"rank {rank} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        ranks.append(json.loads(line.removeprefix("RESULT ")))
    out = {
        "val_images": args.val,
        "world": args.world,
        "val_batch_size": args.batch,
        "val_slide": args.slide,
        "ranks": ranks,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(out, indent=1))
    (work / "result.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
