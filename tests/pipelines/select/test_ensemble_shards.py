"""Ensemble selection over scored shards: same result as the in-memory algorithm, CRF search on Ray tasks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pipelines.data.dataset import open_prepared
from pipelines.model_uri import fetched_model
from pipelines.select.ensemble.crf_search import coarse_settings, search_crf
from pipelines.select.ensemble.scoring import image_probs, read_shard, score_candidates
from pipelines.select.ensemble.selection import greedy_select
from segmodels.metrics import ConfusionMatrix

pytestmark = pytest.mark.slow


def reference_greedy(probs: list[list[np.ndarray]], truths: list[np.ndarray], num_classes: int, rounds: int):
    """The in-memory algorithm the shard passes replace: probs[c][i] is candidate c's C,H,W map of image i."""

    def miou_of(preds):
        cm = ConfusionMatrix(num_classes)
        for pred, truth in zip(preds, truths, strict=True):
            cm.update(torch.from_numpy(pred)[None].long(), torch.from_numpy(truth)[None].long())
        return cm.compute()["miou"]

    sums = [np.zeros_like(p, dtype=np.float32) for p in probs[0]]
    counts: Counter = Counter()
    history, best = [], (Counter(), -1.0)
    for _ in range(rounds):
        scores = [miou_of([(s + p).argmax(0) for s, p in zip(sums, cand, strict=True)]) for cand in probs]
        pick = int(np.nanargmax(scores))
        counts[pick] += 1
        sums = [s + p for s, p in zip(sums, probs[pick], strict=True)]
        history.append(float(scores[pick]))
        if scores[pick] > best[1] + 1e-9:
            best = (counts.copy(), float(scores[pick]))
    return best[0], best[1], history


@pytest.fixture(scope="module")
def scored(prepared_voc, tmp_path_factory, make_candidate):
    root = tmp_path_factory.mktemp("shards")
    data = open_prepared(prepared_voc)
    biases = [{0: 3.0}, {0: 2.0, 7: 2.5}, {0: 1.0, 3: 2.0, 12: 2.0}]
    folders = [make_candidate(root / f"c{i}", seed=i, bias=b) for i, b in enumerate(biases)]
    shards = score_candidates(folders, data, "val", str(root / "out"), stride=2, images_per_shard=5)
    return data, shards


def test_selection_over_shards_equals_the_in_memory_algorithm(scored):
    data, shards = scored
    assert sum(s.images for s in shards) == 12 and len(shards) >= 3 and max(s.images for s in shards) <= 5
    contents = [read_shard(s.uri) for s in shards]
    per_image = [p for c in contents for p in image_probs(c)]
    ends = [np.cumsum([h * w for h, w in c["grid"]]) for c in contents]
    truths = [
        t.reshape(h, w)
        for c, e in zip(contents, ends, strict=True)
        for t, (h, w) in zip(np.split(c["truth"], e[:-1]), c["grid"], strict=True)
    ]
    assert per_image[0].shape[:2] == (3, 21) and per_image[0].shape[2:] == truths[0].shape
    probs = [[p[c] for p in per_image] for c in range(3)]
    want_counts, want_miou, want_history = reference_greedy(probs, truths, data.num_classes, rounds=4)

    got = greedy_select(shards, 3, data.num_classes, rounds=4)
    assert got.counts == want_counts
    assert got.miou == pytest.approx(want_miou, abs=1e-12)
    assert got.history == pytest.approx(want_history, abs=1e-12)
    assert len(set(np.round(got.member_miou, 6))) == 3  # the candidates really differ
    assert got.miou >= max(got.member_miou) - 1e-12
    assert abs(sum(got.candidate_weights) - 1.0) < 1e-9


def test_crf_search_runs_the_grid_and_a_finer_stage_on_a_subset(scored):
    data, shards = scored
    result = search_crf(shards, [0.5, 0.5, 0.0], data.num_classes, max_images=7, grid="small")
    assert result.images == 7
    assert len(coarse_settings("small")) < result.settings_tried <= len(coarse_settings("small")) + 6
    assert 0.0 <= result.miou_without <= 1.0 and 0.0 <= result.miou_with <= 1.0
    if result.params is None:
        assert result.miou_with <= result.miou_without
    else:
        assert result.miou_with > result.miou_without and result.params["iterations"] == 10


def test_crf_tasks_reserve_their_memory_and_a_node_too_small_is_an_error(scored, monkeypatch):
    from pipelines import runtime
    from pipelines.data.dataset import decode_mask
    from pipelines.errors import UserError
    from pipelines.select.ensemble.crf_search import crf_task_memory
    from pipelines.select.ensemble.scoring import unpack
    from segmodels.crf import crf_memory_bytes

    data, shards = scored
    shard = read_shard(shards[0].uri)
    sizes = [
        decode_mask(unpack(shard["mask_bytes"], shard["mask_offsets"], i)).shape
        for i in range(shards[0].images)
    ]
    need = crf_task_memory(shards[0].uri, shards[0].images, data.num_classes)
    largest_crf = max(crf_memory_bytes(h, w, data.num_classes) for h, w in sizes)
    assert largest_crf < need < largest_crf + 64 * 2**20  # plus the shard's maps: a few MB here
    assert crf_task_memory(shards[0].uri, 1, data.num_classes) <= need
    monkeypatch.setattr(runtime, "largest_node_memory", lambda: need - 1)
    with pytest.raises(UserError, match=r"GiB of Ray memory on the largest node"):
        search_crf(shards[:1], [0.5, 0.5, 0.0], data.num_classes, max_images=shards[0].images)


def test_crf_search_defaults_to_deeplabs_100_images():
    from pipelines.cli import build_parser
    from pipelines.select.ensemble import EnsembleConfig

    assert EnsembleConfig(candidates=("a",), data="d").crf_images == 100
    args = build_parser().parse_args(["ensemble", "--candidates", "a", "--data", "d"])
    assert args.crf_images is None and args.crf_grid is None  # not given: EnsembleConfig's defaults apply
    # The paper's search space by default (2 x 6 x 4 first-round points), the small one on request.
    assert EnsembleConfig(candidates=("a",), data="d").crf_grid == "deeplab"
    assert len(coarse_settings()) == 48 and len(coarse_settings("small")) == 12
    args = build_parser().parse_args(["ensemble", "--candidates", "a", "--data", "d", "--crf-grid", "small"])
    assert args.crf_grid == "small"


def test_segpipe_ensemble_selects_tunes_crf_and_registers(prepared_voc, make_candidate, tmp_path):
    import json

    from pipelines import tracking
    from pipelines.cli import main
    from segmodels.artifact import load_model_dir

    biases = [{0: 3.0}, {0: 2.0, 7: 2.5}]
    folders = [str(make_candidate(tmp_path / f"c{i}", seed=i, bias=b)) for i, b in enumerate(biases)]
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "result.json"
    args = ["ensemble", "--candidates", *folders, "--data", prepared_voc, "--register-as", "shards-model"]
    args += [
        "--crf",
        "--crf-images",
        "3",
        "--crf-grid",
        "small",
        "--stride",
        "2",
        "--max-members",
        "3",
        "--scratch",
        str(tmp_path / "s"),
    ]
    args += ["--tracking-uri", uri, "--experiment", "shards", "--json-out", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["selection_images"] == 12 and len(result["selection_history"]) == 3
    assert result["metrics"]["miou"] >= max(result["candidates"].values()) - 1e-9
    assert result["crf_search"]["images"] == 3 and (result["crf"] is None) == (
        result["crf_search"]["params"] is None
    )
    assert result["model_uri"] == "models:/shards-model/1"
    assert tracking.alias_version(tracking.connect(uri), "shards-model", "challenger") == "1"
    assert not list((tmp_path / "s").rglob("*.npz"))  # the shards are scratch, removed afterwards

    with fetched_model(result["model_uri"], uri) as folder:
        model = load_model_dir(folder)
    assert model.spec.ensemble_weights == pytest.approx(result["weights"])
    assert model.spec.metrics["val_miou"] == result["metrics"]["miou"] and model.spec.crf == result["crf"]
