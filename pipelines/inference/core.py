"""The inference core: how every stage turns an image into class probabilities or labels.

Evaluation, batch prediction, ensemble scoring, serving and the MLflow pyfunc all run a model through
`predict_batch` (scales, flip, sliding window or DeconvNet proposals, as `InferenceSettings` say), refine
with the dense CRF through the one parameter merge `crf_params`, group images into forward passes with
`pixel_batches`, and hand a model folder to Ray actors as bytes (`model_payload` -> `materialize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.errors import UserError

# Pixels per forward pass, as the network sees them (scaled, padding included). At 4 Mpx the largest
# activation of the widest model here (FCN-8s's conv1, 64 channels of float32) is 1 GB, a few of which
# are alive at once: a CPU actor stays within the 4-8 GB a core has on common nodes, and a 40 GB GPU
# keeps room for the accumulators. A 2048x1024 Cityscapes image (2.1 Mpx, 2.75 Mpx with FCN's 100-pixel
# pad) goes alone; 500x375 VOC images (0.19 Mpx, 0.4 Mpx padded) go nine at a time.
PIXEL_BUDGET = 4_000_000


@dataclass(frozen=True)
class InferenceSettings:
    """How to turn one image into class probabilities."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    slide: tuple[int, int] | None = None  # (crop, stride) in pixels
    crf: bool = False
    crf_params: dict[str, float] = field(default_factory=dict)  # overrides of the model's / DeepLab's
    # DeconvNet's instance-wise inference: image_id -> proposal boxes (pipelines.inference.proposals); None = off.
    proposals: dict[str, tuple[tuple[int, int, int, int], ...]] | None = None
    top_k: int = 50  # proposals per image (the paper's EdgeBoxes top 50)

    def __post_init__(self) -> None:
        if self.proposals is not None and (self.scales != (1.0,) or self.flip or self.slide):
            raise UserError(
                "--instance segments proposals at the network's input size: drop --tta, --flip and --slide"
            )
        if not self.scales or any(not s > 0 for s in self.scales):
            raise UserError(f"--tta scales must be positive numbers, got {self.scales}")
        if self.slide is not None:
            crop, stride = self.slide
            if not 0 < stride <= crop:
                raise UserError(f"--slide CROP STRIDE needs 0 < STRIDE <= CROP, got {crop} {stride}")


def crf_params(model_params: dict | None, overrides: dict):
    """The model's tuned CRF parameters (`model.json` "crf", if any) with explicit overrides on top."""
    from segmodels.crf import CRFParams

    values = {**(model_params or {}), **overrides}
    try:
        return CRFParams(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"bad CRF parameters {values}: {err}") from None


def input_padding(model) -> int:
    """Pixels a model pads on each side before its first convolution (FCN's 100), the most of its members."""
    return max((getattr(m, "input_padding", 0) for m in model.ensemble.modules()), default=0)


def pixel_batches(
    shapes: Sequence[tuple[int, ...]], budget: int = PIXEL_BUDGET, pad: int = 0, scale: float = 1.0
) -> list[list[int]]:
    """Indices of images grouped into forward passes: images of one size together, each pass at most
    `budget` pixels as the network sees them (each H,W scaled by `scale`, then padded by `pad` on every
    side); an image over the budget on its own goes alone."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(shapes):
        by_size.setdefault((int(shape[0]), int(shape[1])), []).append(index)
    batches = []
    for (height, width), indices in by_size.items():
        seen = (round(height * scale) + 2 * pad) * (round(width * scale) + 2 * pad)
        per_pass = max(1, budget // seen)
        batches += [indices[i : i + per_pass] for i in range(0, len(indices), per_pass)]
    return batches


def forward_batches(model, shapes, settings: InferenceSettings, budget: int = PIXEL_BUDGET):
    """`pixel_batches` for this model and settings: its padding and the largest test scale counted."""
    scale = max(settings.scales) * model.spec.input_scale
    return pixel_batches(shapes, budget, input_padding(model), scale)


def predict_batch(model, images: np.ndarray, settings: InferenceSettings, image_ids=None):
    """uint8 N,H,W,3 images of one size -> float32 N,C,H,W probabilities (torch, on the model's device).

    The network part of `predict_image` (scales, flip, sliding window or proposals; no CRF), for a batch;
    the serving endpoint runs each ensemble member through it on dynamically batched requests. With
    `settings.proposals`, `image_ids` names each image's proposals (see `predict_instances`).
    """
    import torch

    from segmodels.inference import predict_tta

    device = next(model.ensemble.parameters()).device
    # Ray hands read-only arrays over; torch wants to own writable memory (copied only when needed).
    x = model.normalize(torch.from_numpy(np.require(images, requirements=("C", "W"))).to(device))
    if settings.proposals is not None:
        return torch.stack(
            [
                predict_instances(model, image[None], settings, i)
                for image, i in zip(x, image_ids, strict=True)
            ]
        )
    if model.spec.input_scale != 1.0:
        scales = tuple(s * model.spec.input_scale for s in settings.scales)
    else:
        scales = settings.scales
    crop, stride = settings.slide if settings.slide else (None, None)
    with torch.no_grad():
        return predict_tta(
            model.ensemble,
            x,
            scales=scales,
            flip=settings.flip,
            mode="slide" if settings.slide else "whole",
            crop=crop,
            stride=stride,
        ).float()


def predict_instances(model, x, settings: InferenceSettings, image_id: str):
    """Normalised 1,3,H,W image -> C,H,W probabilities, DeconvNet members run instance-wise.

    DeconvNet members segment the image's proposals (`segmodels.instance`, section 4.1) and every other
    member (FCN-8s in EDeconvNet) the whole image; the two are combined as DeconvNet's release does
    (`segmodels.instance.edeconvnet_predict`: DeconvNet's scores x ReLU(FCN-8s's scores), softmax).
    """
    from pipelines.inference.proposals import clip_boxes
    from segmodels.instance import edeconvnet_predict

    boxes = clip_boxes(settings.proposals.get(image_id, ()), *x.shape[-2:])
    archs = [spec.arch for spec in model.spec.members]
    weights = model.ensemble.weights.tolist()
    return edeconvnet_predict(model.ensemble.members, archs, weights, x, boxes, top_k=settings.top_k).float()


def predict_image(model, image: np.ndarray, settings: InferenceSettings, image_id: str = "") -> np.ndarray:
    """uint8 H,W,3 image -> float32 C,H,W class probabilities with the model's TTA/slide/CRF settings."""
    from segmodels.crf import dense_crf

    probs = predict_batch(model, image[None], settings, [image_id])[0].cpu().numpy()
    if settings.crf:
        probs = dense_crf(image, probs, crf_params(model.spec.crf, settings.crf_params))
    return probs


def probabilities_in_passes(
    model, images: Sequence[np.ndarray], settings: InferenceSettings, image_ids: Sequence[str]
):
    """uint8 H,W,3 images of any sizes -> (indices, N,C,H,W probabilities on the model's device) per forward
    pass: `forward_batches` groups same-size images within the pixel budget."""
    for group in forward_batches(model, [image.shape for image in images], settings):
        stacked = np.stack([images[i] for i in group])
        yield group, predict_batch(model, stacked, settings, [image_ids[i] for i in group])


def labels_in_passes(
    model, images: Sequence[np.ndarray], settings: InferenceSettings, image_ids: Sequence[str]
):
    """uint8 H,W,3 images of any sizes -> (index, int64 H,W class indices on the model's device), image by
    image, from `probabilities_in_passes`. With `settings.crf` each image is refined on the CPU first."""
    import torch

    from segmodels.crf import dense_crf

    params = crf_params(model.spec.crf, settings.crf_params) if settings.crf else None
    for group, probs in probabilities_in_passes(model, images, settings, image_ids):
        for i, image_probs in zip(group, probs, strict=True):
            if params is not None:
                image_probs = torch.from_numpy(dense_crf(images[i], image_probs.cpu().numpy(), params))
            yield i, image_probs.max(0).indices  # max().indices, not argmax: ~4x faster on CPU for C,H,W


def model_payload(folder: Path) -> dict[str, bytes]:
    """A model folder's files as bytes, so Ray actors on any node can rebuild it from the object store."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def materialize(payload: dict[str, bytes]) -> Path:
    """`model_payload`'s bytes written back as a model folder (a new temporary folder) on this node."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="segpipe-model-"))
    for name, data in payload.items():
        (folder / Path(name).name).write_bytes(data)
    return folder
