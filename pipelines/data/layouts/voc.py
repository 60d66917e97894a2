"""PASCAL VOC 2012 (`VOCdevkit/VOC2012`) and SBD "trainaug" (`benchmark_RELEASE/dataset`) readers."""

from __future__ import annotations

import io

import numpy as np

from pipelines import storage
from pipelines.data.layouts.base import (
    BadSample,
    Layout,
    Rejected,
    Sample,
    decode_label_png,
    first_existing,
    paired_samples,
    read_split_list,
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The VOC devkit's palette (bit-interleaved class index); entry 255 is the cream void colour."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours.append((r, g, b))
    return colours


def listed_pairs(base: str, lists: str, split: str, images: tuple[str, str], labels: tuple[str, str]):
    """The samples named in `{lists}/{split}.txt` under `base`: image and label folders with their suffixes."""
    folder = storage.join(base, *lists.split("/")) if lists else base
    available = sorted(n[:-4] for n in storage.list_files(folder, recursive=False) if n.endswith(".txt"))
    ids = read_split_list(storage.join(folder, f"{split}.txt"), available)
    return paired_samples(
        split,
        ids,
        images=(storage.join(base, images[0]), images[1]),
        labels=(storage.join(base, labels[0]), labels[1]),
        listed_in=f"{lists}/{split}.txt" if lists else f"{split}.txt",
    )


class Voc(Layout):
    """`JPEGImages/{id}.jpg` + palette PNG `SegmentationClass/{id}.png`, ids in `ImageSets/Segmentation`."""

    name = "voc"
    classes = VOC_CLASSES
    palette = tuple(voc_colormap(len(VOC_CLASSES)))
    label_is_mask_png = True

    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        # --root may be the folder holding VOCdevkit/, VOCdevkit/ itself or VOCdevkit/VOC2012.
        base = first_existing(
            root,
            ["VOCdevkit/VOC2012", "VOC2012", ""],
            "ImageSets/Segmentation",
            "PASCAL VOC 2012 (VOCdevkit/VOC2012)",
        )
        return listed_pairs(
            base, "ImageSets/Segmentation", split, ("JPEGImages", ".jpg"), ("SegmentationClass", ".png")
        )

    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        return decode_label_png(label, sample.label)


class VocAug(Layout):
    """SBD: `img/{id}.jpg` + `cls/{id}.mat` (MATLAB struct `GTcls.Segmentation`), ids in `{split}.txt`."""

    name = "voc_aug"
    classes = VOC_CLASSES
    palette = tuple(voc_colormap(len(VOC_CLASSES)))

    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        base = first_existing(
            root, ["benchmark_RELEASE/dataset", "dataset", ""], "cls", "SBD (benchmark_RELEASE/dataset)"
        )
        return listed_pairs(base, "", split, ("img", ".jpg"), ("cls", ".mat"))

    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        import scipy.io

        try:
            mat = scipy.io.loadmat(io.BytesIO(label), squeeze_me=True, struct_as_record=False)
            segmentation = np.asarray(mat["GTcls"].Segmentation)
        except Exception as err:  # scipy raises ValueError, KeyError, TypeError... for broken .mat files
            raise BadSample(
                f"unreadable GTcls.Segmentation: {type(err).__name__}: {err}", sample.label
            ) from err
        if segmentation.ndim != 2 or segmentation.min(initial=0) < 0 or segmentation.max(initial=0) > 255:
            raise BadSample(
                f"GTcls.Segmentation is not an H x W 0-255 label map: {segmentation.shape}", sample.label
            )
        return segmentation.astype(np.uint8)
