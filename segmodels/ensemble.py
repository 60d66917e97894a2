"""Ensembles that average class probabilities, e.g. the DeconvNet paper's EDeconvNet.

EDeconvNet (Noh et al., ICCV 2015, section 4.2) averages the class-probability maps of DeconvNet and
FCN-8s: `Ensemble([deconvnet, fcn8s])`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from segmodels.inference import forward_probs, predict_whole


def combine_probs(probs: Iterable, weights: Iterable[float]):
    """sum_k w_k * p_k over members' class probabilities (tensors or arrays, each C,... or N,C,...).

    The one place where members' probabilities are combined: `Ensemble` passes weights normalised to sum
    1 (a weighted mean); ensemble selection passes integer member counts, whose argmax is the mean's.
    `probs` may be a generator, so only one member's map and the running sum are alive at a time.
    """
    total = None
    for index, (p, weight) in enumerate(zip(probs, weights, strict=True)):
        if total is not None and p.shape != total.shape:
            raise ValueError(
                f"ensemble member {index} outputs shape {tuple(p.shape)} but member 0 outputs "
                f"{tuple(total.shape)}: every member must predict the same classes at the same size"
            )
        total = weight * p if total is None else total + weight * p
    if total is None:
        raise ValueError("combine_probs needs at least one member's probabilities")
    return total


class Ensemble(nn.Module):
    """Weighted mean of the members' class probabilities: forward(x: N,3,H,W) -> probabilities N,C,H,W.

    Members may differ in architecture and output stride: logits of any size are upsampled (bilinear) to
    the input size before the softmax. `weights` (default equal) are normalised to sum to 1. Because the
    output is already a probability map, `returns_probabilities` tells `segmodels.inference` not to apply
    another softmax, so `predict_sliding` / `predict_tta` work on an ensemble as on a single model.
    """

    returns_probabilities = True
    arch = "ensemble"

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an Ensemble needs at least one member model")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members):
            raise ValueError(
                f"got {len(weights)} weights for {len(members)} members: give one weight per member"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"ensemble weights must be non-negative with a positive sum, got {weights}")
        declared = {getattr(m, "num_classes", None) for m in members} - {None}
        if len(declared) > 1:
            raise ValueError(
                f"ensemble members disagree on num_classes {sorted(declared)}: build every member with the same classes"
            )
        self.members = nn.ModuleList(members)
        self.num_classes = declared.pop() if declared else None
        self.register_buffer("weights", torch.tensor(weights) / sum(weights), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_probs((forward_probs(member, x) for member in self.members), self.weights)

    def predict_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Averaged probabilities N,C,H,W with the members in eval mode and no grad."""
        return predict_whole(self, x)
