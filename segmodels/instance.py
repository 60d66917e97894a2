"""DeconvNet's instance-wise inference (Noh et al., ICCV 2015, section 4.1), as its release runs it.

The network segments each object proposal (warped to its 224x224 input) and the proposals' score maps are
put back in place and aggregated pixel-wise by their maximum. The rules follow the released inference
script (HyeonwooNoh/DeconvNet, inference/generate_EDeconvNet_CRF_results.m): proposals whose shorter
side is under 112 pixels are skipped, the first 50 proposals that are kept are segmented, the maximum is
taken over raw class scores (not probabilities) into a map that starts at zero, and a softmax follows.
EDeconvNet combines that map with FCN-8s's scores (`segmodels.ensemble.edeconvnet_probs`).

Where this differs from the release: boxes are clipped to the image (the release pads the image by its
own size with black and crops extended boxes from it), and an image none of whose proposals is kept is
segmented as one whole-image box (the release would leave it all zero, i.e. background). Without a
proposal generator, `sliding_window_proposals` supplies square boxes at a few sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmodels.ensemble import edeconvnet_probs, predict_scores
from segmodels.inference import window_starts

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, end-exclusive
MIN_BOX_SIDE = 112  # the release: `if min(box_wd, box_ht) < 112, continue; end`
TOP_K = 50  # the release: config.max_proposal_num = 50 (inference/run_demo.m), the paper's top 50


def sliding_window_proposals(
    height: int, width: int, sizes: Sequence[int], stride: int | None = None
) -> list[Box]:
    """Square boxes (x1, y1, x2, y2) of each side in `sizes` (clipped to the image), every `stride` pixels
    (default: half the side) with the last box flush with the border; largest first, no duplicates."""
    if not sizes or any(s < 1 for s in sizes) or (stride is not None and stride < 1):
        raise ValueError(
            f"proposal sizes and stride must be positive pixel counts, got {sizes!r} and {stride!r}"
        )
    boxes: list[Box] = []
    for size in sorted(sizes, reverse=True):
        box_h, box_w = min(size, height), min(size, width)
        step = stride or max(size // 2, 1)
        for y1 in window_starts(height, box_h, min(step, box_h)):
            for x1 in window_starts(width, box_w, min(step, box_w)):
                box = (x1, y1, x1 + box_w, y1 + box_h)
                if box not in boxes:
                    boxes.append(box)
    return boxes


def select_boxes(
    boxes: Sequence[Sequence[int]] | torch.Tensor,
    height: int,
    width: int,
    *,
    top_k: int = TOP_K,
    min_side: int = MIN_BOX_SIDE,
) -> list[Box]:
    """The proposals segmented, best first: boxes whose shorter side is >= `min_side`, the first `top_k`
    of those; the whole image when none is left."""
    if top_k < 0 or min_side < 0:
        raise ValueError(f"need top_k >= 0 and min_side >= 0, got {top_k} and {min_side}")
    candidates = [
        _check_box(box, height, width) for box in (boxes.tolist() if torch.is_tensor(boxes) else boxes)
    ]
    kept = [b for b in candidates if min(b[2] - b[0], b[3] - b[1]) >= min_side][:top_k]
    return kept or [(0, 0, width, height)]


def instance_wise_scores(
    model: nn.Module,
    image: torch.Tensor,
    boxes: Sequence[Sequence[int]] | torch.Tensor | None = None,
    *,
    input_size: int = 224,
    proposal_sizes: Sequence[int] = (320, 240, 160),
    stride: int | None = None,
    top_k: int = TOP_K,
    min_side: int = MIN_BOX_SIDE,
    batch_size: int = 8,
) -> torch.Tensor:
    """Aggregated raw class scores C,H,W for one normalised image (3,H,W or 1,3,H,W), as the release.

    boxes: (x1, y1, x2, y2) pixel boxes, best first (e.g. EdgeBoxes ranked by score); `select_boxes`
    keeps those whose shorter side is >= `min_side` and takes the first `top_k`. Without boxes,
    `sliding_window_proposals(H, W, proposal_sizes, stride)`. Each box is warped to input_size x
    input_size, run through the model (eval mode, no grad, `batch_size` boxes per pass), and its scores
    are warped back into the box; per pixel and class the result is the maximum over the boxes and zero
    (the release's accumulator starts at zero, so pixels outside every box score 0 for every class).
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(
            f"instance-wise inference takes one image 3,H,W or 1,3,H,W, got shape {tuple(image.shape)}"
        )
    if batch_size < 1 or input_size < 1:
        raise ValueError(f"need batch_size >= 1 and input_size >= 1, got {batch_size} and {input_size}")
    height, width = image.shape[-2:]
    if boxes is None:
        boxes = sliding_window_proposals(height, width, proposal_sizes, stride)
    chosen = select_boxes(boxes, height, width, top_k=top_k, min_side=min_side)

    aggregated = None
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        crops = torch.cat(
            [_resize(image[:, :, y1:y2, x1:x2], (input_size, input_size)) for x1, y1, x2, y2 in batch]
        )
        scores = predict_scores(model, crops)
        if aggregated is None:
            aggregated = scores.new_zeros(scores.shape[1], height, width)
        for (x1, y1, x2, y2), box_scores in zip(batch, scores, strict=True):
            placed = _resize(box_scores.unsqueeze(0), (y2 - y1, x2 - x1))[0]
            aggregated[:, y1:y2, x1:x2] = torch.maximum(aggregated[:, y1:y2, x1:x2], placed)
    return aggregated


def instance_wise_predict(model: nn.Module, image: torch.Tensor, boxes=None, **options) -> torch.Tensor:
    """Class probabilities C,H,W: the softmax of `instance_wise_scores(model, image, boxes, **options)`."""
    return instance_wise_scores(model, image, boxes, **options).softmax(dim=0)


def edeconvnet_predict(
    members: Sequence[nn.Module],
    archs: Sequence[str],
    weights: Sequence[float],
    image: torch.Tensor,
    boxes: Sequence[Sequence[int]],
    *,
    top_k: int = TOP_K,
    min_side: int = MIN_BOX_SIDE,
) -> torch.Tensor:
    """Class probabilities C,H,W of an ensemble run instance-wise: DeconvNet members on the proposals, the
    others (FCN-8s in EDeconvNet) on the whole image, combined as the release does.

    Each group's raw scores are averaged with the members' weights (renormalised within the group); with
    both groups present the result is `edeconvnet_probs(deconvnet, others)`, with one group only the
    softmax of its scores.
    """
    if not len(members) == len(archs) == len(weights) or not members:
        raise ValueError(f"got {len(members)} members, {len(archs)} archs and {len(weights)} weights")
    image = image if image.ndim == 4 else image.unsqueeze(0)

    def group_scores(deconvnet: bool) -> torch.Tensor | None:
        chosen = [i for i, arch in enumerate(archs) if (arch == "deconvnet") == deconvnet]
        total = sum(float(weights[i]) for i in chosen)
        maps = [
            float(weights[i])
            / total
            * (
                instance_wise_scores(members[i], image, boxes, top_k=top_k, min_side=min_side)
                if deconvnet
                else predict_scores(members[i], image)[0]
            )
            for i in chosen
        ]
        return torch.stack(maps).sum(0) if maps else None

    deconv_scores, other_scores = group_scores(True), group_scores(False)
    if deconv_scores is None or other_scores is None:
        return (other_scores if deconv_scores is None else deconv_scores).softmax(dim=0)
    return edeconvnet_probs(deconv_scores, other_scores)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _check_box(box: Sequence[int], height: int, width: int) -> Box:
    if len(box) != 4:
        raise ValueError(f"a box is (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(
            f"box {box!r} is empty or outside the {width}x{height} image: need 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H"
        )
    return x1, y1, x2, y2
