"""The COCO reader's streaming listing: byte ranges that give back each image's annotations, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.data.layouts.coco import Coco, annotations_to_mask, category_to_class
from pipelines.errors import UserError


def coco_root(tmp_path, text: str, file_names=("a.jpg", "b.jpg", "c.jpg", "déjà vu.jpg")):
    (tmp_path / "train2017").mkdir()
    for name in file_names:
        (tmp_path / "train2017" / name).write_bytes(b"")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(text, encoding="utf-8")
    return str(tmp_path)


def square(ann_id: int, image_id, cat: int, x: float, crowd: int = 0) -> dict:
    if crowd:  # uncompressed RLE over a 20 x 30 image: 40 zeros, 60 ones, the rest zeros
        segmentation = {"counts": [40, 60, 500], "size": [20, 30]}
    else:
        segmentation = [[x, 2.5, x + 9, 2.5, x + 9, 12, x, 12]]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "iscrowd": crowd,
        "segmentation": segmentation,
    }


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_listing_streams_scattered_annotations_back_to_each_image(tmp_path, monkeypatch, ensure_ascii):
    # Annotations before images, one image's annotations scattered through the file, pretty-printed, a
    # non-ASCII file name (escaped, or as UTF-8 bytes that shift the byte offsets) and a chunk of 5
    # bytes so values, keys, numbers and UTF-8 sequences straddle chunk boundaries.
    monkeypatch.setattr("pipelines.data.layouts.coco.CHUNK_BYTES", 5)
    anns = [square(1, 7, 1, 1.0), square(2, 8, 3, 4.0), square(3, 7, 3, 6.0), square(4, 7, 18, 15.5),
            square(5, "x9", 1, 2.0), square(6, 8, 1, 0.0, crowd=1), {"id": 7, "image_id": None},
            "not an annotation", square(8, 7, 1, 18.0)]  # fmt: skip
    images = [{"id": i, "file_name": name, "height": 20, "width": 30, "coco_url": "http://x"}
              for i, name in ((7, "a.jpg"), (8, "b.jpg"), (10, "c.jpg"), ("x9", "déjà vu.jpg"))]  # fmt: skip
    images.append({"id": 11, "file_name": "missing.jpg", "height": 20, "width": 30})
    images.append({"id": 12, "file_name": "d.jpg", "width": 30})
    payload = {"info": {"v": 1.5, "by": "Zoë"}, "annotations": anns, "images": images, "categories": []}
    text = json.dumps(payload, indent=1, ensure_ascii=ensure_ascii)
    layout = Coco(voc_subset=False)
    samples, rejected = layout.list_split(coco_root(tmp_path, text), "train")

    assert [s.image_id for s in samples] == ["a", "b", "c", "déjà vu"]
    assert [(r.image_id, r.reason.split(":")[0]) for r in rejected] == [
        (
            "missing",
            f"listed in {tmp_path}/annotations/instances_train2017.json but the image does not exist",
        ),
        ("d", "malformed image entry"),
    ]
    record = json.loads(samples[0].annotations)
    assert len(record["ranges"]) == 3  # four annotations, of which 3 and 4 follow each other: one read
    classes = category_to_class(False)
    for sample, image_id in zip(samples, (7, 8, 10, "x9"), strict=True):
        mine = [a for a in anns if isinstance(a, dict) and a.get("image_id") == image_id]
        expected = annotations_to_mask(mine, 20, 30, classes)
        assert np.array_equal(layout.label_to_mask(sample, None), expected)
    assert layout.label_to_mask(samples[2], None).max() == 0  # an image without annotations
    assert set(np.unique(layout.label_to_mask(samples[0], None))) == {0, 1, 3, 255, classes[18]}


@pytest.mark.parametrize(
    "text",
    [
        '{"images": [{"id": 1, "file_name": "a.jpg"',  # truncated
        '{"images": []} {}',  # extra data
        '[{"images": []}]',  # not an object
        '{"annotations": []}',  # no images
        '{"images": {"id": 1}}',  # images not a list
        '{"images": [], "annotations": [1 2]}',  # missing comma
    ],
)
def test_files_that_are_not_coco_stop_the_listing(tmp_path, text):
    with pytest.raises(UserError, match="is not a COCO annotation file"):
        Coco(voc_subset=False).list_split(coco_root(tmp_path, text), "train")


def test_a_file_that_is_not_utf8_stops_the_listing(tmp_path):
    root = coco_root(tmp_path, "")
    (tmp_path / "annotations" / "instances_train2017.json").write_bytes(b'{"images": [], "x": "\xff"}')
    with pytest.raises(UserError, match="UnicodeDecodeError"):
        Coco(voc_subset=False).list_split(root, "train")
