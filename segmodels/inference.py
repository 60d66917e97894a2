"""Inference: whole-image, sliding-window and test-time-augmented class probabilities.

Every function takes a normalised image batch N,C_in,H,W and returns softmax probabilities N,C,H,W at the
input size. Sliding windows and TTA follow MMSegmentation's `slide` mode and multi-scale + flip testing,
except that overlapping windows and augmented views are averaged as probabilities, not logits, so models
of different logit scales (and ensembles, which output probabilities) combine the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def forward_probs(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """One forward pass -> float32 class probabilities N,C,H,W at the input size; mode and grad untouched.

    Takes "out" from dict outputs, upsamples (bilinear) logits that come out smaller than the input, and
    skips the softmax for models that already return probabilities (`returns_probabilities = True`, as
    `segmodels.ensemble.Ensemble` does).
    """
    out = model(image)
    if isinstance(out, Mapping):
        out = out["out"]
    out = out.float()
    if out.shape[-2:] != image.shape[-2:]:
        out = F.interpolate(out, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return out if getattr(model, "returns_probabilities", False) else out.softmax(dim=1)


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """eval() + no_grad for the block; every submodule's train/eval flag is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 4 or not image.is_floating_point():
        raise ValueError(
            f"expected a normalised float image batch N,C,H,W, got dtype {image.dtype} shape {tuple(image.shape)} "
            "(use segmodels.transforms.normalize on uint8 H,W,3 images)"
        )


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or an (height, width) pair of them, got {value!r}")
    return pair


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis: every `stride`, the last one flush with the border (MMSegmentation)."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, max(size - crop, 0)) for i in range(count)]


def predict_whole(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Class probabilities N,C,H,W from one pass over the whole image (model in eval mode, no grad)."""
    _check_image(image)
    with _inference(model):
        return forward_probs(model, image)


def predict_sliding(
    model: nn.Module, image: torch.Tensor, crop: int | Sequence[int], stride: int | Sequence[int]
) -> torch.Tensor:
    """Class probabilities N,C,H,W averaged over overlapping crop-sized windows that cover the image.

    crop, stride: int or (height, width); stride <= crop. Windows step by `stride` and the last one in each
    direction ends at the border. Where the image is smaller than the crop the window is zero-padded at the
    bottom/right (zero = the mean colour after normalisation) and the prediction cropped back, so every
    forward pass sees exactly crop-sized inputs (DeconvNet's fixed 224x224, for one).
    """
    _check_image(image)
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop, "crop"), _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {stride!r} must not exceed crop {crop!r}, or the windows leave gaps")
    n, _, height, width = image.shape
    probs = None
    count = image.new_zeros(1, 1, height, width, dtype=torch.float32)
    with _inference(model):
        for y1 in window_starts(height, crop_h, stride_h):
            for x1 in window_starts(width, crop_w, stride_w):
                h, w = min(crop_h, height - y1), min(crop_w, width - x1)
                window = F.pad(image[:, :, y1 : y1 + h, x1 : x1 + w], (0, crop_w - w, 0, crop_h - h))
                window_probs = forward_probs(model, window)[:, :, :h, :w]
                if probs is None:
                    probs = window_probs.new_zeros(n, window_probs.shape[1], height, width)
                probs[:, :, y1 : y1 + h, x1 : x1 + w] += window_probs
                count[:, :, y1 : y1 + h, x1 : x1 + w] += 1
    return probs / count


def predict_tta(
    model: nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Test-time augmentation: probabilities N,C,H,W averaged over scales x (identity, horizontal flip).

    Each view is the image resized bilinearly by `scale`, predicted with `mode` "whole" (`predict_whole`)
    or "slide" (`predict_sliding` with `crop`, `stride` in pixels of the resized view), flipped back and
    resized bilinearly to the input size.
    """
    _check_image(image)
    if mode == "whole":
        predict = predict_whole
    elif mode == "slide":
        if crop is None or stride is None:
            raise ValueError('mode="slide" needs crop and stride (e.g. crop=512, stride=341)')
        predict = partial(predict_sliding, crop=crop, stride=stride)
    else:
        raise ValueError(f'unknown inference mode {mode!r}; choose "whole" or "slide"')
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive factors, got {scales!r}")
    size = tuple(image.shape[-2:])
    total = None
    for scale in scales:
        scaled_size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        view = image
        if scaled_size != size:
            view = F.interpolate(image, size=scaled_size, mode="bilinear", align_corners=False)
        probs = predict(model, view)
        if flip:
            probs = probs + predict(model, view.flip(-1)).flip(-1)
        if scaled_size != size:
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        total = probs if total is None else total + probs
    return total / (len(scales) * (2 if flip else 1))
