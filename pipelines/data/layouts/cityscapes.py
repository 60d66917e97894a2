"""Cityscapes reader: `leftImg8bit/{split}/{city}/*_leftImg8bit.png` + `gtFine/.../*_gtFine_labelIds.png`.

The 34 label ids map to the 19 train ids of the benchmark; every other id is ignored (255). The table
mirrors `cityscapesscripts.helpers.labels` (name, id, trainId, colour), which is not a dependency: it
pulls in six packages, among them the obsolete `typing` backport, for these 35 lines.
"""

from __future__ import annotations

import posixpath
from typing import NamedTuple

import numpy as np

from pipelines import storage
from pipelines.data.layouts.base import BadSample, Layout, Rejected, Sample, decode_label_png
from pipelines.errors import UserError


class Label(NamedTuple):
    name: str
    id: int
    train_id: int
    color: tuple[int, int, int]


LABELS = (
    Label("unlabeled", 0, 255, (0, 0, 0)),
    Label("ego vehicle", 1, 255, (0, 0, 0)),
    Label("rectification border", 2, 255, (0, 0, 0)),
    Label("out of roi", 3, 255, (0, 0, 0)),
    Label("static", 4, 255, (0, 0, 0)),
    Label("dynamic", 5, 255, (111, 74, 0)),
    Label("ground", 6, 255, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, 255, (250, 170, 160)),
    Label("rail track", 10, 255, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, 255, (180, 165, 180)),
    Label("bridge", 15, 255, (150, 100, 100)),
    Label("tunnel", 16, 255, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, 255, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, 255, (0, 0, 90)),
    Label("trailer", 30, 255, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
    Label("license plate", -1, -1, (0, 0, 142)),
)

TRAIN_LABELS = sorted((lab for lab in LABELS if 0 <= lab.train_id < 255), key=lambda lab: lab.train_id)
CITYSCAPES_CLASSES = tuple(lab.name for lab in TRAIN_LABELS)
NUM_LABEL_IDS = 34  # ids 0-33 appear in *_labelIds.png; license plate (-1) is never stored there


def label_id_to_train_id() -> np.ndarray:
    """A 256-entry lookup table: label id -> train id (255 for ignored ids and for values that are no id)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for lab in LABELS:
        if lab.id >= 0:
            lut[lab.id] = lab.train_id
    return lut


def train_id_to_label_id() -> np.ndarray:
    """A 256-entry lookup table: train id -> label id, for predictions in the benchmark's label ids."""
    lut = np.full(256, 255, dtype=np.uint8)
    for lab in TRAIN_LABELS:
        lut[lab.train_id] = lab.id
    return lut


IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes(Layout):
    name = "cityscapes"
    classes = CITYSCAPES_CLASSES
    palette = tuple(lab.color for lab in TRAIN_LABELS)

    def __init__(self) -> None:
        self._lut = label_id_to_train_id()

    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        if not storage.exists(root):
            raise UserError(
                f"dataset root {root} does not exist: pass the folder holding leftImg8bit/ and gtFine/"
            )
        image_dir = storage.join(root, "leftImg8bit", split)
        label_dir = storage.join(root, "gtFine", split)
        for folder in (image_dir, label_dir):
            if not storage.is_dir(folder):
                raise UserError(
                    f"{folder} does not exist: a Cityscapes root holds leftImg8bit/{{split}}/{{city}}/ and "
                    "gtFine/{split}/{city}/; check --root and --splits"
                )
        labels = storage.list_files(label_dir)
        samples, rejected = [], []
        for rel in sorted(storage.list_files(image_dir)):
            if not rel.endswith(IMAGE_SUFFIX):
                continue
            stem = posixpath.basename(rel)[: -len(IMAGE_SUFFIX)]  # {city}_{seq}_{frame}
            label_rel = posixpath.join(posixpath.dirname(rel), stem + LABEL_SUFFIX)
            image, label = storage.join(image_dir, rel), storage.join(label_dir, label_rel)
            if label_rel in labels:
                samples.append(Sample(split, stem, image, label))
            else:
                rejected.append(Rejected(split, stem, label, "image has no gtFine label file"))
        return samples, rejected

    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        ids = decode_label_png(label, sample.label)
        if ids.max(initial=0) >= NUM_LABEL_IDS:
            bad = sorted(set(np.unique(ids[ids >= NUM_LABEL_IDS]).tolist()))
            raise BadSample(
                f"label ids {bad[:5]} are not Cityscapes label ids (0-{NUM_LABEL_IDS - 1})", sample.label
            )
        return self._lut[ids]
