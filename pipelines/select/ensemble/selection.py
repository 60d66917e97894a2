"""Greedy forward ensemble selection with replacement (Caruana et al., ICML 2004) as passes over shards.

Each round adds the candidate (possibly one already chosen, which raises its weight) that most improves
mIoU; the best prefix wins, so the ensemble never scores below its best member. A round is one Ray task
per shard returning, for every candidate k, the confusion matrix of argmax(current counts + k) on that
shard's pixels; the driver sums them, so it holds K x C x C integers whatever the split size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipelines.select.ensemble.scoring import Shard, read_shard


@dataclass(frozen=True)
class Selection:
    """The chosen ensemble: member counts by candidate index, its confusion matrix and mIoU."""

    counts: Counter
    confusion: np.ndarray  # C x C, rows = truth
    miou: float
    history: list[float]  # best mIoU of each round
    member_miou: list[float]  # each candidate alone
    num_candidates: int

    @property
    def chosen(self) -> list[int]:
        return sorted(self.counts)

    @property
    def weights(self) -> list[float]:
        total = sum(self.counts.values())
        return [self.counts[c] / total for c in self.chosen]

    @property
    def candidate_weights(self) -> list[float]:
        """One weight per candidate (0 for those not chosen), summing to 1."""
        total = sum(self.counts.values())
        return [self.counts[c] / total for c in range(self.num_candidates)]


def confusion_scores(confusion: np.ndarray) -> dict:
    """The FCN paper's metrics of a C x C confusion matrix (segmodels.metrics.ConfusionMatrix.compute)."""
    import torch

    from segmodels.metrics import ConfusionMatrix

    cm = ConfusionMatrix(confusion.shape[0])
    cm.matrix = torch.from_numpy(np.asarray(confusion, dtype=np.int64))
    return cm.compute()


def miou(confusion: np.ndarray) -> float:
    return float(confusion_scores(confusion)["miou"])


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """C x C int64 confusion of same-shaped class maps, pixels labelled `ignore_index` left out."""
    valid = truth != ignore_index
    index = truth[valid].astype(np.int64) * num_classes + pred[valid]
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def round_confusions(shard_uri: str, counts: list[int], num_classes: int) -> np.ndarray:
    """K x C x C: confusion on one shard of the ensemble `counts` plus one more of each candidate k."""
    from segmodels.ensemble import combine_probs

    shard = read_shard(shard_uri)
    valid = shard["truth"] != 255
    truth = shard["truth"][valid]
    probs = shard["probs"][:, :, valid].astype(np.float32)  # K,C,P
    out = np.zeros((len(probs), num_classes, num_classes), np.int64)
    for k in range(len(probs)):
        weights = list(counts)
        weights[k] += 1
        used = [j for j, w in enumerate(weights) if w]
        pred = combine_probs((probs[j] for j in used), [float(weights[j]) for j in used]).argmax(0)
        out[k] = confusion(pred, truth, num_classes)
    return out


def sum_over_shards(task, shards: list[Shard], *args) -> np.ndarray:
    """Run `task.remote(shard_uri, *args)` on every shard and sum the results as they arrive."""
    import ray

    pending = [task.remote(s.uri, *args) for s in shards]
    total = None
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        part = ray.get(done[0])
        total = part if total is None else total + part
    return total


def greedy_select(shards: list[Shard], num_candidates: int, num_classes: int, rounds: int) -> Selection:
    """Greedy selection over scored shards (see the module docstring); ties keep the smaller ensemble."""
    import ray

    from pipelines.errors import UserError

    if not shards:
        raise UserError("the selection split has no images: pick a split with images (--split)")
    task = ray.remote(num_cpus=1)(round_confusions)
    counts: Counter = Counter()
    history: list[float] = []
    best: tuple[Counter, np.ndarray | None, float] = (Counter(), None, -1.0)
    member_miou: list[float] = []
    for round_index in range(rounds):
        vector = [counts[k] for k in range(num_candidates)]
        per_candidate = sum_over_shards(task, shards, vector, num_classes)
        scores = [miou(cm) for cm in per_candidate]
        if round_index == 0:
            member_miou = scores
        pick = int(np.nanargmax(scores))
        counts[pick] += 1
        history.append(scores[pick])
        if scores[pick] > best[2] + 1e-9:
            best = (counts.copy(), per_candidate[pick], scores[pick])
    return Selection(
        counts=best[0],
        confusion=best[1],
        miou=best[2],
        history=history,
        member_miou=member_miou,
        num_candidates=num_candidates,
    )


def average_all(shards: list[Shard], num_candidates: int, num_classes: int) -> Selection:
    """No selection: every candidate once with equal weight, as EDeconvNet averages DeconvNet and FCN-8s
    (Noh et al., section 4.2). Two passes: each candidate alone, then the mean of all."""
    import ray

    from pipelines.errors import UserError

    if not shards:
        raise UserError("the selection split has no images: pick a split with images (--split)")
    task = ray.remote(num_cpus=1)(round_confusions)
    alone = sum_over_shards(task, shards, [0] * num_candidates, num_classes)
    everyone = sum_over_shards(task, shards, [0] + [1] * (num_candidates - 1), num_classes)[0]
    score = miou(everyone)
    return Selection(
        counts=Counter(range(num_candidates)),
        confusion=everyone,
        miou=score,
        history=[score],
        member_miou=[miou(cm) for cm in alone],
        num_candidates=num_candidates,
    )
