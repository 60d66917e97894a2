"""Sharded, batched validation: each worker scores only its share of val, and the sum is exact."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import TrainConfig
from pipelines.data.dataset import (
    IMAGE,
    MASK,
    Manifest,
    SplitInfo,
    decode_mask,
    encode_mask,
    open_prepared,
    parquet_schema,
)
from pipelines.errors import UserError
from pipelines.train.loop import ValShard, val_batch_plan, validate

SIZES = [(4, 6), (5, 5), (4, 6), (4, 6), (5, 5), (3, 3), (4, 6), (4, 6), (5, 5)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_gives_every_row_once_in_same_size_batches_whatever_the_world(world):
    shards = [val_batch_plan(SIZES, 2, rank, world) for rank in range(world)]
    batches = [batch for shard in shards for batch in shard]
    assert sorted(i for batch in batches for i in batch) == list(range(len(SIZES)))
    assert all(len({SIZES[i] for i in batch}) == 1 and 1 <= len(batch) <= 2 for batch in batches)
    # The same batches as one worker makes, in consecutive runs: predictions cannot depend on `world`.
    assert batches == val_batch_plan(SIZES, 2, 0, 1)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def write_prepared(root, rows: int, shard_rows: int, group_rows: int, size=(6, 8)):
    """A prepared "val" split written directly: row i's mask is all i, shards of `shard_rows` rows in
    row groups of `group_rows`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = io.BytesIO()
    Image.new("RGB", size[::-1], (90, 120, 150)).save(png, format="PNG")
    files = []
    for start in range(0, rows, shard_rows):
        ids = range(start, min(rows, start + shard_rows))
        table = pa.Table.from_pylist(
            [
                {"image_id": f"img{i}", IMAGE: png.getvalue(), MASK: encode_mask(np.full(size, i, np.uint8)),
                 "height": size[0], "width": size[1]}
                for i in ids
            ],
            schema=parquet_schema(),
        )  # fmt: skip
        files.append(f"val/part-{start:03d}.parquet")
        (root / "val").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / files[-1], row_group_size=group_rows)
    classes = tuple(f"c{i}" for i in range(rows))
    Manifest(
        dataset="voc",
        classes=classes,
        palette=tuple((i, i, i) for i in range(rows)),
        splits={"val": SplitInfo(rows, tuple(files), 0, 0, (size[0] * size[1],) * rows, 0)},
        source="test",
        fingerprint="0" * 64,
        created="2026-01-01T00:00:00+00:00",
    ).save(str(root / "manifest.json"))
    return open_prepared(root)


def test_each_rank_reads_only_the_row_groups_of_its_rows_once(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    data = write_prepared(tmp_path, rows=12, shard_rows=6, group_rows=2)
    read: list[int] = []
    read_row_group = pq.ParquetFile.read_row_group

    def counting(self, index, columns=None, **kwargs):
        table = read_row_group(self, index, columns=columns, **kwargs)
        read.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    seen = []
    for rank in range(2):
        shard = ValShard(data, 3, rank, 2)  # batches of 3 rows over row groups of 2: rows 2-3 and 8-9 shared
        read.clear()
        masks = [mask for _, mask in shard]
        rows = [int(mask[0, 0]) for batch in masks for mask in batch]
        assert rows == [i for batch in shard.batches for i in batch] and shard.rows == 6
        assert sum(read) == 6, "each of the rank's row groups read once, no other"
        seen += rows
    assert sorted(seen) == list(range(12))
    # Any order, repeats included; a row past the end names the split.
    table = data.read_rows("val", [MASK], [7, 0, 7])
    assert [decode_mask(m)[0, 0] for m in table[MASK].to_pylist()] == [7, 0, 7]
    with pytest.raises(IndexError, match="'val', which has 12 rows"):
        data.read_rows("val", [MASK], [12])


def test_val_slide_predicts_large_images_window_by_window():
    seen: list[tuple[int, int]] = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    batches = [
        (np.zeros((1, 12, 20, 3), np.uint8), np.zeros((1, 12, 20), np.uint8)),
        (np.zeros((1, 6, 8, 3), np.uint8), np.zeros((1, 6, 8), np.uint8)),
    ]
    cm = validate(Recorder(), batches, 2, TrainConfig(val_slide=(8, 6)), torch.device("cpu"))
    assert seen == [(8, 8)] * 6 + [(6, 8)], "windows over the large image, the small one whole"
    assert cm.matrix.sum() == 12 * 20 + 6 * 8
    seen.clear()
    validate(Recorder(), batches, 2, TrainConfig(), torch.device("cpu"))
    assert seen == [(12, 20), (6, 8)]
    with pytest.raises(UserError, match="0 < stride <= crop"):
        TrainConfig(val_slide=(8, 9))


TWO_RANKS = r"""
import json, sys
import torch, torch.distributed as dist
from safetensors.torch import load_file
from pipelines.config import TrainConfig
from pipelines.data.dataset import open_prepared
from pipelines.train.loop import ValShard, validate
from segmodels import build_model

data_path, weights, store, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
net = build_model("unet", 21, width=0.125, padding="same")
net.load_state_dict(load_file(weights))
shard = ValShard(open_prepared(data_path), 3, rank, 2)
cm = validate(net, shard, 21, TrainConfig(data=data_path), torch.device("cpu"))
print("RESULT", json.dumps({"rows": shard.rows, "matrix": cm.to_list()}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_one_and_two_workers_give_identical_confusion_matrices(prepared_voc, tmp_path):
    from safetensors.torch import save_file

    from segmodels import build_model

    torch.manual_seed(0)
    net = build_model("unet", 21, width=0.125, padding="same")
    weights = tmp_path / "net.safetensors"
    save_file(net.state_dict(), str(weights))
    data = open_prepared(prepared_voc)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two ranks: the same kernels on the same batches
    try:
        whole = ValShard(data, 3, 0, 1)
        one = validate(net, whole, 21, TrainConfig(data=prepared_voc), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    val_rows = data.manifest.splits["val"].rows
    assert whole.rows == val_rows
    # Every labelled pixel of val counted exactly once.
    assert one.matrix.sum() == sum(data.manifest.splits["val"].class_pixels)
    assert int((one.matrix.sum(0) > 0).sum()) > 1, "a constant prediction would prove little"

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_RANKS, prepared_voc, str(weights), str(tmp_path / "store"), str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        assert line, out[-2000:] + err[-3000:]
        results.append(json.loads(line.removeprefix("RESULT ")))
    # Each rank decoded only its share, and after the all-reduce both hold the single worker's matrix.
    assert sum(r["rows"] for r in results) == val_rows
    assert all(0 < r["rows"] < val_rows for r in results)
    assert results[0]["matrix"] == results[1]["matrix"] == one.to_list()
