"""Ensembles that combine members' class maps: the weighted mean of probabilities, and EDeconvNet.

`Ensemble` averages the members' class-probability maps, as the DeconvNet paper describes EDeconvNet
(Noh et al., ICCV 2015, section 4.2: "the average of the output maps of the two models"). Its release
combines them differently (`edeconvnet_probs`), and that rule is what instance-wise inference runs
(`segmodels.instance.edeconvnet_predict`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmodels.inference import _inference, forward_probs, predict_whole


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


def predict_scores(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Raw class scores N,C,H,W at the input size (smaller logits upsampled bilinearly), model in eval
    mode, no grad: what the releases' scripts read from a network's score layer, before any softmax."""
    if getattr(model, "returns_probabilities", False):
        raise ValueError("an ensemble outputs probabilities, not scores: pass one of its members")
    with _inference(model):
        out = model(image)
    out = (out["out"] if isinstance(out, Mapping) else out).float()
    if out.shape[-2:] != image.shape[-2:]:
        out = F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return out


def edeconvnet_probs(deconvnet_scores: torch.Tensor, fcn_scores: torch.Tensor) -> torch.Tensor:
    """EDeconvNet as released: softmax over classes (dim -3) of DeconvNet's scores x ReLU(FCN-8s's scores).

    HyeonwooNoh/DeconvNet, inference/generate_EDeconvNet_CRF_results.m: `fcn_score = max(zero_mask,
    fcn_score); ens_score = deconv_score .* fcn_score;` then `prob_map` = the softmax of `ens_score`, whose
    -log is the dense CRF's unary. Both inputs are raw scores C,H,W (or N,C,H,W): DeconvNet's aggregated
    over proposals by maximum (`segmodels.instance.instance_wise_scores`), FCN-8s's from the whole image.
    The paper's text instead averages the two models' probability maps (what `Ensemble` does).
    """
    if deconvnet_scores.shape != fcn_scores.shape:
        raise ValueError(
            f"DeconvNet scores {tuple(deconvnet_scores.shape)} and FCN scores {tuple(fcn_scores.shape)} "
            "must have the same shape (classes and size)"
        )
    return (deconvnet_scores * fcn_scores.clamp_min(0)).softmax(dim=-3)


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
