"""Sharded, batched validation: each worker scores only its share of val, and the sum is exact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipelines.config import TrainConfig
from pipelines.data.dataset import open_prepared
from pipelines.train.loop import ValShard, val_batch_plan, validate

SIZES = [(4, 6), (5, 5), (4, 6), (4, 6), (5, 5), (3, 3), (4, 6), (4, 6), (5, 5)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_gives_every_row_once_in_same_size_batches_whatever_the_world(world):
    shards = [val_batch_plan(SIZES, 2, rank, world) for rank in range(world)]
    batches = [batch for shard in shards for batch in shard]
    assert sorted(i for batch in batches for i in batch) == list(range(len(SIZES)))
    assert all(len({SIZES[i] for i in batch}) == 1 and 1 <= len(batch) <= 2 for batch in batches)
    # The same batches as one worker makes, dealt round-robin: predictions cannot depend on `world`.
    assert sorted(batches) == sorted(val_batch_plan(SIZES, 2, 0, 1))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


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
print("RESULT", json.dumps({"rows": len(shard.images), "matrix": cm.to_list()}))
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
    assert len(whole.images) == val_rows
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
