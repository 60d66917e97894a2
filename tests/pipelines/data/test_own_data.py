"""Own data and the other published layouts: `prepare --dataset folder | ade20k | camvid`.

Masks are compared pixel for pixel with what the source files say (decoded here independently of the
readers), bad samples are quarantined with their reason, and class names and colours reach the manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.cli import main
from pipelines.data.dataset import decode_mask, open_prepared
from pipelines.data.layouts import get_layout
from pipelines.data.layouts.ade20k import ADE20K_CLASSES
from pipelines.data.layouts.base import BadSample
from pipelines.data.layouts.camvid import CAMVID_CLASSES
from pipelines.data.layouts.folder import decode_folder_mask, parse_class_file
from pipelines.data.prepare import PrepareConfig, prepare
from pipelines.data.synth import FOLDER_CLASSES, SynthConfig, synthesize
from pipelines.errors import UserError

NUM_TRAIN, NUM_VAL = 8, 4


def prepared_masks(out: Path, split: str) -> dict[str, np.ndarray]:
    rows = open_prepared(out).split(split).take_all()
    return {r["image_id"]: decode_mask(r["mask"]) for r in rows}


def quarantine(out: Path) -> dict[str, str]:
    lines = (out / "quarantine.jsonl").read_text().splitlines()
    return {(r := json.loads(line))["image_id"]: r["reason"] for line in lines}


def folder_truth(root: Path, split: str, stem: str) -> np.ndarray:
    """The class map a folder mask means, read with the test's own colour table."""
    spec = yaml.safe_load((root / "classes.yaml").read_text())
    mask = Image.open(root / "masks" / split / f"{stem}.png")
    if mask.mode == "L":
        return np.asarray(mask)
    rgb = np.asarray(mask.convert("RGB"))
    out = np.full(rgb.shape[:2], 254, np.uint8)  # 254: a colour the table does not know
    for index, entry in enumerate(spec["classes"]):
        out[(rgb == entry["color"]).all(-1)] = index
    out[(rgb == spec["ignore_color"]).all(-1)] = 255
    assert (out != 254).all()
    return out


def test_folder_dataset_is_exact_and_bad_samples_are_quarantined(tmp_path, ray_session):
    root = synthesize(
        SynthConfig("folder", str(tmp_path / "src"), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=2)
    )
    train = root / "images" / "train"
    modes = {Image.open(p).mode for p in (root / "masks" / "train").iterdir()}
    assert modes == {"RGB", "L"}  # colour masks and index masks side by side
    assert {p.suffix for p in train.iterdir()} == {".jpg", ".png"}
    good = sorted(p.stem for p in train.iterdir())
    # Each kind of bad sample, beside the good ones.
    image, mask = (
        Image.open(train / "panel_0000.jpg"),
        Image.open(root / "masks" / "train" / "panel_0001.png"),
    )
    image.save(train / "no_mask.jpg")
    mask.save(root / "masks" / "train" / "no_image.png")
    image.save(train / "panel_0002.png")  # a second image with the stem panel_0002
    (train / "notes.txt").write_text("not an image")
    image.crop((0, 0, 40, 40)).save(train / "small.jpg")
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(root / "masks" / "train" / "small.png")
    image.save(train / "index_9.jpg")
    Image.fromarray(np.full(image.size[::-1], 9, np.uint8)).save(root / "masks" / "train" / "index_9.png")
    image.save(train / "odd_colour.jpg")
    odd = np.zeros((*image.size[::-1], 3), np.uint8)
    odd[:5] = (1, 2, 3)
    Image.fromarray(odd).save(root / "masks" / "train" / "odd_colour.png")

    out = tmp_path / "prepared"
    result = prepare(PrepareConfig("folder", str(root), str(out), progress=False, max_bad_fraction=1.0))
    assert result.published and {s: r.rows for s, r in result.splits.items()} == {
        "train": NUM_TRAIN,
        "val": NUM_VAL,
    }
    for split in ("train", "val"):
        masks = prepared_masks(out, split)
        for stem, got in masks.items():
            np.testing.assert_array_equal(got, folder_truth(root, split, stem))
    assert sorted(prepared_masks(out, "train")) == good
    assert any((m == 255).any() for m in prepared_masks(out, "val").values())  # the ignore band survives
    reasons = quarantine(out)
    assert "has no mask" in reasons["no_mask"] and reasons["no_image"] == "mask has no image"
    assert "two images with the stem 'panel_0002'" in reasons["panel_0002"]
    assert "expected .jpg, .jpeg or .png" in reasons["notes"]
    assert reasons["small"].startswith("label is 50x50 but the image is 40x40")
    assert "outside the classes 0-4" in reasons["index_9"]
    assert "mask colours [[1, 2, 3]] belong to no class" in reasons["odd_colour"]
    manifest = json.loads((out / "manifest.json").read_text())
    spec = yaml.safe_load((root / "classes.yaml").read_text())
    assert manifest["dataset"] == "folder" and tuple(manifest["classes"]) == FOLDER_CLASSES
    assert manifest["palette"] == [c["color"] for c in spec["classes"]]


def test_split_lists_classes_txt_and_the_classes_option(tmp_path):
    """`splits/<split>.txt` over flat images/ and masks/, classes.txt, and --classes pointing elsewhere."""
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.ones((8, 8), np.uint8)).save(root / "masks" / f"{stem}.png")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\nmissing\n")
    (root / "splits" / "val.txt").write_text("c\n")
    (root / "classes.txt").write_text("background\ncell\n\n")
    layout = get_layout("folder", str(root))
    assert layout.classes == ("background", "cell") and layout.default_splits == ("train", "val")
    samples, rejected = layout.list_split(str(root), "train")
    assert [s.image_id for s in samples] == ["a", "b"]
    assert [(r.image_id, r.reason) for r in rejected] == [
        ("missing", "listed but neither image nor mask exists")
    ]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(["bg", "nucleus"]))
    assert get_layout("folder", str(root), str(other)).classes == ("bg", "nucleus")
    with pytest.raises(UserError, match="--classes is for --dataset folder"):
        PrepareConfig("voc", "r", "o", classes=str(other))


@pytest.mark.parametrize(
    "text,name,message",
    [
        ("a\n\nb\n", "classes.txt", "class 1 has no name"),
        ("a\nb\na\n", "classes.txt", r"unique, \['a'\]"),
        ("classes: [{name: a, color: [0, 0, 0]}, {name: b}]", "classes.yaml", "every class a colour or none"),
        (
            "classes: [{name: a, color: [0, 0, 0]}, {name: b, color: [0, 0, 0]}]",
            "classes.yaml",
            "share a colour",
        ),
        ("classes: [{name: a, color: [255, 255, 255]}]", "classes.yaml", "ignore_color .* is also a class"),
        ("classes: [{name: a, color: [300, 0, 0]}]", "classes.yaml", "three integers 0-255"),
        ("clases: [a]", "classes.yaml", "expected the keys classes"),
    ],
)
def test_class_file_errors_name_the_file_and_the_fix(tmp_path, text, name, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_class_file(str(path))


def test_folder_errors_before_any_work(tmp_path, capsys):
    (tmp_path / "images" / "train").mkdir(parents=True)
    assert (
        main(["prepare", "--dataset", "folder", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    )
    assert "no classes.txt or classes.yaml" in capsys.readouterr().err
    assert (
        main(["prepare", "--dataset", "folder", "--root", str(tmp_path / "x"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "images does not exist" in capsys.readouterr().err
    # An RGB mask needs class colours; a names-only list cannot map it.
    (tmp_path / "c.txt").write_text("a\nb\n")
    names_only = parse_class_file(str(tmp_path / "c.txt"))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(BadSample, match="the classes have no colours"):
        decode_folder_mask((tmp_path / "m.png").read_bytes(), "m.png", names_only)


@pytest.mark.parametrize("dataset", ["ade20k", "camvid"])
def test_ade20k_and_camvid_are_exact(dataset, tmp_path, ray_session):
    root = synthesize(
        SynthConfig(dataset, str(tmp_path / "src"), num_train=NUM_TRAIN, num_val=NUM_VAL, seed=4)
    )
    out = tmp_path / "prepared"
    result = prepare(PrepareConfig(dataset, str(root), str(out), progress=False))
    assert result.published and result.quarantined == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert tuple(manifest["classes"]) == (ADE20K_CLASSES if dataset == "ade20k" else CAMVID_CLASSES)
    for split in ("train", "val"):
        masks = prepared_masks(out, split)
        assert len(masks) == (NUM_TRAIN if split == "train" else NUM_VAL)
        for stem, got in masks.items():
            if dataset == "ade20k":
                folder = {"train": "training", "val": "validation"}[split]
                stored = np.asarray(
                    Image.open(root / "ADEChallengeData2016" / "annotations" / folder / f"{stem}.png")
                )
                want = np.where(stored == 0, 255, stored.astype(np.int64) - 1)  # 0 = other; 1-150 -> 0-149
            else:
                stored = np.asarray(Image.open(root / "CamVid" / f"{split}annot" / f"{stem}.png"))
                want = np.where(stored == 11, 255, stored)  # 11 = void
            np.testing.assert_array_equal(got, want)
    assert any((m == 255).any() for m in prepared_masks(out, "train").values())
    # A label value the benchmark does not have is quarantined, not clipped.
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    if dataset == "ade20k":
        label = next((bad / "ADEChallengeData2016" / "annotations" / "validation").iterdir())
        Image.fromarray(np.full((8, 8), 151, np.uint8)).save(label)
        sample = get_layout(dataset).list_split(str(bad), "val")[0][0]
        with pytest.raises(BadSample, match="beyond ADE20K's 150 classes"):
            get_layout(dataset).label_to_mask(sample, label.read_bytes())
    else:
        label = sorted((bad / "CamVid" / "valannot").iterdir())[0]
        Image.fromarray(np.full((8, 8), 12, np.uint8)).save(label)
        sample = get_layout(dataset).list_split(str(bad), "val")[0][0]
        with pytest.raises(BadSample, match="not a CamVid class"):
            get_layout(dataset).label_to_mask(sample, label.read_bytes())
