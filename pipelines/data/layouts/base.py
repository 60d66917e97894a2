"""Records and base class shared by the layout readers."""

from __future__ import annotations

import io
import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines import storage
from pipelines.errors import UserError


@dataclass(frozen=True)
class Sample:
    split: str
    image_id: str
    image: str  # URI of the image file
    label: str = ""  # URI of the label file; "" when labels live in an annotation file (COCO)
    annotations: str = ""  # COCO: this image's size and the byte ranges of its annotations, as JSON


@dataclass(frozen=True)
class Rejected:
    """One quarantined sample: a line of quarantine.jsonl."""

    split: str
    image_id: str
    path: str
    reason: str


class BadSample(Exception):
    """A sample that cannot be used; `path` names the file at fault (image, label or annotation file)."""

    def __init__(self, reason: str, path: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.path = path


class Layout(ABC):
    """A dataset as published: class names, palette, how to list a split and how to read its labels."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    default_splits: tuple[str, ...] = ("train", "val")
    # The label file is a palette/grayscale PNG whose stored indices are the mask: when it passes the
    # checks, prepare keeps its bytes instead of re-encoding the same pixels.
    label_is_mask_png: bool = False

    @abstractmethod
    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        """The split's samples under `root` and the ones rejected while listing it."""

    @abstractmethod
    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        """The sample's label file (or annotations) -> H x W uint8 (prepare rejects values that are neither
        < len(classes) nor 255, see `check_class_values`)."""


def read_split_list(uri: str, available: list[str]) -> list[str]:
    """Ids from a split list (one per line), without duplicates, in file order."""
    if not storage.exists(uri):
        raise UserError(
            f"split list {uri} does not exist; splits found: {', '.join(available) or 'none'}: "
            "pass one of those with --splits"
        )
    return list(dict.fromkeys(line.strip() for line in storage.read_text(uri).splitlines() if line.strip()))


def first_existing(root: str, candidates: list[str], marker: str, what: str) -> str:
    """The first `root/candidate` that holds `marker`: the published layouts are unpacked at varying depths."""
    if not storage.exists(root):
        raise UserError(
            f"dataset root {root} does not exist: pass the folder that holds the {what} with --root"
        )
    for candidate in candidates:
        base = storage.join(root, candidate) if candidate else root
        if storage.exists(storage.join(base, marker)):
            return base
    tried = ", ".join(storage.join(root, c, marker) if c else storage.join(root, marker) for c in candidates)
    raise UserError(f"{root} does not look like {what}: none of {tried} exists")


def decode_label_png(data: bytes, path: str) -> np.ndarray:
    """A label PNG (palette or grayscale) -> H x W uint8 of the stored indices."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("P", "L"):
                raise BadSample(f"label PNG has mode {img.mode}; expected palette (P) or grayscale (L)", path)
            return np.asarray(img)
    except BadSample:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise BadSample(f"unreadable label: {describe_image_error(err)}", path) from err


def describe_image_error(err: Exception) -> str:
    """Pillow's error as a stable one-line reason (its 'cannot identify' message embeds an object address)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image file (Pillow cannot identify it)"
    return f"{type(err).__name__}: {err}"


def check_class_values(counts: np.ndarray, num_classes: int, path: str) -> None:
    """Reject a mask (given by its 256 value counts) with values that are neither a class index nor 255."""
    bad = [int(v) for v in np.flatnonzero(counts) if num_classes <= v < 255]
    if bad:
        raise BadSample(f"label values {bad[:5]} are outside the classes 0-{num_classes - 1} and 255", path)


def paired_samples(
    split: str,
    ids: list[str],
    images: tuple[str, str],
    labels: tuple[str, str],
    listed_in: str,
) -> tuple[list[Sample], list[Rejected]]:
    """Samples for ids whose image `images[0]/{id}{images[1]}` and label file both exist; the rest rejected.

    One directory listing per folder, not one request per file, so this stays fast on S3.
    """
    (image_dir, image_ext), (label_dir, label_ext) = images, labels
    image_files = storage.list_files(image_dir, recursive=False)
    label_files = storage.list_files(label_dir, recursive=False)
    samples, rejected = [], []
    for image_id in ids:
        image = storage.join(image_dir, image_id + image_ext)
        label = storage.join(label_dir, image_id + label_ext)
        if image_id + image_ext not in image_files:
            rejected.append(
                Rejected(split, image_id, image, f"listed in {listed_in} but the image does not exist")
            )
        elif image_id + label_ext not in label_files:
            rejected.append(
                Rejected(split, image_id, label, f"listed in {listed_in} but the label does not exist")
            )
        else:
            samples.append(Sample(split, image_id, image, label))
    return samples, rejected


def folder_pairs(
    split: str, image_dir: str, label_dir: str, image_ext: str, label_ext: str, missing: str
) -> tuple[list[Sample], list[Rejected]]:
    """Every `image_dir/<stem><image_ext>` with its `label_dir/<stem><label_ext>` (one listing per folder);
    an image without its label is rejected with reason `missing`."""
    labels = storage.list_files(label_dir, recursive=False)
    samples, rejected = [], []
    for rel in sorted(storage.list_files(image_dir, recursive=False)):
        stem, ext = posixpath.splitext(rel)
        if ext != image_ext:
            continue
        label = storage.join(label_dir, stem + label_ext)
        if stem + label_ext in labels:
            samples.append(Sample(split, stem, storage.join(image_dir, rel), label))
        else:
            rejected.append(Rejected(split, stem, label, missing))
    return samples, rejected
