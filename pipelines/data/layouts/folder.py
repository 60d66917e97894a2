"""A team's own data: a folder of images and masks (`segpipe prepare --dataset folder`).

    R/classes.txt            one class name per line; the line number (from 0) is the class index
    R/classes.yaml           or: names with optional colours (below)
    R/images/<split>/<stem>.{jpg,jpeg,png}
    R/masks/<split>/<stem>.png

Splits are the folders under `images/`; or, with list files `R/splits/<split>.txt` (one stem per line),
images and masks lie directly in `images/` and `masks/`. The image id is the file stem.

A mask is either a grayscale or palette PNG of class indices (255 = ignore), or an RGB colour mask whose
colours are the classes' colours from `classes.yaml`; `ignore_color` there (default white) marks ignored
pixels. `classes.yaml`:

    classes:
      - {name: background, color: [0, 0, 0]}
      - {name: crack, color: [255, 0, 0]}
    ignore_color: [255, 255, 255]

(or `classes: [background, crack]` without colours, or the list alone). Classes without colours get the
VOC devkit's palette. Quarantined with their reason: an image without a mask, a mask without an image, two
images with one stem, a file that is not a JPEG/PNG image, a colour no class has, and (checked by prepare)
a size mismatch or an index beyond the class list.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import numpy as np
import yaml
from PIL import Image

from pipelines import storage
from pipelines.data.layouts.base import (
    BadSample,
    Layout,
    Rejected,
    Sample,
    describe_image_error,
    read_split_list,
)
from pipelines.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CLASS_FILES = ("classes.yaml", "classes.yml", "classes.txt")
DEFAULT_IGNORE_COLOR = (255, 255, 255)
MAX_CLASSES = 255  # indices 0-254: 255 is ignore


@dataclass(frozen=True)
class ClassList:
    """Class names (index = position), their colours and, for RGB masks, the colour meaning ignore."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    colours_given: bool = False  # colours came from the file: RGB masks can be mapped through them
    ignore_color: tuple[int, int, int] = DEFAULT_IGNORE_COLOR


def _colour(value, where: str) -> tuple[int, int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, int) and 0 <= v <= 255 for v in value)
    ):
        raise UserError(f"{where}: a colour is three integers 0-255 like [255, 0, 0], got {value!r}")
    return tuple(value)


def parse_class_file(uri: str) -> ClassList:
    """`classes.txt` (one name per line) or `classes.yaml` -> ClassList; errors name the file and entry."""
    from pipelines.data.layouts.voc import voc_colormap

    if not storage.exists(uri):
        raise UserError(f"class file {uri} does not exist: pass a classes.txt or classes.yaml with --classes")
    text = storage.read_text(uri)
    colours: list[tuple[int, int, int] | None] = []
    ignore = DEFAULT_IGNORE_COLOR
    if uri.endswith(".txt"):
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        names = [line.strip() for line in lines]
        colours = [None] * len(names)
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f"class file {uri} is not valid YAML: {err}") from None
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"classes", "ignore_color"})
            if unknown or "classes" not in data:
                raise UserError(
                    f"{uri}: expected the keys classes (and optionally ignore_color), got {sorted(data)}"
                )
            if "ignore_color" in data:
                ignore = _colour(data["ignore_color"], f"{uri}: ignore_color")
            data = data["classes"]
        if not isinstance(data, list):
            raise UserError(f"{uri}: classes must be a list of names or of {{name, color}} entries")
        names = []
        for index, entry in enumerate(data):
            if isinstance(entry, dict):
                unknown = sorted(set(entry) - {"name", "color"})
                if unknown or "name" not in entry:
                    raise UserError(
                        f"{uri}: class {index} must be {{name: ..., color: [r, g, b]}}, got {entry}"
                    )
                names.append(str(entry["name"]).strip())
                colours.append(_colour(entry["color"], f"{uri}: class {index}") if "color" in entry else None)
            else:
                names.append(str(entry).strip() if entry is not None else "")
                colours.append(None)
    if not names:
        raise UserError(f"{uri} lists no classes: write one class name per line")
    for index, name in enumerate(names):
        if not name:
            raise UserError(f"{uri}: class {index} has no name (an empty line?): every index needs a name")
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"{uri}: class names must be unique, {duplicates} appear more than once")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{uri}: {len(names)} classes, at most {MAX_CLASSES} fit (255 means ignore)")
    given = [c for c in colours if c is not None]
    if given and len(given) != len(names):
        raise UserError(
            f"{uri}: give every class a colour or none (colours for {len(given)} of {len(names)})"
        )
    if len(set(given)) != len(given):
        raise UserError(f"{uri}: two classes share a colour: RGB masks could not tell them apart")
    if ignore in given:
        raise UserError(f"{uri}: ignore_color {list(ignore)} is also a class colour: choose another")
    defaults = voc_colormap(len(names))
    palette = tuple(c if c is not None else defaults[i] for i, c in enumerate(colours))
    return ClassList(tuple(names), palette, colours_given=bool(given), ignore_color=ignore)


def find_class_file(root: str) -> str:
    for name in CLASS_FILES:
        uri = storage.join(root, name)
        if storage.exists(uri):
            return uri
    raise UserError(
        f"{root} has no classes.txt or classes.yaml: write one class name per line to {root}/classes.txt "
        "(index = line number, from 0), or pass the file with --classes"
    )


class Folder(Layout):
    """`root`'s own classes, with the splits found under `images/` (or in `splits/*.txt`)."""

    name = "folder"

    def __init__(self, class_list: ClassList, splits: tuple[str, ...]):
        self.class_list = class_list
        self.classes, self.palette = class_list.names, class_list.palette
        self.default_splits = splits

    @classmethod
    def from_root(cls, root: str, classes_file: str = "") -> Folder:
        if not storage.is_dir(storage.join(root, "images")):
            raise UserError(
                f"{root}/images does not exist: a folder dataset holds images/<split>/<stem>.jpg and "
                "masks/<split>/<stem>.png (see README, 'Train on your own data'); check --root"
            )
        class_list = parse_class_file(classes_file or find_class_file(root))
        return cls(class_list, tuple(_available_splits(root)))

    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        list_file = storage.join(root, "splits", f"{split}.txt")
        if storage.exists(storage.join(root, "splits")):
            ids = read_split_list(list_file, self.default_splits)
            image_dir, mask_dir = storage.join(root, "images"), storage.join(root, "masks")
        else:
            ids = None
            image_dir, mask_dir = storage.join(root, "images", split), storage.join(root, "masks", split)
            if not storage.is_dir(image_dir):
                raise UserError(
                    f"{image_dir} does not exist: splits found: {', '.join(self.default_splits) or 'none'}; "
                    "pass those with --splits"
                )
        return pair_images_and_masks(split, image_dir, mask_dir, ids)

    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        return decode_folder_mask(label, sample.label, self.class_list)


def _available_splits(root: str) -> list[str]:
    """`splits/*.txt` names, else the folders under images/ (train and val first)."""
    if storage.exists(storage.join(root, "splits")):
        files = storage.list_files(storage.join(root, "splits"), recursive=False)
        found = {posixpath.splitext(f)[0] for f in files if f.endswith(".txt")}
    else:
        found = {rel.split("/")[0] for rel in storage.list_files(storage.join(root, "images")) if "/" in rel}
    return sorted(found, key=lambda s: ({"train": 0, "val": 1}.get(s, 2), s))


def pair_images_and_masks(
    split: str, image_dir: str, mask_dir: str, ids: list[str] | None
) -> tuple[list[Sample], list[Rejected]]:
    """Samples for stems with one image and its mask; everything else rejected with its reason.
    `ids` (from a split list) restricts the stems; None = every file in the folders."""
    images: dict[str, str] = {}
    rejected: list[Rejected] = []
    for rel in sorted(storage.list_files(image_dir, recursive=False)):
        stem, ext = posixpath.splitext(rel)
        if rel.startswith(".") or (ids is not None and stem not in ids):
            continue
        path = storage.join(image_dir, rel)
        if ext.lower() not in IMAGE_EXTENSIONS:
            rejected.append(
                Rejected(split, stem, path, f"{ext or 'no'} extension: expected .jpg, .jpeg or .png")
            )
        elif stem in images:
            rejected.append(Rejected(split, stem, path, f"two images with the stem {stem!r}: rename one"))
        else:
            images[stem] = path
    masks = {
        posixpath.splitext(rel)[0]: rel
        for rel in storage.list_files(mask_dir, recursive=False)
        if not rel.startswith(".")
    }
    samples = []
    for stem, path in images.items():
        mask = masks.get(stem)
        if mask is None:
            rejected.append(
                Rejected(split, stem, path, f"image has no mask {storage.join(mask_dir, stem)}.png")
            )
        elif not mask.endswith(".png"):
            rejected.append(Rejected(split, stem, storage.join(mask_dir, mask), "mask is not a .png file"))
        else:
            samples.append(Sample(split, stem, path, storage.join(mask_dir, mask)))
    wanted = set(ids) if ids is not None else None
    for stem, rel in masks.items():
        if stem not in images and (wanted is None or stem in wanted):
            rejected.append(Rejected(split, stem, storage.join(mask_dir, rel), "mask has no image"))
    if ids is not None:
        found = set(images) | set(masks)
        listed = storage.join(posixpath.dirname(image_dir), "splits", f"{split}.txt")
        rejected += [
            Rejected(split, stem, listed, "listed but neither image nor mask exists")
            for stem in ids
            if stem not in found
        ]
    return samples, rejected


def decode_folder_mask(data: bytes, path: str, class_list: ClassList) -> np.ndarray:
    """A mask PNG -> H x W uint8: stored indices (grayscale, palette, 16-bit under 256) or RGB colours
    mapped through the class colours (ignore_color -> 255)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise BadSample(
                    f"mask is a {img.format} file: save masks as PNG (JPEG alters the values)", path
                )
            mode = img.mode
            values = np.asarray(img)
    except BadSample:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise BadSample(f"unreadable mask: {describe_image_error(err)}", path) from err
    if mode in ("L", "P"):
        return values
    if mode == "1":
        return values.astype(np.uint8)
    if mode in ("I;16", "I;16B", "I"):
        if values.max(initial=0) > 255:
            raise BadSample(f"16-bit mask holds value {int(values.max())}: class indices stop at 254", path)
        return values.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        return map_colours(values[..., :3], path, class_list)
    raise BadSample(f"mask has mode {mode}: expected class indices (grayscale/palette) or RGB colours", path)


def map_colours(rgb: np.ndarray, path: str, class_list: ClassList) -> np.ndarray:
    """H x W x 3 colours -> class indices through the class colours; a colour no class has is an error."""
    if not class_list.colours_given:
        raise BadSample(
            "RGB mask, but the classes have no colours: give each class a color in classes.yaml, or save "
            "the mask as a grayscale PNG of class indices",
            path,
        )
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(class_list.palette)}
    r, g, b = class_list.ignore_color
    table[(r << 16) | (g << 8) | b] = 255
    found, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(c) for c in found if int(c) not in table]
    if unknown:
        shown = [[c >> 16, (c >> 8) & 255, c & 255] for c in unknown[:3]]
        raise BadSample(
            f"mask colours {shown} belong to no class (class colours are in the classes file; "
            f"ignore is {list(class_list.ignore_color)})",
            path,
        )
    lut = np.array([table[int(c)] for c in found], np.uint8)
    return lut[inverse.reshape(codes.shape)]
