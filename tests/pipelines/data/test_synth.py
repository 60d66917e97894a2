"""`segpipe synth`: each layout's files, naming and label conventions, determinism and the colour cue."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from pycocotools.coco import COCO

import pipelines.data
from pipelines.cli import main
from pipelines.data.layouts.cityscapes import LABELS
from pipelines.data.layouts.coco import COCO_CATEGORIES
from pipelines.data.layouts.voc import voc_colormap
from pipelines.data.synth import SynthConfig, class_colour, synthesize


def synth(tmp_path, layout, **kw):
    return synthesize(SynthConfig(layout=layout, out=str(tmp_path / layout), num_train=6, num_val=3, **kw))


def test_voc_layout_palette_pngs_and_void_band(tmp_path):
    root = synth(tmp_path, "voc") / "VOCdevkit" / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    train, val = (lists / "train.txt").read_text().split(), (lists / "val.txt").read_text().split()
    assert len(train) == 6 and len(val) == 3 and (lists / "trainval.txt").read_text().split() == train + val
    assert all(re.fullmatch(r"20\d\d_\d{6}", i) for i in train + val)
    for image_id in train + val:
        image = Image.open(root / "JPEGImages" / f"{image_id}.jpg")
        label = Image.open(root / "SegmentationClass" / f"{image_id}.png")
        assert image.format == "JPEG" and image.mode == "RGB"
        assert label.mode == "P" and label.size == image.size
        assert label.getpalette()[: 21 * 3] == [v for c in voc_colormap(21) for v in c]
        mask = np.asarray(label)
        assert set(np.unique(mask)) <= set(range(21)) | {255}
        assert (mask == 255).any() and (mask > 0).any()
        # The void band separates every pair of different labels: no two neighbours carry different classes.
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            assert not ((a != b) & (a != 255) & (b != 255)).any()
        assert 96 <= image.height <= 120 and 128 <= image.width <= 160


def test_voc_aug_layout_voc_and_sbd_with_overlapping_ids(tmp_path):
    root = synth(tmp_path, "voc_aug")
    voc, sbd = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE" / "dataset"
    lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = (set((lists / f"{s}.txt").read_text().split()) for s in ("train", "val"))
    sbd_train, sbd_val = (set((sbd / f"{s}.txt").read_text().split()) for s in ("train", "val"))
    assert len(voc_train) == 6 and len(voc_val) == 3 and len(sbd_train | sbd_val) == 6 // 3 * 2 + 1 + 6
    assert not voc_train & voc_val and not sbd_train & sbd_val
    assert (lists / "trainval.txt").read_text().split() == sorted(voc_train | voc_val)
    seg11valid = set((Path(pipelines.data.__file__).parent / "lists" / "seg11valid.txt").read_text().split())
    # The overlaps of the real lists: ids annotated by both, VOC12 val ids in SBD train, ids in one source only.
    assert voc_train & sbd_train and voc_train & sbd_val and voc_val & sbd_train
    assert voc_train - sbd_train - sbd_val and (sbd_train | sbd_val) - voc_train - voc_val
    assert len(voc_val & seg11valid) == 2 and not seg11valid & (sbd_train | voc_train)
    for image_id in sorted(sbd_train | sbd_val):
        mat = scipy.io.loadmat(sbd / "cls" / f"{image_id}.mat", squeeze_me=True, struct_as_record=False)
        seg = mat["GTcls"].Segmentation
        assert seg.dtype == np.uint8 and seg.shape == Image.open(sbd / "img" / f"{image_id}.jpg").size[::-1]
        assert set(np.unique(seg)) <= set(range(21))  # SBD has no void band
        assert sorted(np.atleast_1d(mat["GTcls"].CategoriesPresent)) == sorted(set(np.unique(seg)) - {0})
        if image_id in voc_train | voc_val:  # the same photograph, labelled differently beyond the void band
            assert (sbd / "img" / f"{image_id}.jpg").read_bytes() == (
                voc / "JPEGImages" / f"{image_id}.jpg"
            ).read_bytes()
            voc_mask = np.asarray(Image.open(voc / "SegmentationClass" / f"{image_id}.png"))
            assert (voc_mask[voc_mask != 255] != seg[voc_mask != 255]).any()


def test_coco_layout_categories_polygons_and_crowd_rle(tmp_path):
    root = synth(tmp_path, "coco", seed=1)
    for split, count in (("train", 6), ("val", 3)):
        coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        cats = coco.loadCats(coco.getCatIds())
        assert [(c["id"], c["name"]) for c in cats] == list(COCO_CATEGORIES)  # 80 ids in 1-90, with gaps
        assert len(coco.getImgIds()) == count
        for img in coco.loadImgs(coco.getImgIds()):
            assert img["file_name"] == f"{img['id']:012d}.jpg"
            assert Image.open(root / f"{split}2017" / img["file_name"]).size == (img["width"], img["height"])
    coco = COCO(str(root / "annotations" / "instances_train2017.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    crowds = [a for a in anns if a["iscrowd"]]
    assert crowds and len(crowds) < len(anns)
    for ann in anns:
        img = coco.loadImgs(ann["image_id"])[0]
        if ann["iscrowd"]:  # uncompressed RLE, as COCO stores crowds
            assert isinstance(ann["segmentation"]["counts"], list)
            assert sum(ann["segmentation"]["counts"]) == img["height"] * img["width"]
        else:
            assert len(ann["segmentation"][0]) >= 6
        assert coco.annToMask(ann).sum() == pytest.approx(ann["area"])


def test_cityscapes_layout_names_label_ids_and_companions(tmp_path):
    root = synth(tmp_path, "cityscapes")
    images = sorted((root / "leftImg8bit").rglob("*.png"))
    assert len(images) == 9
    colours = {lab.id: lab.color for lab in LABELS if lab.id >= 0}
    for image in images:
        split, city = image.parts[-3], image.parts[-2]
        assert re.fullmatch(rf"{city}_\d{{6}}_\d{{6}}_leftImg8bit\.png", image.name)
        stem = image.name[: -len("_leftImg8bit.png")]
        gt = root / "gtFine" / split / city
        label_ids = Image.open(gt / f"{stem}_gtFine_labelIds.png")
        ids = np.asarray(label_ids)
        assert label_ids.mode == "L" and label_ids.size == Image.open(image).size == (192, 96)
        assert ids.max() <= 33 and 1 in ids  # the ego vehicle: a void id, as in the real data
        colour = np.asarray(Image.open(gt / f"{stem}_gtFine_color.png"))
        assert (colour == np.array([colours[i] for i in range(34)], np.uint8)[ids]).all()
        instances = np.asarray(Image.open(gt / f"{stem}_gtFine_instanceIds.png"))
        assert ((instances // 1000 == 26) == (ids == 26)).all()  # cars carry id * 1000 + instance
        polygons = json.loads((gt / f"{stem}_gtFine_polygons.json").read_text())
        assert polygons["imgHeight"] == 96 and {o["label"] for o in polygons["objects"]} >= {
            "road",
            "sky",
            "car",
        }
    assert {p.parts[-3] for p in images} == {"train", "val"}


def test_same_seed_same_bytes_and_colour_cue(tmp_path):
    a = synthesize(SynthConfig("voc", str(tmp_path / "a"), num_train=4, num_val=0, seed=5, size=(64, 80)))
    b = synthesize(SynthConfig("voc", str(tmp_path / "b"), num_train=4, num_val=0, seed=5, size=(64, 80)))
    c = synthesize(SynthConfig("voc", str(tmp_path / "c"), num_train=4, num_val=0, seed=6, size=(64, 80)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".jpg")
    # Each class shows in colour: object pixels sit near their class colour, far from the others.
    base = a / "VOCdevkit" / "VOC2012"
    for jpg in (base / "JPEGImages").glob("*.jpg"):
        image = np.asarray(Image.open(jpg), float)
        mask = np.asarray(Image.open(base / "SegmentationClass" / f"{jpg.stem}.png"))
        assert image.shape[:2] == (64, 80)
        for cls in set(np.unique(mask)) - {0, 255}:
            mean = image[mask == cls].mean(axis=0)
            distances = [np.linalg.norm(mean - class_colour(k - 1, 20)) for k in range(1, 21)]
            assert np.argmin(distances) == cls - 1 and min(distances) < 30


def test_cli_synth_and_bad_options(tmp_path, capsys):
    assert main(["synth", "--layout", "cityscapes", "--out", str(tmp_path / "c"), "--num-train", "2",
                 "--num-val", "1", "--size", "64", "128"]) == 0  # fmt: skip
    assert len(list((tmp_path / "c" / "leftImg8bit").rglob("*_leftImg8bit.png"))) == 3
    assert main(["synth", "--layout", "coco", "--out", str(tmp_path / "x"), "--size", "8", "8"]) == 2
    assert "too small" in capsys.readouterr().err
