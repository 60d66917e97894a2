"""Answers: a class-index mask -> the HTTP body (palette PNG, JSON statistics or JPEG overlay).

Rendering runs where the mask is made (the model replica, or the CRF replica with `--crf`), so only the
finished body travels back through the ingress.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

FORMATS = ("png", "json", "overlay")


@dataclass(frozen=True)
class Reply:
    """A finished HTTP answer (success or a JSON error), built in a replica and returned by the ingress as is."""

    body: bytes
    media: str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Dense:
    """What the CRF pool needs from the model replica: the image, the ensemble's probabilities, once.

    `probs`: float16 C,H,W (2 bytes per class and pixel; the CRF works in float32 anyway).
    """

    image: np.ndarray  # uint8 H,W,3
    probs: np.ndarray
    spec: Any  # segmodels.artifact.ModelSpec of the version that produced them
    version: str
    seconds: dict[str, float]


def error_reply(err) -> Reply:
    """pipelines.serve.uploads.ApiError -> its JSON Reply."""
    return Reply(err.body(), "application/json", err.status)


def render(
    image: np.ndarray, mask: np.ndarray, spec: Any, version: str, fmt: str, seconds: dict[str, float]
) -> Reply:
    """uint8 H,W class indices of `image` (uint8 H,W,3) -> the Reply in format `fmt` (png|json|overlay)."""
    from pipelines.report import blend, palette_png

    started = time.perf_counter()
    counts = np.bincount(mask.ravel(), minlength=len(spec.classes))
    present = [c for c in range(len(spec.classes)) if counts[c]]
    headers = {
        "X-Model-Name": spec.name,
        "X-Model-Version": version,
        # Indices into /v1/model's classes and palette: the legend of this mask (names may not be ASCII).
        "X-Classes-Present": ",".join(map(str, present)),
    }
    if fmt == "png":
        return Reply(palette_png(mask, spec.palette), "image/png", headers=headers)
    if fmt == "overlay":
        buffer = io.BytesIO()
        Image.fromarray(blend(image, mask, spec.palette)).save(buffer, format="JPEG", quality=90)
        return Reply(buffer.getvalue(), "image/jpeg", headers=headers)
    seconds = {**seconds, "postprocess": time.perf_counter() - started}
    answer = {
        "model": {"name": spec.name, "version": version},
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "classes_present": [spec.classes[c] for c in present],
        "class_fractions": {spec.classes[c]: float(counts[c]) / mask.size for c in present},
        "timing_ms": {k: round(v * 1000, 3) for k, v in seconds.items()},
    }
    return Reply(json.dumps(answer).encode(), "application/json", headers=headers)
