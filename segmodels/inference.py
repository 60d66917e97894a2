"""Inference: whole-image, sliding-window and test-time-augmented class probabilities.

Every function takes a normalised image batch N,C_in,H,W and returns softmax probabilities N,C,H,W at the
input size. Sliding windows and TTA follow MMSegmentation's `slide` mode and multi-scale + flip testing,
except that overlapping windows and augmented views are averaged as probabilities, not logits, so models
of different logit scales (and ensembles, which output probabilities) combine the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

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
    model: nn.Module,
    image: torch.Tensor,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Class probabilities N,C,H,W averaged over overlapping crop-sized windows that cover the image.

    crop, stride: int or (height, width); stride <= crop. Windows step by `stride` and the last one in each
    direction ends at the border. Where the image is smaller than the crop the window is zero-padded at the
    bottom/right (zero = the mean colour after normalisation) and the prediction cropped back, so every
    forward pass sees exactly crop-sized inputs (DeconvNet's fixed 224x224, for one). Each window is added,
    divided by how many windows cover each of its pixels, into one accumulator of `out_dtype` (default:
    float16 on CUDA, float32 otherwise).
    """
    _check_image(image)
    return _predict_views(model, image, (1.0,), False, _window(crop, stride), out_dtype)


def predict_tta(
    model: nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Test-time augmentation: probabilities N,C,H,W averaged over scales x (identity, horizontal flip).

    Each view is the image resized bilinearly by `scale`, predicted with `mode` "whole" (`predict_whole`)
    or "slide" (`predict_sliding` with `crop`, `stride` in pixels of the resized view), flipped back and
    resized bilinearly to the input size. Memory stays at one map per image at the input size, in
    `out_dtype` (default: float16 on CUDA, float32 otherwise): bilinear resizing is linear, so each window
    is resized on its own into its region of that accumulator, and in "slide" mode each window's input is
    resized from the image as it is needed (the result equals resizing whole maps up to float rounding).
    """
    _check_image(image)
    if mode == "whole":
        window = None
    elif mode == "slide":
        if crop is None or stride is None:
            raise ValueError('mode="slide" needs crop and stride (e.g. crop=512, stride=341)')
        window = _window(crop, stride)
    else:
        raise ValueError(f'unknown inference mode {mode!r}; choose "whole" or "slide"')
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive factors, got {scales!r}")
    return _predict_views(model, image, tuple(scales), flip, window, out_dtype)


def predict_labels(model: nn.Module, image: torch.Tensor, **tta) -> torch.Tensor:
    """uint8 class labels N,H,W: the argmax of `predict_tta(model, image, **tta)`, on the image's device."""
    probs = predict_tta(model, image, **tta)
    if probs.shape[1] > 256:
        raise ValueError(f"{probs.shape[1]} classes do not fit uint8 labels: take predict_tta(...).argmax(1)")
    return probs.argmax(1).to(torch.uint8)


def _window(
    crop: int | Sequence[int], stride: int | Sequence[int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop, "crop"), _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {stride!r} must not exceed crop {crop!r}, or the windows leave gaps")
    return (crop_h, crop_w), (stride_h, stride_w)


class _Resample:
    """Bilinear resampling along one axis exactly as F.interpolate(mode="bilinear", align_corners=False):
    output index o reads source indices i0[o] <= i1[o] with weights l0[o] + l1[o] = 1 (PyTorch's
    area_pixel_compute_source_index with scale in/out, clamped at 0)."""

    def __init__(self, in_size: int, out_size: int, device: torch.device) -> None:
        self.identity = in_size == out_size
        dst = torch.arange(out_size, dtype=torch.float64, device=device)
        src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
        self.i0 = src.floor().long()
        self.i1 = (self.i0 + 1).clamp(max=in_size - 1)
        self.l1 = (src - self.i0).float()
        self.l0 = 1 - self.l1

    def reached(self, start: int, stop: int) -> tuple[int, int]:
        """The outputs [first, last) whose taps reach into source indices [start, stop)."""
        if self.identity:
            return start, stop
        return int(torch.searchsorted(self.i1, start)), int(torch.searchsorted(self.i0, stop))

    def apply(self, x: torch.Tensor, dim: int, first: int, last: int, offset: int = 0) -> torch.Tensor:
        """Outputs [first, last) along `dim` from `x`, which holds source indices [offset, offset + len)
        along `dim` and is taken as zero outside them."""
        if self.identity:
            return x.narrow(dim, first - offset, last - first)
        size = x.shape[dim]
        i0, i1 = self.i0[first:last] - offset, self.i1[first:last] - offset
        shape = [-1 if d == dim % x.ndim else 1 for d in range(x.ndim)]
        w0 = (self.l0[first:last] * (i0 >= 0)).view(shape)
        w1 = (self.l1[first:last] * (i1 < size)).view(shape)
        out = _take(x, dim, i0.clamp(0, size - 1)).mul_(w0)
        return out.addcmul_(_take(x, dim, i1.clamp(0, size - 1)), w1)


def _take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(dim, index); along the last dimension as torch.gather, 2-3x faster there on CPU."""
    if dim % x.ndim == x.ndim - 1:
        return torch.gather(x, -1, index.expand(*x.shape[:-1], len(index)))
    return x.index_select(dim, index)


def _add_window(
    total: torch.Tensor, probs: torch.Tensor, y1: int, x1: int, rows: _Resample, cols: _Resample
) -> None:
    """total += the bilinear resize of a view that is `probs` at (y1, x1) and zero elsewhere.

    Only the outputs the window reaches are computed, in bands of as many rows as the window has, so the
    temporaries stay window-sized whatever the scale.
    """
    height, width = probs.shape[-2:]
    y_first, y_last = rows.reached(y1, y1 + height)
    x_first, x_last = cols.reached(x1, x1 + width)
    for y in range(y_first, y_last, height):
        band = rows.apply(probs, -2, y, min(y + height, y_last), y1)
        total[:, :, y : y + band.shape[-2], x_first:x_last] += cols.apply(band, -1, x_first, x_last, x1)


def _coverage(ranges: Sequence[tuple[int, int]], size: int, device: torch.device) -> torch.Tensor:
    """How many of the (start, length) ranges cover each index of an axis of `size`."""
    count = torch.zeros(size, device=device)
    for start, length in ranges:
        count[start : start + length] += 1
    return count


def _view_windows(
    model: nn.Module,
    image: torch.Tensor,
    size: tuple[int, int],
    flipped: bool,
    window: tuple[tuple[int, int], tuple[int, int]] | None,
    weight: float,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(y1, x1, probabilities x weight / coverage) per window of the view: `image` resized to `size`, maybe
    flipped.

    Windows are laid out on the (flipped) view as `window_starts` says and given back unflipped, with their
    offsets in the unflipped view; "whole" mode (window None) is one window covering the view.
    """
    height, width = size
    if window is None:
        view = image
        if size != tuple(image.shape[-2:]):
            view = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        probs = forward_probs(model, view.flip(-1)).flip(-1) if flipped else forward_probs(model, view)
        yield 0, 0, probs.mul_(weight)  # in place: whole-view maps are the largest transients
        return
    (crop_h, crop_w), (stride_h, stride_w) = window
    rows = [(y1, min(crop_h, height - y1)) for y1 in window_starts(height, crop_h, stride_h)]
    cols = [(x1, min(crop_w, width - x1)) for x1 in window_starts(width, crop_w, stride_w)]
    if flipped:  # a window at x1 of the flipped view is the unflipped view's [width - x1 - w, width - x1)
        cols = [(width - x1 - w, w) for x1, w in cols]
    row_count, col_count = _coverage(rows, height, image.device), _coverage(cols, width, image.device)
    from_rows, from_cols = (
        _Resample(image.shape[-2], height, image.device),
        _Resample(image.shape[-1], width, image.device),
    )
    for y1, h in rows:
        band = from_rows.apply(image, -2, y1, y1 + h)
        for x1, w in cols:
            crop = from_cols.apply(band, -1, x1, x1 + w)
            crop = crop.flip(-1) if flipped else crop
            probs = forward_probs(model, F.pad(crop, (0, crop_w - w, 0, crop_h - h)))[:, :, :h, :w]
            probs = probs.flip(-1) if flipped else probs
            yield y1, x1, probs * (weight / (row_count[y1 : y1 + h, None] * col_count[x1 : x1 + w]))


def _predict_views(
    model: nn.Module,
    image: torch.Tensor,
    scales: tuple[float, ...],
    flip: bool,
    window: tuple[tuple[int, int], tuple[int, int]] | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """The mean over scales x flips of each view's windows, resized into one N,C,H,W accumulator."""
    n, _, height, width = image.shape
    out_dtype = out_dtype or (torch.float16 if image.is_cuda else torch.float32)
    views = len(scales) * (2 if flip else 1)
    total = None  # allocated at the first window, once the number of classes is known
    with _inference(model):
        for scale in scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            to_rows, to_cols = (
                _Resample(size[0], height, image.device),
                _Resample(size[1], width, image.device),
            )
            for flipped in (False, True) if flip else (False,):
                for y1, x1, probs in _view_windows(model, image, size, flipped, window, 1 / views):
                    whole_view = probs.shape[-2:] == size
                    if total is None and whole_view and size == (height, width):
                        total = probs.to(out_dtype).contiguous()  # the first view as is: no copy on CPU
                        continue
                    if total is None:
                        total = image.new_zeros(n, probs.shape[1], height, width, dtype=out_dtype)
                    if whole_view:
                        total += F.interpolate(
                            probs, size=(height, width), mode="bilinear", align_corners=False
                        )
                    else:
                        _add_window(total, probs, y1, x1, to_rows, to_cols)
                    del probs  # before the next window is computed
    return total
