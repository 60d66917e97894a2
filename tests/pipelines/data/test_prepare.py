"""`segpipe prepare` on local disk: every layout, exact masks, label mappings, quarantine, threshold, errors."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

import pipelines.data
from pipelines.cli import build_parser, main
from pipelines.data.dataset import COLUMNS, decode_mask, open_prepared
from pipelines.data.layouts import DATASETS, get_layout
from pipelines.data.layouts.cityscapes import CITYSCAPES_CLASSES, label_id_to_train_id
from pipelines.data.layouts.coco import COCO_CATEGORIES, COCO_VOC_IDS, annotations_to_mask, category_to_class
from pipelines.data.layouts.voc import VOC_CLASSES
from pipelines.data.prepare import PrepareConfig, TooManyBadSamples, prepare, shuffled
from pipelines.data.synth import SYNTH_LAYOUTS, SynthConfig, synthesize
from pipelines.errors import UserError
from pipelines.images import decode_image

NUM_TRAIN, NUM_VAL = 10, 5

# shared/PAPERS.md, "Cityscapes": the published label id -> train id table.
PUBLISHED_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
PUBLISHED_CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                                "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                                "bus", "train", "motorcycle", "bicycle")  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    return {
        layout: synthesize(
            SynthConfig(layout, str(root / layout), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=7)
        )
        for layout in ("voc", "voc_aug", "coco", "cityscapes")
    }


def run(dataset: str, root, out, **kw):
    return prepare(PrepareConfig(dataset=dataset, root=str(root), out=str(out), progress=False, **kw))


def rows_by_id(path, split: str) -> dict[str, dict]:
    return {r["image_id"]: r for r in open_prepared(path).split(split).take_all()}


def expected_voc(root: Path, image_id: str) -> tuple[bytes, np.ndarray]:
    base = root / "VOCdevkit" / "VOC2012"
    return (base / "JPEGImages" / f"{image_id}.jpg").read_bytes(), np.asarray(
        Image.open(base / "SegmentationClass" / f"{image_id}.png")
    )


def expected_voc_aug(root: Path, image_id: str) -> tuple[bytes, np.ndarray]:
    base = root / "benchmark_RELEASE" / "dataset"
    mat = scipy.io.loadmat(base / "cls" / f"{image_id}.mat", squeeze_me=True, struct_as_record=False)
    return (base / "img" / f"{image_id}.jpg").read_bytes(), mat["GTcls"].Segmentation


def expected_cityscapes(root: Path, image_id: str, split: str) -> tuple[bytes, np.ndarray]:
    city = image_id.split("_")[0]
    ids = np.asarray(Image.open(root / "gtFine" / split / city / f"{image_id}_gtFine_labelIds.png"))
    train_ids = np.vectorize(lambda i: PUBLISHED_TRAIN_IDS.get(int(i), 255))(ids).astype(np.uint8)
    return (root / "leftImg8bit" / split / city / f"{image_id}_leftImg8bit.png").read_bytes(), train_ids


def check_manifest(out, dataset: str, classes) -> None:
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["dataset"] == dataset
    assert tuple(manifest["classes"]) == tuple(classes) and len(manifest["palette"]) == len(classes)
    assert manifest["ignore_index"] == 255 and manifest["quarantine"] == "quarantine.jsonl"
    assert len(manifest["fingerprint"]) == 64 and manifest["created"] and manifest["source"]
    for split, rows in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        info = manifest["splits"][split]
        assert info["rows"] == rows and info["quarantined"] == 0 and len(info["class_pixels"]) == len(classes)
        assert all((Path(out) / f).is_file() for f in info["files"])
    assert (Path(out) / "quarantine.jsonl").read_text() == ""


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_exact_rows_and_mask_round_trip(dataset, sources, tmp_path, ray_session):
    src = sources["voc" if dataset == "voc" else dataset]
    result = run(dataset, src, tmp_path / "out")
    assert result.published and result.quarantined == 0
    assert {s: r.rows for s, r in result.splits.items()} == {"train": NUM_TRAIN, "val": NUM_VAL}
    layout_classes = {"voc": VOC_CLASSES, "cityscapes": PUBLISHED_CITYSCAPES_CLASSES}
    check_manifest(tmp_path / "out", dataset, layout_classes[dataset])
    prepared = open_prepared(tmp_path / "out")
    for split in ("train", "val"):
        rows = rows_by_id(tmp_path / "out", split)
        assert len(rows) == (NUM_TRAIN if split == "train" else NUM_VAL)
        pixels = np.zeros(prepared.num_classes, np.int64)
        for image_id, row in rows.items():
            if dataset == "cityscapes":
                image_bytes, mask = expected_cityscapes(src, image_id, split)
            else:
                image_bytes, mask = expected_voc(src, image_id)
            assert set(row) == set(COLUMNS)
            assert row["image"] == image_bytes  # passed through untouched
            if dataset == "voc":  # a valid source label PNG is kept as it is, not re-encoded
                label = src / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{image_id}.png"
                assert row["mask"] == label.read_bytes()
            assert np.array_equal(decode_mask(row["mask"]), mask)
            assert decode_image(row["image"]).shape == (row["height"], row["width"], 3) == (*mask.shape, 3)
            pixels += np.bincount(mask[mask != 255], minlength=prepared.num_classes)
        assert prepared.manifest.splits[split].class_pixels == tuple(pixels)
        if dataset == "cityscapes":
            # Listed city by city, written in a fixed shuffled order: a batch of a few rows mixes cities.
            ids = prepared.read_rows(split, ["image_id"])["image_id"].to_pylist()
            listed, _ = get_layout("cityscapes").list_split(str(src), split)
            assert ids == [sample.image_id for sample in shuffled(listed)]
            cities = [image_id.split("_")[0] for image_id in ids]
            assert cities != sorted(cities) and len(set(cities[:4])) > 1


def test_voc_aug_papers_splits_and_the_voc_label_wins(sources, tmp_path, ray_session):
    src = sources["voc_aug"]
    voc_lists = src / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    sbd_lists = src / "benchmark_RELEASE" / "dataset"
    voc_train, voc_val = (set((voc_lists / f"{s}.txt").read_text().split()) for s in ("train", "val"))
    sbd_train, sbd_val = (set((sbd_lists / f"{s}.txt").read_text().split()) for s in ("train", "val"))
    fcn_seg11valid = set(
        (Path(pipelines.data.__file__).parent / "lists" / "seg11valid.txt").read_text().split()
    )
    # shared/PAPERS.md, "Datasets"; seg11valid restricted to the images this root has.
    expected = {
        "train_aug": (sbd_train | sbd_val | voc_train) - voc_val,
        "val": voc_val,
        "sbd_train": sbd_train,
        "seg11valid": fcn_seg11valid & voc_val,
    }
    both = voc_train & (sbd_train | sbd_val)
    assert both and voc_val & sbd_train and 0 < len(expected["seg11valid"]) < len(voc_val)  # the cases exist
    result = run("voc_aug", src, tmp_path / "out")
    assert result.quarantined == 0
    assert {s: r.rows for s, r in result.splits.items()} == {s: len(ids) for s, ids in expected.items()}
    for split, ids in expected.items():
        rows = rows_by_id(tmp_path / "out", split)
        assert set(rows) == ids, split
        for image_id, row in rows.items():
            # VOC12's PNG wins for an id in both sources; sbd_train keeps SBD's labels (FCN's data layer).
            from_voc = split in ("val", "seg11valid") or (split == "train_aug" and image_id in voc_train)
            image_bytes, mask = (expected_voc if from_voc else expected_voc_aug)(src, image_id)
            assert row["image"] == image_bytes and np.array_equal(decode_mask(row["mask"]), mask)
    train_aug, sbd_rows = rows_by_id(tmp_path / "out", "train_aug"), rows_by_id(tmp_path / "out", "sbd_train")
    for image_id in both & sbd_train:  # the same image, two different labels: each split keeps its own
        voc_mask, sbd_mask = decode_mask(train_aug[image_id]["mask"]), decode_mask(sbd_rows[image_id]["mask"])
        assert (voc_mask == 255).any() and not (sbd_mask == 255).any()
        assert (voc_mask[voc_mask != 255] != sbd_mask[voc_mask != 255]).any()
    with pytest.raises(
        UserError, match="no split 'train': choose from train_aug, val, sbd_train, seg11valid"
    ):
        get_layout("voc_aug").list_split(str(src), "train")


def test_seg11valid_is_the_fcn_repositorys_list():
    """fcn.berkeleyvision.org data/pascal/seg11valid.txt at commit 1305c73, byte for byte."""
    data = (Path(pipelines.data.__file__).parent / "lists" / "seg11valid.txt").read_bytes()
    assert (
        hashlib.sha256(data).hexdigest() == "4ca991bd72c251fd2485eaa9e29536502ea3800d1b1c17c151fd6a04bcfbc2cc"
    )
    ids = data.decode().split()
    assert len(ids) == len(set(ids)) == 736 and ids[:2] == ["2007_000033", "2007_000042"]


def test_cityscapes_table_matches_the_published_one():
    lut = label_id_to_train_id()
    assert CITYSCAPES_CLASSES == PUBLISHED_CITYSCAPES_CLASSES
    assert {i: int(lut[i]) for i in range(256) if lut[i] != 255} == PUBLISHED_TRAIN_IDS


def test_coco_voc_subset_names_match_voc():
    names = dict(COCO_CATEGORIES)
    aliases = {"airplane": "aeroplane", "motorcycle": "motorbike", "couch": "sofa", "dining table": "diningtable",
               "potted plant": "pottedplant", "tv": "tvmonitor"}  # fmt: skip
    assert [aliases.get(names[i], names[i]) for i in COCO_VOC_IDS] == list(VOC_CLASSES[1:])
    voc = category_to_class(voc_subset=True)
    assert (
        voc[1] == VOC_CLASSES.index("person") and voc[25] == 0 and voc[72] == VOC_CLASSES.index("tvmonitor")
    )
    coco = category_to_class(voc_subset=False)
    assert len(COCO_CATEGORIES) == 80 and coco[1] == 1 and coco[13] == 12 and coco[90] == 80


def square(x, y, s, cat, crowd=0):
    return {"id": x * 100 + y, "category_id": cat, "iscrowd": crowd,
            "segmentation": [[x, y, x + s, y, x + s, y + s, x, y + s]]}  # fmt: skip


def test_coco_overlap_crowd_and_voc_subset_rules():
    h, w = 40, 60
    anns = [square(5, 5, 20, 1), square(15, 15, 20, 3), square(40, 5, 10, 1), square(42, 7, 10, 1),
            square(30, 28, 10, 25), square(2, 30, 6, 44, crowd=1)]  # fmt: skip
    full = annotations_to_mask(anns, h, w, category_to_class(False))
    person, car, giraffe = 1, 3, category_to_class(False)[25]
    assert full[10, 10] == person and full[30, 20] == car and full[34, 38] == giraffe
    assert full[20, 20] == 255  # person and car overlap: different classes -> ignore
    assert full[32, 33] == 255  # car and giraffe overlap
    assert full[12, 45] == person  # two persons overlap: same class, kept
    assert full[32, 4] == 255  # crowd region
    voc = annotations_to_mask(anns, h, w, category_to_class(True))
    assert voc[34, 38] == 0  # giraffe is not a VOC class: background...
    assert voc[32, 33] == VOC_CLASSES.index("car")  # ...so it no longer conflicts with the car
    assert voc[20, 20] == 255 and voc[10, 10] == VOC_CLASSES.index("person")
    assert voc[32, 4] == 255  # a crowd of bottles: a VOC class, ignored
    assert voc[0, 0] == full[0, 0] == 0


def expected_coco(coco: COCO, img_id: int, classes: dict[int, int]) -> np.ndarray:
    """Independent of the reader: pycocotools annToMask per instance, then the overlap / crowd rules."""
    img = coco.loadImgs(img_id)[0]
    seen = np.zeros((256, img["height"], img["width"]), bool)
    crowd = np.zeros((img["height"], img["width"]), bool)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
        cls = classes[ann["category_id"]]
        if cls and ann["iscrowd"]:
            crowd |= coco.annToMask(ann).astype(bool)
        elif cls:
            seen[cls] |= coco.annToMask(ann).astype(bool)
    mask = np.argmax(seen, axis=0).astype(np.uint8)
    mask[(seen.sum(axis=0) > 1) | crowd] = 255
    return mask


@pytest.mark.parametrize("dataset", ["coco", "coco_voc"])
def test_coco_masks_match_pycocotools(dataset, sources, tmp_path, ray_session):
    result = run(dataset, sources["coco"], tmp_path / "out")
    assert {s: r.rows for s, r in result.splits.items()} == {"train": NUM_TRAIN, "val": NUM_VAL}
    classes = category_to_class(dataset == "coco_voc")
    for split in ("train", "val"):
        coco = COCO(str(sources["coco"] / "annotations" / f"instances_{split}2017.json"))
        rows = rows_by_id(tmp_path / "out", split)
        assert sorted(rows) == sorted(f"{i:012d}" for i in coco.getImgIds())
        agree = total = 0
        for img_id in coco.getImgIds():
            mask = decode_mask(rows[f"{img_id:012d}"]["mask"])
            assert np.array_equal(mask, expected_coco(coco, img_id, classes))
            # Within rasterisation tolerance of an independent rasteriser (PIL) on the same polygons.
            drawn = Image.new("L", mask.shape[::-1], 0)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False)):
                if classes[ann["category_id"]]:
                    ImageDraw.Draw(drawn).polygon(ann["segmentation"][0], fill=classes[ann["category_id"]])
            drawn, valid = np.asarray(drawn), mask != 255
            agree += int((drawn[valid] == mask[valid]).sum())
            total += int(valid.sum())
        assert agree / total > 0.97


# ------------------------------------------------------------------------------ bad input
def bomb_png() -> bytes:
    """A 65-byte PNG whose header claims 100000 x 100000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture
def broken_voc(sources, tmp_path) -> tuple[Path, dict[str, str]]:
    """The synthetic VOC with one sample of each bad kind; returns (root, {image_id: expected reason})."""
    root = tmp_path / "broken"
    shutil.copytree(sources["voc"], root)
    base = root / "VOCdevkit" / "VOC2012"
    ids = (base / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    jpg, png = (
        (lambda i: base / "JPEGImages" / f"{i}.jpg"),
        (lambda i: base / "SegmentationClass" / f"{i}.png"),
    )
    data = jpg(ids[0]).read_bytes()
    jpg(ids[0]).write_bytes(data[: len(data) // 2])
    jpg(ids[1]).write_bytes(b"")
    jpg(ids[2]).write_text("this is not a JPEG\n")
    jpg(ids[3]).write_bytes(bomb_png())
    label = Image.open(png(ids[4]))
    label.resize((label.width + 8, label.height)).save(png(ids[4]))
    values = np.asarray(Image.open(png(ids[5]))).copy()
    values[:4, :4] = 42
    Image.fromarray(values).save(png(ids[5]))
    png(ids[6]).write_bytes(b"")
    with open(base / "ImageSets" / "Segmentation" / "train.txt", "a") as f:
        f.write("2099_000001\n")
    reasons = {ids[0]: "truncated", ids[1]: "empty file", ids[2]: "not a JPEG or PNG image", ids[3]: "decompression bomb",
               ids[4]: "label is", ids[5]: "outside the classes", ids[6]: "empty file",
               "2099_000001": "image does not exist"}  # fmt: skip
    return root, reasons


def test_each_bad_kind_is_quarantined_and_no_good_sample_lost(broken_voc, sources, tmp_path, ray_session):
    root, reasons = broken_voc
    result = run("voc", root, tmp_path / "out", max_bad_fraction=0.5)
    assert result.published and result.quarantined == len(reasons)
    lines = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert {q["image_id"] for q in lines} == set(reasons)
    for q in lines:
        assert reasons[q["image_id"]] in q["reason"], q
        assert q["split"] == "train" and q["path"]
    base = sources["voc"] / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    good = set((base / "train.txt").read_text().split()) - set(reasons)
    rows = rows_by_id(tmp_path / "out", "train")
    assert set(rows) == good
    for image_id, row in rows.items():
        assert np.array_equal(decode_mask(row["mask"]), expected_voc(sources["voc"], image_id)[1])
    assert result.splits["train"].rows == len(good) and result.splits["train"].quarantined == len(reasons)
    assert len(rows_by_id(tmp_path / "out", "val")) == NUM_VAL


def test_bad_fraction_over_threshold_fails_and_publishes_nothing(broken_voc, tmp_path, capsys, ray_session):
    root, reasons = broken_voc
    with pytest.raises(TooManyBadSamples) as info:
        run("voc", root, tmp_path / "out", max_bad_fraction=0.1)
    assert info.value.result.quarantined == len(reasons) and not info.value.result.published
    out = tmp_path / "cli"
    code = main(["prepare", "--dataset", "voc", "--root", str(root), "--out", str(out), "--no-progress",
                 "--max-bad-fraction", "0.1", "--json-out", str(tmp_path / "summary.json")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2
    assert "NOT published" in captured.out and "quarantined" in captured.out
    assert "--max-bad-fraction" in captured.err and "quarantine.jsonl" in captured.err
    assert json.loads((tmp_path / "summary.json").read_text())["quarantined"] == len(reasons)
    assert sorted(p.name for p in out.iterdir()) == ["quarantine.jsonl"]  # no manifest, shards or staging
    with pytest.raises(UserError, match="no manifest.json"):
        open_prepared(out)


def test_broken_coco_annotations_quarantine_only_their_images(sources, tmp_path, ray_session):
    root = tmp_path / "coco"
    shutil.copytree(sources["coco"], root)
    ann_file = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    first = {}
    for ann in data["annotations"]:
        first.setdefault(ann["image_id"], ann)
    victims = sorted(first)[:4]
    first[victims[0]]["segmentation"] = "garbage"
    first[victims[1]]["segmentation"] = [[1, 2, 3]]
    first[victims[2]]["category_id"] = 999
    first[victims[3]]["segmentation"] = {"counts": [5, 5], "size": [3, 3]}
    no_height = next(i for i in data["images"] if i["id"] not in victims)
    del no_height["height"]
    ann_file.write_text(json.dumps(data))
    result = run("coco", root, tmp_path / "out", splits=("train",), max_bad_fraction=0.6)
    lines = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(q["path"].endswith("instances_train2017.json") for q in lines)
    assert {q["image_id"] for q in lines} == {f"{v:012d}" for v in [*victims, no_height["id"]]}
    assert "malformed image entry" in next(
        q["reason"] for q in lines if q["image_id"] == f"{no_height['id']:012d}"
    )
    assert result.splits["train"].rows == NUM_TRAIN - 5


# ------------------------------------------------------------------------------ missing inputs
@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if prepare gets as far as starting (or attaching to) Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the inputs were validated")

    monkeypatch.setattr("pipelines.runtime.ensure_ray", refuse)


@pytest.mark.parametrize(
    "dataset, layout, breakage, message",
    [
        ("voc", "voc", lambda r: shutil.rmtree(r), "does not exist"),
        ("voc", "voc", lambda r: (r / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink(), "val.txt"),
        ("voc_aug", "voc_aug", lambda r: (r / "benchmark_RELEASE/dataset/train.txt").unlink(), "train.txt"),
        ("voc_aug", "voc_aug", lambda r: shutil.rmtree(r / "VOCdevkit"), "voc_aug needs for split 'train_aug'"),
        ("coco", "coco", lambda r: (r / "annotations/instances_val2017.json").unlink(), "instances_val2017.json"),
        ("coco_voc", "coco", lambda r: (r / "annotations/instances_val2017.json").write_text('{"images": [{"id'),
         "not a COCO annotation file"),
        ("cityscapes", "cityscapes", lambda r: shutil.rmtree(r / "gtFine" / "val"), "gtFine/val"),
    ],
)  # fmt: skip
def test_missing_inputs_fail_clearly_before_ray(
    dataset, layout, breakage, message, sources, tmp_path, no_ray
):
    root = tmp_path / "src"
    shutil.copytree(sources[layout], root)
    breakage(root)
    with pytest.raises(UserError, match=message):
        run(dataset, root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_reports_missing_root(tmp_path, capsys, no_ray):
    assert main(["prepare", "--dataset", "cityscapes", "--root", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "out")]) == 2  # fmt: skip
    assert "nowhere does not exist" in capsys.readouterr().err


def test_out_with_foreign_files_is_refused(sources, tmp_path, no_ray):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt, ...\\) and holds no prepared dataset"):
        run("voc", sources["voc"], tmp_path / "out")


# ------------------------------------------------------------------------------ re-runs, resizing, shards
def test_rerun_same_fingerprint_and_old_shards_replaced(sources, tmp_path, ray_session):
    first = run("voc", sources["voc"], tmp_path / "out", shard_mb=0.02, batch_size=2)
    out = tmp_path / "out"
    old = {str(p.relative_to(out)) for p in out.rglob("*.parquet")}
    assert first.splits["train"].shards > 1  # small --shard-mb: several shards
    (out / "notes.txt").write_text("a caller's file beside the dataset")
    second = run("voc", sources["voc"], tmp_path / "out")
    assert (out / "notes.txt").exists()
    elsewhere = run("voc", sources["voc"], tmp_path / "other")
    assert first.fingerprint == second.fingerprint == elsewhere.fingerprint
    prepared = open_prepared(tmp_path / "out")
    assert prepared.fingerprint == first.fingerprint
    files = {str(p.relative_to(out)) for p in out.rglob("*.parquet")}
    assert not files & old and len(files) == 2  # one shard per split now; the earlier run's are gone
    assert {str(Path(f).relative_to(out)) for s in ("train", "val") for f in prepared.split_files(s)} == files
    assert prepared.split("train").count() == NUM_TRAIN
    assert not list((tmp_path / "out").glob("_staging-*"))


def test_max_side_downscales_images_and_masks(sources, tmp_path, ray_session):
    result = run("voc", sources["voc"], tmp_path / "out", max_side=64)
    assert result.fingerprint != run("voc", sources["voc"], tmp_path / "full").fingerprint
    for image_id, row in rows_by_id(tmp_path / "out", "val").items():
        source_bytes, source_mask = expected_voc(sources["voc"], image_id)
        image, mask = decode_image(row["image"]), decode_mask(row["mask"])
        assert max(image.shape[:2]) == 64 and image.shape[:2] == mask.shape == (row["height"], row["width"])
        assert Image.open(io.BytesIO(row["image"])).format == "JPEG"
        assert set(np.unique(mask)) <= set(np.unique(source_mask))  # nearest: no new values
        expected = np.asarray(Image.fromarray(source_mask).resize(mask.shape[::-1], Image.NEAREST))
        assert np.array_equal(mask, expected)


def test_open_prepared_errors_and_png_resize(tmp_path, sources, ray_session):
    with pytest.raises(UserError, match="does not exist"):
        open_prepared(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        open_prepared(tmp_path / "empty")
    run("cityscapes", sources["cityscapes"], tmp_path / "out", splits=("val",), max_side=64)
    prepared = open_prepared(tmp_path / "out")
    assert prepared.splits == ("val",) and prepared.num_classes == 19 and prepared.ignore_index == 255
    row = prepared.split("val").take(1)[0]
    assert Image.open(io.BytesIO(row["image"])).format == "PNG"  # PNG sources stay PNG when resized
    assert decode_image(row["image"]).shape == (32, 64, 3) and decode_mask(row["mask"]).shape == (32, 64)
    with pytest.raises(UserError, match="split 'train' is not in"):
        prepared.split("train")


def test_a_split_with_no_good_sample_reads_as_empty(sources, tmp_path, ray_session):
    root = tmp_path / "voc"
    shutil.copytree(sources["voc"], root)
    (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_text("2099_000009\n")
    result = run("voc", root, tmp_path / "out", max_bad_fraction=0.5)
    assert result.splits["val"].rows == 0 and result.splits["val"].quarantined == 1
    val = open_prepared(tmp_path / "out").split("val")
    assert val.count() == 0 and list(val.schema().names) == list(COLUMNS)


def test_roots_at_every_published_depth(sources):
    voc, sbd = get_layout("voc"), get_layout("voc_aug")
    expected = voc.list_split(str(sources["voc"]), "val")
    for deeper in ("VOCdevkit", "VOCdevkit/VOC2012"):
        assert voc.list_split(str(sources["voc"] / deeper), "val") == expected
    samples, _ = sbd.list_split(str(sources["voc_aug"] / "benchmark_RELEASE" / "dataset"), "sbd_train")
    sbd_train = (sources["voc_aug"] / "benchmark_RELEASE" / "dataset" / "train.txt").read_text().split()
    assert samples == sbd.list_split(str(sources["voc_aug"]), "sbd_train")[0] and len(samples) == len(
        sbd_train
    )
    with pytest.raises(UserError, match="does not look like PASCAL VOC"):
        voc.list_split(str(sources["coco"]), "val")


def test_cli_choices_match_the_readers_and_writers():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    options = {name: {a.dest: a.choices for a in p._actions} for name, p in sub.choices.items()}
    assert tuple(options["prepare"]["dataset"]) == DATASETS
    assert tuple(options["synth"]["layout"]) == SYNTH_LAYOUTS
