"""Segmentation losses: pixel-wise cross entropy with ignore label, aux head, class and pixel weights.

`unet_weight_map` is the U-Net border weight map (Ronneberger et al., MICCAI 2015, section 3);
`class_weights` turns pixel counts into class-balancing weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

BACKGROUND = 0  # class index treated as background by the U-Net weight map


def segmentation_loss(
    output: torch.Tensor | Mapping[str, torch.Tensor],
    target: torch.Tensor,
    *,
    aux_weight: float = 0.4,
    class_weight: torch.Tensor | Sequence[float] | None = None,
    pixel_weight: torch.Tensor | None = None,
    ignore_index: int = 255,
    border: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax cross entropy averaged over the non-ignored pixels; plus `aux_weight` x the aux-head loss.

    output: logits N,C,H,W, or the training-mode dict {"out": logits, "aux": aux_logits} (aux at input size;
    PSPNet section 3.4 weights it 0.4). target: N,H,W class indices, `ignore_index` where unlabelled.
    class_weight: C weights; pixel_weight: N,H,W weights (e.g. `unet_weight_map`). The mean is weighted:
    sum(w * ce) / sum(w) over non-ignored pixels with w = class_weight[target] * pixel_weight, so scaling
    every weight by a constant changes nothing. A batch with no labelled pixel gives 0, not NaN.
    border: pixels this close to the crop's edge are ignored. U-Net's overlap-tile training (section 2)
    scores only the valid centre of a tile (a 572 tile trains its 388 centre): border=`unet.VALID_MARGIN`.
    reduction: "mean" as above, or "sum": the weighted sum over the pixels divided by N only, Caffe's
    `normalize: false` of the FCN reference (its learning rates, ~1e-10, assume this unnormalised loss).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if border:
        target = valid_centre(target, border, ignore_index)
    if isinstance(output, Mapping):
        loss = _cross_entropy(output["out"], target, class_weight, pixel_weight, ignore_index, reduction)
        if "aux" in output and aux_weight:
            loss = loss + aux_weight * _cross_entropy(
                output["aux"], target, class_weight, pixel_weight, ignore_index, reduction
            )
        return loss
    return _cross_entropy(output, target, class_weight, pixel_weight, ignore_index, reduction)


def valid_centre(target: torch.Tensor, border: int, ignore_index: int = 255) -> torch.Tensor:
    """A copy of N,H,W `target` with `border` pixels on each side set to `ignore_index`."""
    height, width = target.shape[-2:]
    if border < 0 or 2 * border >= min(height, width):
        raise ValueError(
            f"loss border {border} leaves nothing of a {height}x{width} crop: use a border >= 0 and "
            f"below half the crop side ({min(height, width) // 2}), or a larger crop"
        )
    centre = torch.full_like(target, ignore_index)
    centre[..., border : height - border, border : width - border] = target[
        ..., border : height - border, border : width - border
    ]
    return centre


def _cross_entropy(logits, target, class_weight, pixel_weight, ignore_index, reduction) -> torch.Tensor:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match target of shape {tuple(target.shape)}: "
            "expected logits N,C,H,W and target N,H,W with the same N, H, W (upsample the logits to the label size)"
        )
    num_classes = logits.shape[1]
    target = target.to(device=logits.device, dtype=torch.long)
    valid = target != ignore_index
    labelled = target[valid]
    if labelled.numel() and (labelled.min() < 0 or labelled.max() >= num_classes):
        raise ValueError(
            f"target holds class indices outside 0..{num_classes - 1} (min {int(labelled.min())}, "
            f"max {int(labelled.max())}) that are not ignore_index={ignore_index}: check the label mapping"
        )
    weight = valid.to(torch.float32)
    if class_weight is not None:
        class_weight = torch.as_tensor(class_weight, dtype=torch.float32, device=logits.device)
        if class_weight.shape != (num_classes,):
            raise ValueError(f"class_weight has shape {tuple(class_weight.shape)}, expected ({num_classes},)")
        weight = weight * class_weight[target.masked_fill(~valid, 0)]
    if pixel_weight is not None:
        pixel_weight = torch.as_tensor(pixel_weight, dtype=torch.float32, device=logits.device)
        if pixel_weight.shape != target.shape:
            raise ValueError(
                f"pixel_weight has shape {tuple(pixel_weight.shape)}, expected the target's {tuple(target.shape)}"
            )
        weight = weight * pixel_weight
    # reduction="none" already multiplies by class_weight[target] and zeroes ignored pixels.
    ce = F.cross_entropy(logits, target, weight=class_weight, ignore_index=ignore_index, reduction="none")
    if pixel_weight is not None:
        ce = ce * pixel_weight
    if reduction == "sum":
        return ce.sum() / len(ce)
    return ce.sum() / weight.sum().clamp_min(torch.finfo(torch.float32).tiny)


def unet_weight_map(
    mask: np.ndarray | torch.Tensor,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weight: torch.Tensor | Sequence[float] | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """U-Net weight map w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)), float32 H,W.

    mask: H,W class indices (0 = background, `ignore_index` = unlabelled). Instances are the connected
    components (4-connectivity) of each foreground class; d1, d2 are the Euclidean distances to the
    nearest and second-nearest instance. As in the paper (section 3, Fig. 3d) the border term is added on
    background pixels only, so thin gaps between touching cells get large weights. w_c balances class
    frequencies: `class_weight` (one weight per class), or by default `class_weights(..., "inverse")` of
    this mask's own pixel counts. Ignored pixels get weight 0.
    """
    labels = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"mask must be an H,W integer label map, got shape {labels.shape} dtype {labels.dtype}"
        )
    valid = labels != ignore_index
    if class_weight is None:
        class_weight = class_weights(np.bincount(labels[valid].ravel(), minlength=1), method="inverse")
    wc = torch.as_tensor(class_weight, dtype=torch.float64).numpy()
    if valid.any() and (labels[valid].min() < 0 or labels[valid].max() >= len(wc)):
        raise ValueError(
            f"mask holds class indices outside 0..{len(wc) - 1}; pass one class_weight per class "
            f"(got {len(wc)}) or mark unlabelled pixels with ignore_index={ignore_index}"
        )
    weight = np.zeros(labels.shape, dtype=np.float64)
    weight[valid] = wc[labels[valid]]

    # Running nearest / second-nearest distance over all instances keeps memory at two H,W maps.
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    for cls in np.unique(labels[valid]):
        if cls == BACKGROUND:
            continue
        instances, count = ndimage.label(labels == cls)
        for instance in range(1, count + 1):
            d = ndimage.distance_transform_edt(instances != instance)
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
    background = labels == BACKGROUND
    # With fewer than two instances d2 stays infinite and the border term is exp(-inf) = 0.
    weight[background] += w0 * np.exp(-((d1[background] + d2[background]) ** 2) / (2.0 * sigma**2))
    return weight.astype(np.float32)


def class_weights(
    pixel_counts: torch.Tensor | np.ndarray | Sequence[int], method: str = "median_frequency"
) -> torch.Tensor:
    """Class-balancing weights (float32, one per class) from per-class pixel counts.

    "median_frequency": median(f) / f_c with f_c = class pixels / all labelled pixels (Eigen & Fergus 2015,
    used by SegNet). "inverse": total / (K * count_c) over the K classes present, so the mean weight per
    pixel is 1. Classes with no pixels get weight 0 (they never occur in the loss).
    """
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    if counts.ndim != 1 or bool((counts < 0).any()):
        raise ValueError(f"pixel_counts must be a 1-D sequence of non-negative counts, got {counts.tolist()}")
    present = counts > 0
    if not bool(present.any()):
        raise ValueError("pixel_counts are all zero: class weights need at least one labelled pixel")
    weights = torch.zeros_like(counts)
    if method == "median_frequency":
        freq = counts[present] / counts.sum()
        weights[present] = torch.quantile(freq, 0.5) / freq
    elif method == "inverse":
        weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    else:
        raise ValueError(f"unknown class-weight method {method!r}; choose 'median_frequency' or 'inverse'")
    return weights.to(torch.float32)
