"""Readers for the datasets' published on-disk layouts (see shared/PAPERS.md, "Datasets").

Each layout lists a split's samples as small `Sample` records (id, image URI, label source) on the
driver, cheaply, and turns one sample's label into an H x W uint8 class mask on a Ray worker. Problems
found while listing (an id with no file) come back as `Rejected` records; problems found while
converting raise `BadSample`. Missing roots, split lists or annotation files raise `UserError`.
"""

from __future__ import annotations

from pipelines.data.layouts.ade20k import Ade20k
from pipelines.data.layouts.base import BadSample, Layout, Rejected, Sample
from pipelines.data.layouts.camvid import CamVid
from pipelines.data.layouts.cityscapes import Cityscapes
from pipelines.data.layouts.coco import Coco
from pipelines.data.layouts.folder import Folder
from pipelines.data.layouts.voc import Voc, VocAug
from pipelines.errors import UserError

LAYOUTS: dict[str, Layout] = {
    "voc": Voc(),
    "voc_aug": VocAug(),
    "coco": Coco(voc_subset=False),
    "coco_voc": Coco(voc_subset=True),
    "cityscapes": Cityscapes(),
    "ade20k": Ade20k(),
    "camvid": CamVid(),
}
# Layouts whose classes come from the dataset root itself (a classes file), built per root.
ROOT_LAYOUTS = {"folder": Folder.from_root}
DATASETS = (*LAYOUTS, *ROOT_LAYOUTS)

__all__ = ["DATASETS", "BadSample", "Layout", "Rejected", "Sample", "check_dataset", "get_layout"]


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def get_layout(name: str, root: str = "", classes_file: str = "") -> Layout:
    """The reader for dataset `name`; `folder` reads its classes from `root` (or `classes_file`)."""
    check_dataset(name)
    if name in ROOT_LAYOUTS:
        return ROOT_LAYOUTS[name](root, classes_file)
    if classes_file:
        raise UserError(f"--classes is for --dataset folder; {name} has its published classes")
    return LAYOUTS[name]
