"""Ensemble selection keeps the driver's memory bounded, whatever the split size and with a small object store."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines
from pipelines.data.dataset import Manifest, open_prepared

pytestmark = pytest.mark.slow

COPIES = 16  # 12 val images -> 192
CANDIDATES = 2
BOUND_MB = 150  # driver RSS growth allowed while scoring and selecting

# Run in a fresh process: its own Ray with a 100 MB object store, and a driver whose RSS is its own.
CHILD = """
import json, logging, sys, threading, time
import ray
ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
         logging_level=logging.WARNING)
from pipelines.data.dataset import open_prepared
from pipelines.select.ensemble.scoring import score_candidates
from pipelines.select.ensemble.selection import greedy_select

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

data_dir, out, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
data = open_prepared(data_dir)
# Warm-up on two images, so the modules imported on first use are in the baseline.
greedy_select(score_candidates(folders, data, "val", out + "/warm", max_images=2), len(folders), 21, 1)
peak, done = [rss_mb()], threading.Event()
base = peak[0]

def watch():
    while not done.is_set():
        peak.append(rss_mb())
        time.sleep(0.02)

thread = threading.Thread(target=watch)
thread.start()
shards = score_candidates(folders, data, "val", out + "/run", stride=2, images_per_shard=8)
selection = greedy_select(shards, len(folders), 21, 2)
done.set()
thread.join()
print(json.dumps({"base": base, "peak": max(peak), "images": sum(s.images for s in shards),
                  "miou": selection.miou}))
"""


def tile_split(src: str, dst, copies: int) -> int:
    """A copy of `src` whose val split holds every val image `copies` times (new ids); returns pixels/copy."""
    data = open_prepared(src)
    table = pa.concat_tables(pq.read_table(f) for f in data.split_files("val"))
    (dst / "val").mkdir(parents=True)
    for i in range(copies):
        ids = pa.array([f"{x}-{i}" for x in table["image_id"].to_pylist()])
        pq.write_table(table.set_column(0, "image_id", ids), dst / "val" / f"part-{i}.parquet")
    info = data.manifest.splits["val"]
    files = tuple(f"val/part-{i}.parquet" for i in range(copies))
    manifest = Manifest.from_dict(
        {
            **data.manifest.to_dict(),
            "splits": {"val": {**dataclasses.asdict(info), "rows": info.rows * copies, "files": files}},
        }
    )
    manifest.save(str(dst / "manifest.json"))
    return sum(h * w for h, w in zip(table["height"].to_pylist(), table["width"].to_pylist(), strict=True))


def test_driver_memory_stays_bounded_on_a_large_split(prepared_voc, make_candidate, tmp_path):
    data = open_prepared(prepared_voc)
    pixels = tile_split(prepared_voc, tmp_path / "big", COPIES)
    folders = [str(make_candidate(tmp_path / f"c{i}", seed=i, bias={0: 1.0 + i})) for i in range(CANDIDATES)]
    # What holding every candidate's float32 maps in the driver (the in-memory algorithm) would need.
    in_memory_mb = CANDIDATES * COPIES * pixels * data.num_classes * 4 / 2**20
    assert in_memory_mb > 2 * BOUND_MB

    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "shards"), *folders],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(Path(pipelines.__file__).parent.parent)},
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["images"] == 12 * COPIES
    grown = result["peak"] - result["base"]
    print(f"driver RSS {result['base']:.0f} -> {result['peak']:.0f} MB; in-memory maps {in_memory_mb:.0f} MB")
    assert grown < BOUND_MB, f"driver RSS grew {grown:.0f} MB while selecting on {result['images']} images"
