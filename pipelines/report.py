"""Pictures people would rather look at than read: prediction overlays, confusion matrices, tables."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """HxW class indices -> HxWx3 colours; 255 (ignore) is white, unknown indices black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    lut[255] = 255
    return lut[mask]


def palette_png(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> bytes:
    """HxW class indices -> a palette ("P" mode) PNG, the VOC convention."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [c for rgb in palette for c in rgb][: 256 * 3]
    flat += [0] * (768 - len(flat))
    flat[255 * 3 : 256 * 3] = [255, 255, 255]
    img.putpalette(flat)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def blend(
    image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5
) -> np.ndarray:
    """Image with the coloured prediction laid over it (background class 0 left unpainted)."""
    colours = colorize(mask, palette).astype(np.float32)
    painted = (mask != 0) & (mask != 255)
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[painted]
    return out.clip(0, 255).astype(np.uint8)


def overlay_panel(
    image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, palette: Sequence[Sequence[int]]
) -> Image.Image:
    """image | truth | prediction side by side (truth omitted when unknown)."""
    panels = [image, *([colorize(truth, palette)] if truth is not None else []), blend(image, pred, palette)]
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return Image.fromarray(np.concatenate(row, axis=1))


def confusion_figure(matrix: np.ndarray, classes: Sequence[str]):
    """Row-normalised confusion matrix as a matplotlib figure (rows = truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = max(4.0, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title("confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain fixed-width table for terminals and logs."""
    cells = [[str(h) for h in headers]] + [
        [f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
