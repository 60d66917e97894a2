"""PASCAL VOC 2012 (`VOCdevkit/VOC2012`) and VOC 2012 + SBD (`benchmark_RELEASE/dataset`) readers.

`voc_aug` reads a root holding both and lists the splits the papers train and score on (shared/PAPERS.md):

- `train_aug`: (SBD train + SBD val + VOC12 train) - VOC12 val, 10,582 images on the real data; DeepLab,
  PSPNet, Dilation and DeconvNet train on it.
- `val`: VOC12 val (1,449 images), where those papers score.
- `sbd_train`: SBD train (8,498 images), FCN's training set, with SBD's own labels as FCN's SBDDSegDataLayer
  reads them (it overlaps VOC12 val, so it is never scored on `val`).
- `seg11valid`: FCN's validation set, VOC2011 val minus SBD train (FCN paper, footnote 7): the 736 ids of
  fcn.berkeleyvision.org's data/pascal/seg11valid.txt (commit 1305c73), shipped as `lists/seg11valid.txt`. All
  736 are in VOC12 val (checked against DeepLab's 1,449-id val list), so the split is the listed ids that the
  root's VOC12 val.txt lists, read from VOC2012 with its labels; a root with a partial VOC12 (the synthetic one)
  gets the listed ids it has.

Which label wins for an id in both sources: VOC12's SegmentationClass PNG, as the common converters do.
mmsegmentation's tools/dataset_converters/voc_aug.py trains on VOC12 train read from SegmentationClass plus
"aug" = SBD train + val - VOC12 trainval read from the converted .mat files (SegmentationClassAug), and the
DeepLab recipe for SegmentationClassAug (train-DeepLab's README) converts every SBD .mat and then copies the
VOC12 trainval PNGs over them. The reason: VOC's PNGs are the benchmark's own ground truth, drawn with the
5-px void band on object borders that scoring ignores, while SBD's labels were collected on Amazon Mechanical
Turk for a boundary benchmark, with no void band. So a `train_aug` id listed in VOC12 train.txt is read from
VOCdevkit (image and PNG), every other one from SBD (img/*.jpg, the same photographs, and cls/*.mat).
"""

from __future__ import annotations

import io
from importlib import resources

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
from pipelines.errors import UserError

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


VOC_LISTS = "ImageSets/Segmentation"
VOC_FILES = (("JPEGImages", ".jpg"), ("SegmentationClass", ".png"))
SBD_FILES = (("img", ".jpg"), ("cls", ".mat"))


def list_ids(base: str, lists: str, name: str) -> list[str]:
    """The ids of `{lists}/{name}.txt` under `base` (`lists` "" for `base` itself)."""
    folder = storage.join(base, *lists.split("/")) if lists else base
    available = sorted(n[:-4] for n in storage.list_files(folder, recursive=False) if n.endswith(".txt"))
    return read_split_list(storage.join(folder, f"{name}.txt"), available)


def pairs(base: str, split: str, ids: list[str], files, listed_in: str):
    """`paired_samples` for ids whose (image folder, suffix), (label folder, suffix) are `files` under `base`."""
    (images, image_ext), (labels, label_ext) = files
    return paired_samples(
        split,
        ids,
        images=(storage.join(base, images), image_ext),
        labels=(storage.join(base, labels), label_ext),
        listed_in=listed_in,
    )


def voc_base(root: str, needed_by: str) -> str:
    """VOCdevkit/VOC2012 under `root`: `root` may be the folder holding VOCdevkit/, VOCdevkit/ itself or
    VOCdevkit/VOC2012."""
    return first_existing(
        root,
        ["VOCdevkit/VOC2012", "VOC2012", ""],
        VOC_LISTS,
        f"PASCAL VOC 2012 (VOCdevkit/VOC2012){needed_by}",
    )


def sbd_base(root: str, needed_by: str) -> str:
    """SBD's dataset folder under `root`, as unpacked (benchmark_RELEASE/) or as mmsegmentation moves it."""
    return first_existing(
        root,
        ["benchmark_RELEASE/dataset", "VOCdevkit/VOCaug/dataset", "VOCaug/dataset", "dataset", ""],
        "cls",
        f"SBD (benchmark_RELEASE/dataset){needed_by}",
    )


def seg11valid_ids() -> list[str]:
    """FCN's 736 seg11valid ids (fcn.berkeleyvision.org data/pascal/seg11valid.txt), in the file's order."""
    text = resources.files("pipelines.data").joinpath("lists", "seg11valid.txt").read_text()
    return text.split()


class Voc(Layout):
    """`JPEGImages/{id}.jpg` + palette PNG `SegmentationClass/{id}.png`, ids in `ImageSets/Segmentation`."""

    name = "voc"
    classes = VOC_CLASSES
    palette = tuple(voc_colormap(len(VOC_CLASSES)))
    label_is_mask_png = True

    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        base = voc_base(root, "")
        return pairs(base, split, list_ids(base, VOC_LISTS, split), VOC_FILES, f"{VOC_LISTS}/{split}.txt")

    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        return decode_label_png(label, sample.label)


class VocAug(Layout):
    """VOC 2012 + SBD: the papers' splits `train_aug`, `val`, `sbd_train`, `seg11valid` (module docstring).

    Labels are VOC palette PNGs or SBD `cls/{id}.mat` (MATLAB struct `GTcls.Segmentation`), per sample.
    """

    name = "voc_aug"
    classes = VOC_CLASSES
    palette = tuple(voc_colormap(len(VOC_CLASSES)))
    default_splits = ("train_aug", "val", "sbd_train", "seg11valid")

    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        if split not in self.default_splits:
            raise UserError(
                f"--dataset voc_aug has no split {split!r}: choose from {', '.join(self.default_splits)}"
            )
        needed_by = f", which --dataset voc_aug needs for split {split!r} (or choose other --splits)"
        if split == "sbd_train":
            sbd = sbd_base(root, needed_by)
            return pairs(sbd, split, list_ids(sbd, "", "train"), SBD_FILES, "SBD train.txt")
        voc = voc_base(root, needed_by)
        val = list_ids(voc, VOC_LISTS, "val")
        if split == "val":
            return pairs(voc, split, val, VOC_FILES, f"{VOC_LISTS}/val.txt")
        if split == "seg11valid":
            in_val = set(val)
            ids = [i for i in seg11valid_ids() if i in in_val]
            return pairs(voc, split, ids, VOC_FILES, f"seg11valid.txt and {VOC_LISTS}/val.txt")
        # train_aug: VOC12 train from VOCdevkit (its label wins), the rest of SBD train + val from SBD.
        sbd = sbd_base(root, needed_by)
        excluded = set(val)
        voc_ids = [i for i in list_ids(voc, VOC_LISTS, "train") if i not in excluded]
        excluded.update(voc_ids)
        sbd_listed = dict.fromkeys(list_ids(sbd, "", "train") + list_ids(sbd, "", "val"))
        sbd_ids = [i for i in sbd_listed if i not in excluded]
        voc_samples, voc_rejected = pairs(voc, split, voc_ids, VOC_FILES, f"{VOC_LISTS}/train.txt")
        sbd_samples, sbd_rejected = pairs(sbd, split, sbd_ids, SBD_FILES, "SBD train.txt or val.txt")
        return voc_samples + sbd_samples, voc_rejected + sbd_rejected

    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        if sample.label.endswith(".png"):
            return decode_label_png(label, sample.label)
        return sbd_mask(label, sample.label)


def sbd_mask(label: bytes | None, path: str) -> np.ndarray:
    """An SBD `cls/{id}.mat` file's `GTcls.Segmentation` -> H x W uint8."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(io.BytesIO(label), squeeze_me=True, struct_as_record=False)
        segmentation = np.asarray(mat["GTcls"].Segmentation)
    except Exception as err:  # scipy raises ValueError, KeyError, TypeError... for broken .mat files
        raise BadSample(f"unreadable GTcls.Segmentation: {type(err).__name__}: {err}", path) from err
    if segmentation.ndim != 2 or segmentation.min(initial=0) < 0 or segmentation.max(initial=0) > 255:
        raise BadSample(f"GTcls.Segmentation is not an H x W 0-255 label map: {segmentation.shape}", path)
    return segmentation.astype(np.uint8)
