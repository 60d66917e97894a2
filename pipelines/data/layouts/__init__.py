"""Readers for the datasets' published on-disk layouts (see shared/PAPERS.md, "Datasets").

Each layout lists a split's samples as small `Sample` records (id, image URI, label source) on the
driver, cheaply, and turns one sample's label into an H x W uint8 class mask on a Ray worker. Problems
found while listing (an id with no file) come back as `Rejected` records; problems found while
converting raise `BadSample`. Missing roots, split lists or annotation files raise `UserError`.
"""

from __future__ import annotations

from pipelines.data.layouts.base import BadSample, Layout, Rejected, Sample
from pipelines.data.layouts.cityscapes import Cityscapes
from pipelines.data.layouts.coco import Coco
from pipelines.data.layouts.voc import Voc, VocAug
from pipelines.errors import UserError

LAYOUTS: dict[str, Layout] = {
    "voc": Voc(),
    "voc_aug": VocAug(),
    "coco": Coco(voc_subset=False),
    "coco_voc": Coco(voc_subset=True),
    "cityscapes": Cityscapes(),
}

__all__ = ["LAYOUTS", "BadSample", "Layout", "Rejected", "Sample", "get_layout"]


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]
