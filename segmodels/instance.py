"""DeconvNet's instance-wise inference (Noh et al., ICCV 2015, section 4.1).

The network segments each object proposal (resized to its 224x224 input) and the proposal maps are put
back in place and aggregated pixel-wise by their maximum. The paper takes EdgeBoxes' top 50 proposals;
without a proposal generator, `sliding_window_proposals` supplies square boxes at a few sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmodels.inference import predict_whole, window_starts

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, end-exclusive


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


def instance_wise_predict(
    model: nn.Module,
    image: torch.Tensor,
    boxes: Sequence[Sequence[int]] | torch.Tensor | None = None,
    *,
    input_size: int = 224,
    proposal_sizes: Sequence[int] = (320, 240, 160),
    stride: int | None = None,
    top_k: int = 50,
    batch_size: int = 8,
) -> torch.Tensor:
    """Class probabilities C,H,W for one normalised image (3,H,W or 1,3,H,W) from proposal-wise predictions.

    boxes: (x1, y1, x2, y2) pixel boxes, best first (e.g. EdgeBoxes ranked by score); the first `top_k`
    are used. Without boxes, `sliding_window_proposals(H, W, proposal_sizes, stride)`. The whole image is
    always added as one more box, so every pixel is covered. Each box is warped to input_size x input_size,
    run through the model (eval mode, no grad, `batch_size` boxes per pass), and its probabilities are
    warped back into the box.

    Aggregation: per pixel and class, the maximum probability over the boxes that contain the pixel, then
    divided by its sum over classes so each pixel is a distribution again. (The paper takes the max of the
    score maps, zero-padded outside each proposal, and applies a softmax after; taking the max of
    probabilities keeps proposals with different logit scales comparable and makes the padding neutral.)
    """
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(
            f"instance_wise_predict takes one image 3,H,W or 1,3,H,W, got shape {tuple(image.shape)}"
        )
    if top_k < 0 or batch_size < 1 or input_size < 1:
        raise ValueError(
            f"need top_k >= 0, batch_size >= 1 and input_size >= 1, got {top_k}, {batch_size}, {input_size}"
        )
    height, width = image.shape[-2:]
    if boxes is None:
        boxes = sliding_window_proposals(height, width, proposal_sizes, stride)
    candidates = [
        _check_box(box, height, width) for box in (boxes.tolist() if torch.is_tensor(boxes) else boxes)
    ]
    whole = (0, 0, width, height)
    chosen = [whole] + [box for box in candidates[:top_k] if box != whole]

    aggregated = None
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        crops = torch.cat(
            [_resize(image[:, :, y1:y2, x1:x2], (input_size, input_size)) for x1, y1, x2, y2 in batch]
        )
        probs = predict_whole(model, crops)
        if aggregated is None:
            aggregated = probs.new_zeros(probs.shape[1], height, width)
        for (x1, y1, x2, y2), box_probs in zip(batch, probs, strict=True):
            placed = _resize(box_probs.unsqueeze(0), (y2 - y1, x2 - x1))[0]
            aggregated[:, y1:y2, x1:x2] = torch.maximum(aggregated[:, y1:y2, x1:x2], placed)
    return aggregated / aggregated.sum(dim=0, keepdim=True).clamp_min(torch.finfo(aggregated.dtype).tiny)


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
