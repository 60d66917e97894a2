"""Confusion-matrix metrics of the FCN paper (Long et al., CVPR 2015, section 5).

With n_ij = pixels of true class i predicted as j and t_i = sum_j n_ij:
pixel accuracy = sum_i n_ii / sum_i t_i; mean accuracy = mean_i n_ii / t_i;
mean IU = mean_i n_ii / (t_i + sum_j n_ji - n_ii); frequency weighted IU = sum_i t_i IU_i / sum_k t_k.
Classes absent from both truth and prediction are left out of the means; a class that is predicted but
never true has IU 0 and counts in the mean IU. Mean accuracy averages over classes present in the truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Accumulates a C x C int64 confusion matrix (rows = truth, columns = prediction), ignoring `ignore_index`."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @classmethod
    def from_matrix(
        cls, matrix: torch.Tensor | np.ndarray | Sequence[Sequence[int]], ignore_index: int = 255
    ) -> ConfusionMatrix:
        """A ConfusionMatrix holding a copy of `matrix` (C x C counts, rows = truth)."""
        counts = (
            matrix.detach().cpu() if isinstance(matrix, torch.Tensor) else torch.as_tensor(np.asarray(matrix))
        )
        counts = counts.to(torch.int64).clone()
        if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or bool((counts < 0).any()):
            raise ValueError(
                f"a confusion matrix must be square with non-negative counts, got shape {tuple(counts.shape)}"
            )
        confusion = cls(counts.shape[0], ignore_index)
        confusion.matrix = counts
        return confusion

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[int]], ignore_index: int = 255) -> ConfusionMatrix:
        """Inverse of `to_list` (a JSON-ready nested list)."""
        return cls.from_matrix(rows, ignore_index)

    def to_list(self) -> list[list[int]]:
        """The counts as a nested list of ints, for JSON."""
        return self.matrix.tolist()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: pred (N,H,W class indices) against target (N,H,W, `ignore_index` = unlabelled)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}: pass class indices "
                "(probs.argmax(1)) at the label size"
            )
        target = target.to(device=pred.device, dtype=torch.int64)
        valid = target != self.ignore_index
        truth = target[valid]
        guess = pred[valid].to(torch.int64)
        c = self.num_classes
        if truth.numel():
            lo, hi = (
                int(torch.minimum(truth.min(), guess.min())),
                int(torch.maximum(truth.max(), guess.max())),
            )
            if lo < 0 or hi >= c:
                raise ValueError(
                    f"class indices must lie in 0..{c - 1} (or be ignore_index={self.ignore_index} in the "
                    f"target); got values from {lo} to {hi}"
                )
        counts = torch.bincount(truth * c + guess, minlength=c * c).reshape(c, c)
        self.matrix += counts.cpu()

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (e.g. from another worker); returns self."""
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore_index={other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore_index={self.ignore_index})"
            )
        self.matrix += other.matrix
        return self

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce_(self) -> ConfusionMatrix:
        """Sum the matrix over all ranks when torch.distributed is initialised (no-op otherwise); returns self."""
        if dist.is_available() and dist.is_initialized():
            # NCCL only reduces CUDA tensors; gloo reduces CPU ones.
            device = (
                torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            )
            summed = self.matrix.to(device)
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            self.matrix = summed.cpu()
        return self

    def compute(self) -> dict:
        """{"miou", "pixel_acc", "mean_acc", "fwiou", "per_class_iou", "per_class_acc"}.

        Per-class entries are None for classes left out (IU: absent from truth and prediction; accuracy:
        absent from truth). Means over no class at all (an empty matrix) are NaN.
        """
        n = self.matrix.to(torch.float64)
        hits = n.diagonal()
        truth = n.sum(dim=1)
        union = truth + n.sum(dim=0) - hits
        iou = [float(h / u) if u > 0 else None for h, u in zip(hits, union, strict=True)]
        acc = [float(h / t) if t > 0 else None for h, t in zip(hits, truth, strict=True)]
        total = float(truth.sum())
        weighted_iou = sum(float(t) * i for t, i in zip(truth, iou, strict=True) if i is not None)
        return {
            "miou": _mean(iou),
            "pixel_acc": float(hits.sum()) / total if total else math.nan,
            "mean_acc": _mean(acc),
            "fwiou": weighted_iou / total if total else math.nan,
            "per_class_iou": iou,
            "per_class_acc": acc,
        }


def _mean(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan
