import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segmodels.metrics import ConfusionMatrix

NUM_CLASSES = 6  # truth uses 0-2, prediction 0-2 and 4: class 3 and 5 absent, class 4 predicted only


def random_batch(seed: int, n: int = 2, h: int = 9, w: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.2] = 255
    pred = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (n, h, w), generator=g)]
    agree = torch.rand(n, h, w, generator=g) < 0.5  # make the prediction better than chance
    pred[agree] = target.clamp(max=2)[agree]
    return pred, target


def brute_force(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """The FCN paper's formulas, pixel by pixel and class by class."""
    n = [[0] * num_classes for _ in range(num_classes)]
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t != 255:
            n[t][p] += 1
    t = [sum(n[i]) for i in range(num_classes)]
    predicted = [sum(n[j][i] for j in range(num_classes)) for i in range(num_classes)]
    seen = [i for i in range(num_classes) if t[i] + predicted[i] > 0]
    iu = {i: n[i][i] / (t[i] + predicted[i] - n[i][i]) for i in seen}
    in_truth = [i for i in range(num_classes) if t[i] > 0]
    return {
        "pixel_acc": sum(n[i][i] for i in range(num_classes)) / sum(t),
        "mean_acc": sum(n[i][i] / t[i] for i in in_truth) / len(in_truth),
        "miou": sum(iu.values()) / len(iu),
        "fwiou": sum(t[i] * iu[i] for i in seen) / sum(t),
        "per_class_iou": [iu.get(i) for i in range(num_classes)],
        "per_class_acc": [n[i][i] / t[i] if t[i] else None for i in range(num_classes)],
    }


def assert_metrics_equal(got: dict, expected: dict) -> None:
    for key in ("pixel_acc", "mean_acc", "miou", "fwiou"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    for key in ("per_class_iou", "per_class_acc"):
        assert [v is None for v in got[key]] == [v is None for v in expected[key]], key
        assert [v for v in got[key] if v is not None] == pytest.approx(
            [v for v in expected[key] if v is not None]
        )


def test_matches_brute_force_fcn_formulas_with_ignore_and_absent_classes():
    pred, target = random_batch(0)
    cm = ConfusionMatrix(NUM_CLASSES)
    cm.update(pred, target)
    got = cm.compute()
    assert_metrics_equal(got, brute_force(pred, target, NUM_CLASSES))
    assert got["per_class_iou"][3] is None and got["per_class_iou"][5] is None
    assert got["per_class_iou"][4] == 0.0  # predicted, never true: IU 0, counted in the mean
    assert got["per_class_acc"][4] is None  # not in the truth: left out of mean accuracy
    assert int(cm.matrix.sum()) == int((target != 255).sum())


def test_hand_computed_example():
    target = torch.tensor([[[0, 0], [1, 255]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    got = cm.compute()
    assert got["per_class_iou"] == [0.5, 0.5, None]
    assert got["miou"] == 0.5
    assert got["pixel_acc"] == pytest.approx(2 / 3)
    assert got["mean_acc"] == pytest.approx(0.75)
    assert got["fwiou"] == pytest.approx(0.5)


def test_accumulating_batches_equals_one_shot():
    batches = [random_batch(seed) for seed in range(4)]
    accumulated = ConfusionMatrix(NUM_CLASSES)
    for pred, target in batches:
        accumulated.update(pred, target)
    one_shot = ConfusionMatrix(NUM_CLASSES)
    one_shot.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert torch.equal(accumulated.matrix, one_shot.matrix)
    assert accumulated.compute() == one_shot.compute()


def test_merge_reset_and_json_round_trip():
    a, b = ConfusionMatrix(NUM_CLASSES), ConfusionMatrix(NUM_CLASSES)
    a.update(*random_batch(1))
    b.update(*random_batch(2))
    both = ConfusionMatrix(NUM_CLASSES)
    both.update(*random_batch(1))
    both.update(*random_batch(2))
    assert torch.equal(a.merge(b).matrix, both.matrix)

    restored = ConfusionMatrix.from_list(json.loads(json.dumps(a.to_list())))
    assert torch.equal(restored.matrix, a.matrix) and restored.matrix.dtype == torch.int64
    assert ConfusionMatrix.from_matrix(a.matrix.numpy()).compute() == a.compute()

    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ConfusionMatrix(NUM_CLASSES + 1))
    a.reset()
    assert int(a.matrix.sum()) == 0
    assert math.isnan(a.compute()["miou"])


def test_update_rejects_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="square"):
        ConfusionMatrix.from_matrix([[1, 2, 3]])


def test_all_reduce_is_a_no_op_without_a_process_group():
    cm = ConfusionMatrix(NUM_CLASSES)
    cm.update(*random_batch(3))
    before = cm.matrix.clone()
    assert torch.equal(cm.all_reduce_().matrix, before)


def _all_reduce_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(NUM_CLASSES)
        cm.update(*random_batch(10 + rank))
        cm.all_reduce_()
        torch.save(cm.matrix, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_sums_matrices_over_two_gloo_processes(tmp_path, monkeypatch):
    # Spawned children re-import this module by its pytest name (tests.segmodels.test_metrics).
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    context = mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process gloo all_reduce did not finish within 60 s")
    expected = ConfusionMatrix(NUM_CLASSES)
    expected.update(*random_batch(10))
    expected.update(*random_batch(11))
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), expected.matrix)
