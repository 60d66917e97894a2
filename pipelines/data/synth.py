"""`segpipe synth`: small, learnable datasets written in the exact published layouts (no downloads here).

Every class has its own saturated colour and its own shape, on a muted textured background, so a tiny
CNN learns it in minutes on a CPU; the files follow the real naming so the readers are tested as they
will be used:

- `voc`: VOCdevkit/VOC2012 with JPEGs, palette PNG labels with a 5-px void (255) band on every object
  border, ImageSets/Segmentation/{train,val,trainval}.txt.
- `voc_aug`: VOCdevkit/VOC2012 as above beside SBD's benchmark_RELEASE/dataset (img/*.jpg, cls/*.mat with
  GTcls.Segmentation, {train,val}.txt), their lists overlapping as the real ones do (see `voc_aug_ids`).
- `coco`: {train,val}2017/*.jpg and annotations/instances_{split}2017.json: the 80 real category ids
  (1-90 with gaps), polygon instances that may overlap, and crowd regions as uncompressed RLE.
- `cityscapes`: leftImg8bit/ + gtFine/ per split and city, with _labelIds, _color, _instanceIds PNGs and
  _polygons.json; void label ids (unlabeled, ego vehicle, static) appear as in the real data.
- `ade20k`: ADEChallengeData2016/images/{training,validation}/ADE_*.jpg and annotations/.../ADE_*.png
  (0 = other, 1-150 = the benchmark's classes; a few indoor and outdoor classes drawn).
- `camvid`: SegNet's CamVid folders {train,val,test}/ and {train,val,test}annot/ with 11 classes + void (11).
- `folder`: a team's own data as `prepare --dataset folder` reads it: classes.yaml with names and colours,
  images/{train,val}/ (JPEG and PNG), masks/{train,val}/ alternately RGB colour masks and grayscale index
  masks, each with a 3-px ignore band on object borders.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipelines.errors import UserError

SYNTH_LAYOUTS = ("voc", "voc_aug", "coco", "cityscapes", "ade20k", "camvid", "folder")
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ellipse")
SIZES = ((96, 128), (104, 136), (112, 144), (120, 160))  # (H, W), VOC-like 4:3 variety
CITYSCAPES_SIZE = (96, 192)  # the real 1024 x 2048, scaled down
# COCO categories drawn: VOC ones (person, car, dog, bottle, chair, tv) and others (giraffe, pizza,
# toothbrush), so `coco_voc` has both kept and dropped categories.
COCO_DRAWN = (1, 3, 18, 44, 62, 72, 25, 59, 90)
# ADE20K stored values drawn: sky, tree, person, car, lamp, bottle, flag (0 = "other" stays around them).
ADE20K_DRAWN = (3, 5, 13, 21, 37, 99, 150)
FOLDER_CLASSES = ("background", "scratch", "dent", "rust", "crack")  # a panel-inspection team's classes


@dataclass(frozen=True)
class SynthConfig:
    layout: str
    out: str
    num_train: int = 32
    num_val: int = 16
    seed: int = 0
    size: tuple[int, int] | None = None  # (H, W); default: varying sizes (Cityscapes: one size, as published)

    def __post_init__(self) -> None:
        if self.layout not in SYNTH_LAYOUTS:
            raise UserError(f"unknown layout {self.layout!r}: choose one of {', '.join(SYNTH_LAYOUTS)}")
        if self.num_train < 0 or self.num_val < 0:
            raise UserError("--num-train and --num-val must be >= 0")
        if self.size is not None and min(self.size) < 32:
            raise UserError(f"--size {self.size[0]} {self.size[1]} is too small: use at least 32 32")


def class_colour(index: int, count: int) -> np.ndarray:
    """A saturated colour per class, evenly spread in hue; alternate brightness separates neighbours."""
    r, g, b = colorsys.hsv_to_rgb((index % count) / count, 0.9, 0.95 if index % 2 else 0.7)
    return np.array([r, g, b]) * 255


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius `r` centred at (cx, cy)."""
    if shape in ("circle", "ellipse"):
        n, radii = 24, [(1.0, 0.55 if shape == "ellipse" else 1.0)] * 24
    elif shape == "star":
        n, radii = 10, [(1.0, 1.0) if k % 2 == 0 else (0.45, 0.45) for k in range(10)]
    elif shape == "cross":
        pts = [(-1, -0.33), (-0.33, -0.33), (-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33),
               (1, 0.33), (0.33, 0.33), (0.33, 1), (-0.33, 1), (-0.33, 0.33), (-1, 0.33)]  # fmt: skip
        return [_rotate(x * r, y * r, cx, cy, angle) for x, y in pts]
    else:
        n = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[shape]
        radii = [(1.0, 0.6 if shape == "diamond" else 1.0)] * n
        angle += math.pi / 4 if shape == "square" else 0.0
    return [
        _rotate(r * rx * math.cos(2 * math.pi * k / n), r * ry * math.sin(2 * math.pi * k / n), cx, cy, angle)
        for k, (rx, ry) in enumerate(radii)
    ]


def _rotate(x: float, y: float, cx: float, cy: float, angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return (cx + c * x - s * y, cy + s * x + c * y)


def rasterise(polygon, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas).astype(bool)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted, low-saturation texture: a smooth random field plus grain (H x W x 3 float)."""
    coarse = rng.uniform(70, 170, size=(4, 5, 1)) + rng.uniform(-12, 12, size=(4, 5, 3))
    smooth = np.asarray(
        Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR), float
    )
    return smooth + rng.normal(0, 8, size=(height, width, 3))


def paint(image: np.ndarray, region: np.ndarray, colour: np.ndarray, rng: np.random.Generator) -> None:
    image[region] = colour + rng.normal(0, 10, size=(int(region.sum()), 3))


def random_object(rng, height, width, shape):
    r = rng.uniform(0.18, 0.32) * min(height, width)
    cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
    return shape_polygon(shape, cx, cy, r, rng.uniform(0, math.pi))


def to_uint8(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _size(cfg: SynthConfig, rng: np.random.Generator) -> tuple[int, int]:
    return cfg.size or SIZES[rng.integers(len(SIZES))]


def voc_scene(cfg: SynthConfig, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """An image with 1-3 VOC objects and its class map (0-20, no void band)."""
    height, width = _size(cfg, rng)
    image, label = shapes_scene(height, width, rng, 20)
    return to_uint8(image), label


def void_band(label: np.ndarray, width: int = 5) -> np.ndarray:
    """VOC's ignore band: 255 on a `width`-px strip along every boundary between labels."""
    img = Image.fromarray(label)
    edge = np.asarray(img.filter(ImageFilter.MaxFilter(width))) != np.asarray(
        img.filter(ImageFilter.MinFilter(width))
    )
    return np.where(edge, 255, label).astype(np.uint8)


def _voc_ids(cfg: SynthConfig) -> dict[str, list[str]]:
    ids = [f"{2007 + k % 6}_{k:06d}" for k in range(cfg.num_train + cfg.num_val)]
    return {"train": ids[: cfg.num_train], "val": ids[cfg.num_train :]}


def write_voc_sample(base: Path, image_id: str, image: Image.Image, label: np.ndarray) -> None:
    """VOC2012's JPEGImages/{id}.jpg and palette PNG SegmentationClass/{id}.png (with the void band)."""
    from pipelines.data.layouts.voc import voc_colormap

    _save(image, base / "JPEGImages" / f"{image_id}.jpg", quality=90)
    png = Image.fromarray(void_band(label))  # putpalette makes it a "P" image
    png.putpalette([v for colour in voc_colormap() for v in colour])
    _save(png, base / "SegmentationClass" / f"{image_id}.png")


def write_sbd_sample(base: Path, image_id: str, image: Image.Image, label: np.ndarray) -> None:
    """SBD's img/{id}.jpg and cls/{id}.mat (MATLAB struct GTcls: Segmentation, CategoriesPresent)."""
    import scipy.io

    _save(image, base / "img" / f"{image_id}.jpg", quality=90)
    present = np.unique(label[label > 0]).astype(np.uint8)
    gtcls = {"Segmentation": label, "CategoriesPresent": present}
    (base / "cls").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(base / "cls" / f"{image_id}.mat", {"GTcls": gtcls}, do_compression=True)


def write_lists(folder: Path, splits: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (folder / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def write_voc(cfg: SynthConfig, rng: np.random.Generator) -> Path:
    base = Path(cfg.out) / "VOCdevkit" / "VOC2012"
    splits = _voc_ids(cfg)
    for image_id in splits["train"] + splits["val"]:
        write_voc_sample(base, image_id, *voc_scene(cfg, rng))
    write_lists(base / "ImageSets" / "Segmentation", {**splits, "trainval": splits["train"] + splits["val"]})
    return Path(cfg.out)


def voc_aug_ids(cfg: SynthConfig) -> dict[str, list[str]]:
    """VOC12 train/val and SBD train/val lists that overlap as the real ones do.

    VOC12 train: `num_train` ids, every third also in SBD train and the next also in SBD val (annotated twice,
    differently). VOC12 val: `num_val` ids, the first half real seg11valid ids found only in VOC, the rest
    alternately in SBD train (so train_aug must leave them out) and SBD val. SBD alone: `num_train` ids,
    alternately train and val. With num_train >= 3 and num_val >= 2 every case occurs.
    """
    from pipelines.data.layouts.voc import seg11valid_ids

    # Numbered from 900000, beyond every real id's number, so they never collide with seg11valid's.
    fake = [f"{2008 + k % 4}_{900000 + k:06d}" for k in range(2 * cfg.num_train + cfg.num_val)]
    seg11 = (cfg.num_val + 1) // 2
    voc_train = fake[: cfg.num_train]
    val_shared = fake[cfg.num_train : cfg.num_train + cfg.num_val - seg11]
    sbd_only = fake[cfg.num_train + cfg.num_val - seg11 : 2 * cfg.num_train + cfg.num_val - seg11]
    return {
        "voc_train": sorted(voc_train),
        "voc_val": sorted(seg11valid_ids()[:seg11] + val_shared),
        "sbd_train": sorted(voc_train[0::3] + val_shared[0::2] + sbd_only[0::2]),
        "sbd_val": sorted(voc_train[1::3] + val_shared[1::2] + sbd_only[1::2]),
    }


def sbd_annotation(label: np.ndarray) -> np.ndarray:
    """SBD's own annotation of an image VOC also labels: objects 4 px wider, beyond VOC's 2-px void band,
    so the two sources disagree on class pixels, not only on void."""
    return np.asarray(Image.fromarray(label).filter(ImageFilter.MaxFilter(9)))


def write_voc_aug(cfg: SynthConfig, rng: np.random.Generator) -> Path:
    voc = Path(cfg.out) / "VOCdevkit" / "VOC2012"
    sbd = Path(cfg.out) / "benchmark_RELEASE" / "dataset"
    ids = voc_aug_ids(cfg)
    in_voc = set(ids["voc_train"] + ids["voc_val"])
    in_sbd = set(ids["sbd_train"] + ids["sbd_val"])
    for image_id in sorted(in_voc | in_sbd):
        image, label = voc_scene(cfg, rng)
        if image_id in in_voc:
            write_voc_sample(voc, image_id, image, label)
        if image_id in in_sbd:
            write_sbd_sample(sbd, image_id, image, sbd_annotation(label) if image_id in in_voc else label)
    write_lists(
        voc / "ImageSets" / "Segmentation",
        {"train": ids["voc_train"], "val": ids["voc_val"], "trainval": sorted(in_voc)},
    )
    write_lists(sbd, {"train": ids["sbd_train"], "val": ids["sbd_val"]})
    return Path(cfg.out)


def coco_rle(region: np.ndarray) -> dict:
    """Uncompressed RLE as COCO stores crowds: run lengths in column-major order, starting with zeros."""
    flat = region.flatten(order="F").astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": [0] + counts if flat[0] else counts, "size": list(region.shape)}


def write_coco(cfg: SynthConfig, rng: np.random.Generator) -> Path:
    from pycocotools import mask as mask_utils

    from pipelines.data.layouts.coco import COCO_CATEGORIES

    root = Path(cfg.out)
    categories = [{"id": i, "name": n, "supercategory": "object"} for i, n in COCO_CATEGORIES]
    image_ids = rng.choice(np.arange(1, 600_000), size=cfg.num_train + cfg.num_val, replace=False)
    next_ann = 1
    for split, ids in (("train", image_ids[: cfg.num_train]), ("val", image_ids[cfg.num_train :])):
        images, annotations = [], []
        for image_id in sorted(int(i) for i in ids):
            height, width = _size(cfg, rng)
            image = background(rng, height, width)
            objects = [(int(rng.choice(COCO_DRAWN)), 0) for _ in range(rng.integers(1, 4))]
            if rng.random() < 0.3:
                objects.append((1, 1))  # a crowd of people
            for cat_id, iscrowd in objects:
                k = COCO_DRAWN.index(cat_id)
                polygon = random_object(rng, height, width, SHAPES[k % len(SHAPES)])
                region = rasterise(polygon, height, width)
                paint(image, region, class_colour(k, len(COCO_DRAWN)) * (0.6 if iscrowd else 1.0), rng)
                if iscrowd:
                    segmentation = coco_rle(region)
                else:
                    segmentation = [[round(v, 2) for xy in polygon for v in xy]]
                rle = mask_utils.frPyObjects(segmentation, height, width)
                rle = rle if iscrowd else mask_utils.merge(rle)
                annotations.append(
                    {
                        "id": next_ann, "image_id": image_id, "category_id": cat_id, "iscrowd": iscrowd,
                        "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    }
                )  # fmt: skip
                next_ann += 1
            file_name = f"{image_id:012d}.jpg"
            _save(to_uint8(image), root / f"{split}2017" / file_name, quality=90)
            images.append(
                {"id": image_id, "file_name": file_name, "height": height, "width": width, "license": 1}
            )
        payload = {
            "info": {"description": "segpipe synthetic COCO", "version": "1.0", "year": 2017},
            "licenses": [{"id": 1, "name": "CC0", "url": ""}],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(payload))
    return root


def cityscapes_scene(height: int, width: int, rng: np.random.Generator) -> list[tuple[str, list]]:
    """(label name, polygon) layers, back to front, like a gtFine _polygons.json."""
    horizon = rng.uniform(0.35, 0.5) * height
    layers = [("sky", [(0, 0), (width, 0), (width, horizon), (0, horizon)])]
    x = 0.0
    while x < width:  # a row of buildings, some with trees in front
        w, top = rng.uniform(0.1, 0.25) * width, rng.uniform(0.08, 0.3) * height
        layers.append(("building", [(x, top), (x + w, top), (x + w, horizon), (x, horizon)]))
        if rng.random() < 0.4:
            layers.append(("vegetation", shape_polygon("circle", x + w / 2, horizon - 4, w / 2.5, 0)))
        x += w
    layers += [
        ("sidewalk", [(0, horizon), (width, horizon), (width, height), (0, height)]),
        (
            "road",
            [(0.3 * width, horizon), (0.7 * width, horizon), (1.1 * width, height), (-0.1 * width, height)],
        ),
        ("static", shape_polygon("hexagon", rng.uniform(0, width), horizon + 3, 0.04 * height, 0)),
    ]
    for _ in range(rng.integers(1, 4)):
        cx, w = rng.uniform(0.2, 0.8) * width, rng.uniform(0.12, 0.2) * width
        y = rng.uniform(horizon + 0.2 * (height - horizon), height * 0.85)
        layers.append(
            ("car", [(cx - w / 2, y - w / 3), (cx + w / 2, y - w / 3), (cx + w / 2, y), (cx - w / 2, y)])
        )
    for _ in range(rng.integers(0, 3)):
        cx, y = (
            rng.choice([rng.uniform(0.02, 0.2), rng.uniform(0.8, 0.98)]) * width,
            rng.uniform(0.7, 0.9) * height,
        )
        layers.append(("person", shape_polygon("ellipse", cx, y - 0.12 * height, 0.12 * height, math.pi / 2)))
    pole_x = rng.uniform(0.05, 0.95) * width
    layers.append(("pole", [(pole_x, horizon - 0.3 * height), (pole_x + 2, horizon - 0.3 * height),
                            (pole_x + 2, horizon + 0.2 * height), (pole_x, horizon + 0.2 * height)]))  # fmt: skip
    layers.append(
        ("traffic sign", shape_polygon("triangle", pole_x + 1, horizon - 0.3 * height, 0.06 * height, 0))
    )
    layers.append(("ego vehicle", [(0, 0.93 * height), (width, 0.93 * height), (width, height), (0, height)]))
    return layers


def write_cityscapes(cfg: SynthConfig, rng: np.random.Generator) -> Path:
    from pipelines.data.layouts.cityscapes import LABELS

    by_name = {lab.name: lab for lab in LABELS}
    instance_names = {
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "caravan",
        "trailer",
        "train",
        "motorcycle",
        "bicycle",
    }
    cities = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster")}
    root = Path(cfg.out)
    height, width = cfg.size or CITYSCAPES_SIZE
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        for k in range(count):
            city = cities[split][k % 3]
            stem = f"{city}_{k // 3:06d}_000019"
            layers = cityscapes_scene(height, width, rng)
            image = background(rng, height, width)
            label_ids = np.zeros((height, width), np.uint8)  # 0 = unlabeled, where no polygon lands
            instances = np.zeros((height, width), np.uint16)  # 16-bit PNG, id * 1000 + instance
            for n, (name, polygon) in enumerate(layers):
                lab, region = by_name[name], rasterise(polygon, height, width)
                colour = np.array(lab.color, float) if sum(lab.color) else np.array([40.0, 40.0, 40.0])
                paint(image, region, colour, rng)
                label_ids[region] = lab.id
                instances[region] = lab.id * 1000 + n if name in instance_names else lab.id
            colour_png = np.array([lab.color for lab in LABELS if lab.id >= 0], np.uint8)[label_ids]
            polygons = {
                "imgHeight": height,
                "imgWidth": width,
                "objects": [
                    {"label": n, "polygon": [[round(x, 1), round(y, 1)] for x, y in p]} for n, p in layers
                ],
            }
            gt = root / "gtFine" / split / city
            _save(to_uint8(image), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            _save(Image.fromarray(label_ids), gt / f"{stem}_gtFine_labelIds.png")
            _save(Image.fromarray(colour_png), gt / f"{stem}_gtFine_color.png")
            _save(Image.fromarray(instances), gt / f"{stem}_gtFine_instanceIds.png")
            (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons))
    return root


def shapes_scene(
    height: int, width: int, rng: np.random.Generator, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with 1-3 objects of classes 1..num_classes, each class its own shape and
    colour: the float image and the H x W class map (0 where no object is)."""
    image, label = background(rng, height, width), np.zeros((height, width), np.uint8)
    for cls in rng.integers(1, num_classes + 1, size=rng.integers(1, 4)):
        region = rasterise(random_object(rng, height, width, SHAPES[cls % len(SHAPES)]), height, width)
        paint(image, region, class_colour(cls - 1, num_classes), rng)
        label[region] = cls
    return image, label


def folder_colours() -> list[tuple[int, int, int]]:
    """The colours of FOLDER_CLASSES in their RGB masks: black background, then saturated hues."""
    hues = [
        tuple(int(v) for v in class_colour(k, len(FOLDER_CLASSES) - 1))
        for k in range(len(FOLDER_CLASSES) - 1)
    ]
    return [(0, 0, 0), *hues]


def write_folder(cfg: SynthConfig, rng: np.random.Generator) -> Path:
    """images/{split}/panel_NNNN.{jpg,png}, masks/{split}/panel_NNNN.png (even: RGB colours, odd: indices,
    255 = ignore band), classes.yaml."""
    import yaml

    root = Path(cfg.out)
    colours = folder_colours()
    classes = [{"name": n, "color": list(c)} for n, c in zip(FOLDER_CLASSES, colours, strict=True)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": classes, "ignore_color": [255, 255, 255]}))
    palette = np.array(colours + [(255, 255, 255)] * (256 - len(colours)), np.uint8)
    k = 0
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        for _ in range(count):
            height, width = _size(cfg, rng)
            image, label = shapes_scene(height, width, rng, len(FOLDER_CLASSES) - 1)
            label = void_band(label, 3)
            stem = f"panel_{k:04d}"
            suffix = ".png" if k % 4 == 3 else ".jpg"
            _save(
                to_uint8(image),
                root / "images" / split / f"{stem}{suffix}",
                **({"quality": 90} if suffix == ".jpg" else {}),
            )
            mask = Image.fromarray(palette[label]) if k % 2 == 0 else Image.fromarray(label)
            _save(mask, root / "masks" / split / f"{stem}.png")
            k += 1
    return root


def write_ade20k(cfg: SynthConfig, rng: np.random.Generator) -> Path:
    root = Path(cfg.out) / "ADEChallengeData2016"
    for split, folder, count in (("train", "training", cfg.num_train), ("val", "validation", cfg.num_val)):
        for k in range(count):
            height, width = _size(cfg, rng)
            image, label = shapes_scene(height, width, rng, len(ADE20K_DRAWN))
            stored = np.array([0, *ADE20K_DRAWN], np.uint8)[label]  # 0 = "other" where nothing is drawn
            stem = f"ADE_{split}_{k + 1:08d}"
            _save(to_uint8(image), root / "images" / folder / f"{stem}.jpg", quality=90)
            _save(Image.fromarray(stored), root / "annotations" / folder / f"{stem}.png")
    return Path(cfg.out)


def write_camvid(cfg: SynthConfig, rng: np.random.Generator) -> Path:
    """SegNet's CamVid: street scenes of sky, building, road, sidewalk, trees, cars and people; void
    (11) along the bottom rows, as the real frames' unlabelled car bonnet."""
    from pipelines.data.layouts.camvid import CAMVID_CLASSES, CAMVID_PALETTE, VOID

    index = {name: k for k, name in enumerate(CAMVID_CLASSES)}
    root = Path(cfg.out) / "CamVid"
    prefixes = {"train": "0001TP_", "val": "0016E5_", "test": "Seq05VD_f"}
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val), ("test", cfg.num_val)):
        for k in range(count):
            height, width = cfg.size or (96, 128)
            layers = cityscapes_scene(height, width, rng)
            image = background(rng, height, width)
            label = np.full((height, width), VOID, np.uint8)
            names = {"vegetation": "tree", "traffic sign": "sign", "person": "pedestrian", "ego vehicle": ""}
            for name, polygon in layers:
                name = names.get(name, name)
                region = rasterise(polygon, height, width)
                if name in index:
                    paint(image, region, np.array(CAMVID_PALETTE[index[name]], float), rng)
                    label[region] = index[name]
                else:  # void: static objects, the car bonnet
                    paint(image, region, np.array([40.0, 40.0, 40.0]), rng)
                    label[region] = VOID
            name = f"{prefixes[split]}{(k + 1) * 30:06d}.png"
            _save(to_uint8(image), root / split / name)
            _save(Image.fromarray(label), root / f"{split}annot" / name)
    return Path(cfg.out)


def synthesize(cfg: SynthConfig) -> Path:
    """Write a synthetic dataset in `cfg.layout`'s published layout under `cfg.out`; returns the root to pass
    to `segpipe prepare --root`."""
    rng = np.random.default_rng(cfg.seed)
    writers = {
        "voc": write_voc,
        "voc_aug": write_voc_aug,
        "coco": write_coco,
        "cityscapes": write_cityscapes,
        "ade20k": write_ade20k,
        "camvid": write_camvid,
        "folder": write_folder,
    }
    return writers[cfg.layout](cfg, rng)
