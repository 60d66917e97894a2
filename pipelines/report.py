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
    image: np.ndarray,
    truth: np.ndarray | None,
    pred: np.ndarray,
    palette: Sequence[Sequence[int]],
    classes: Sequence[str] = (),
) -> Image.Image:
    """image | truth | prediction side by side (truth omitted when unknown), with a legend of the classes
    in truth or prediction below when `classes` are given."""
    panels = [image, *([colorize(truth, palette)] if truth is not None else []), blend(image, pred, palette)]
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    panel = np.concatenate(row, axis=1)
    if classes:
        shown = present_classes(pred, len(classes)) | (
            present_classes(truth, len(classes)) if truth is not None else set()
        )
        panel = np.concatenate([panel, legend_strip(classes, palette, sorted(shown), panel.shape[1])], axis=0)
    return Image.fromarray(panel)


def present_classes(mask: np.ndarray, num_classes: int) -> set[int]:
    """The class indices that occur in `mask` (ignore and out-of-range values left out)."""
    counts = np.bincount(mask.ravel(), minlength=256)[:num_classes]
    return {int(c) for c in np.flatnonzero(counts)}


def legend_strip(
    classes: Sequence[str], palette: Sequence[Sequence[int]], shown: Sequence[int], width: int
) -> np.ndarray:
    """A white strip `width` px wide naming `shown` classes beside their colour swatches, wrapped in rows."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    line, swatch, pad = 12, 9, 4
    entries, x, y = [], pad, pad
    for c in shown:
        text_width = int(font.getlength(classes[c]))
        step = swatch + 3 + text_width + 2 * pad
        if x + step > width and x > pad:
            x, y = pad, y + line
        entries.append((c, x, y))
        x += step
    strip = Image.new("RGB", (width, y + line + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for c, ex, ey in entries:
        draw.rectangle([ex, ey + 1, ex + swatch, ey + 1 + swatch], fill=tuple(palette[c]), outline=(0, 0, 0))
        draw.text((ex + swatch + 3, ey), classes[c], fill=(0, 0, 0), font=font)
    return np.asarray(strip)


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
