"""ADE20K as the scene-parsing benchmark publishes it (ADEChallengeData2016, the MIT Scene Parsing
challenge that PSPNet won): `images/{training,validation}/ADE_*.jpg` and `annotations/.../ADE_*.png`.

The annotation PNGs store 0 for "other" (not one of the 150 classes; ignored by the benchmark) and 1-150
for the classes of its objectInfo150 list; segpipe's classes are 0-149 (stored value - 1) with 0 -> 255,
as the benchmark scores it (and mmsegmentation's `reduce_zero_label`). Splits: `train` (20,210 images) and
`val` (2,000). The names are the first name of each objectInfo150 entry.
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

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
SPLIT_FOLDERS = {"train": "training", "val": "validation"}


def ade20k_lut() -> np.ndarray:
    """Stored value -> class: 0 ("other") -> 255, 1-150 -> 0-149; anything above stays out of range."""
    lut = np.full(256, 254, dtype=np.uint8)  # 254: beyond the 150 classes, so prepare rejects it
    lut[0] = 255
    lut[1 : len(ADE20K_CLASSES) + 1] = np.arange(len(ADE20K_CLASSES), dtype=np.uint8)
    return lut


class Ade20k(Layout):
    name = "ade20k"
    classes = ADE20K_CLASSES
    default_splits = ("train", "val")

    def __init__(self) -> None:
        from pipelines.data.layouts.voc import voc_colormap

        self.palette = tuple(voc_colormap(len(ADE20K_CLASSES) + 1)[1:])  # no black: 0 is "other"
        self._lut = ade20k_lut()

    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        if split not in SPLIT_FOLDERS:
            raise UserError(f"ADE20K has the splits train and val, not {split!r}: fix --splits")
        base = first_existing(root, ["", "ADEChallengeData2016"], "images", "ADEChallengeData2016")
        folder = SPLIT_FOLDERS[split]
        image_dir = storage.join(base, "images", folder)
        label_dir = storage.join(base, "annotations", folder)
        if not storage.is_dir(image_dir):
            raise UserError(
                f"{image_dir} does not exist: an ADEChallengeData2016 folder holds images/{folder}/"
            )
        return folder_pairs(split, image_dir, label_dir, ".jpg", ".png", "image has no annotation PNG")

    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        values = decode_label_png(label, sample.label)
        if values.max(initial=0) > len(ADE20K_CLASSES):
            raise BadSample(
                f"annotation value {int(values.max())} is beyond ADE20K's 150 classes (0 = other, 1-150)",
                sample.label,
            )
        return self._lut[values]
