"""MS COCO 2017 reader: `{split}2017/*.jpg` + `annotations/instances_{split}2017.json`, via pycocotools.

Semantic class = rank of the category id among the 80 categories + 1, background 0 (`coco`), or the
20 VOC classes with every other category as background (`coco_voc`, as torchvision's references do).
Crowd regions and pixels claimed by instances of different classes become 255 (ignore).

The annotation file (up to 450 MB, 860k annotations) is streamed once on the driver in bounded memory
(`scan_annotation_file`): what the driver keeps is each image's size and the byte ranges of its annotations
in the file, not the annotations themselves. Each worker reads its image's ranges from the same file (one
ranged read per run of consecutive annotations), so neither side ever holds the whole JSON. A file that
is not JSON at all stops the run with a `UserError` (no sample could be recovered from it); a malformed
entry quarantines only its image.
"""

from __future__ import annotations

import codecs
import json
import math
import posixpath
import re
from array import array
from typing import BinaryIO

import numpy as np

from pipelines import storage
from pipelines.data.layouts.base import BadSample, Layout, Rejected, Sample
from pipelines.data.layouts.voc import VOC_CLASSES, voc_colormap
from pipelines.errors import UserError

COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip

# COCO category ids of the 20 VOC classes, in VOC order (aeroplane=airplane 5, bicycle 2, bird 16, ...).
COCO_VOC_IDS = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)


def category_to_class(voc_subset: bool) -> dict[int, int]:
    """COCO category id -> semantic class (0 = background)."""
    if voc_subset:
        table = {cat_id: 0 for cat_id, _ in COCO_CATEGORIES}
        table.update({cat_id: index + 1 for index, cat_id in enumerate(COCO_VOC_IDS)})
        return table
    return {cat_id: rank + 1 for rank, (cat_id, _) in enumerate(COCO_CATEGORIES)}


def _annotation_rle(ann: dict, height: int, width: int):
    """One annotation's segmentation (polygons, uncompressed or compressed RLE) as a pycocotools RLE."""
    from pycocotools import mask as mask_utils

    segm = ann.get("segmentation")
    if isinstance(segm, list):
        for poly in segm:
            if not (
                isinstance(poly, list)
                and len(poly) >= 6
                and len(poly) % 2 == 0
                and all(isinstance(v, int | float) and math.isfinite(v) for v in poly)
            ):
                raise ValueError("a polygon must be a flat list of at least 3 x,y pairs")
        if not segm:
            raise ValueError("empty polygon list")
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise ValueError(f"RLE size {segm['size']} differs from the image's {height}x{width}")
        if isinstance(segm["counts"], list):
            if sum(segm["counts"]) != height * width or min(segm["counts"], default=0) < 0:
                raise ValueError("RLE counts do not add up to height x width")
            return mask_utils.frPyObjects(segm, height, width)
        if isinstance(segm["counts"], str):
            return {"size": [height, width], "counts": segm["counts"].encode("ascii")}
    raise ValueError("segmentation is neither polygons nor RLE")


def annotations_to_mask(anns: list, height: int, width: int, classes: dict[int, int]) -> np.ndarray:
    """COCO instances -> H x W semantic mask: overlaps of different classes and crowd regions -> 255."""
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), dtype=np.uint8)
    crowd = np.zeros((height, width), dtype=bool)
    for ann in anns:
        cls = classes.get(ann.get("category_id"))
        if cls is None:
            raise ValueError(
                f"annotation {ann.get('id')}: category_id {ann.get('category_id')!r} is not a COCO category"
            )
        if (
            cls == 0
        ):  # a category that is background in this class set (coco_voc): dropped, as torchvision does
            continue
        try:
            instance = mask_utils.decode(_annotation_rle(ann, height, width)).astype(bool)
        except Exception as err:
            raise ValueError(f"annotation {ann.get('id')}: {err}") from err
        if ann.get("iscrowd"):
            crowd |= instance
            continue
        conflict = instance & (mask != 0) & (mask != cls)
        mask[instance & (mask == 0)] = cls
        mask[conflict] = 255
    mask[crowd] = 255
    return mask


CHUNK_BYTES = 8 * 2**20  # how much of the annotation file the driver reads at a time
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _JsonStream:
    """A forward-only window on a UTF-8 JSON file that decodes one value at a time and says which bytes
    of the file it came from (`json.JSONDecoder.raw_decode` gives where each value ends in the text)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.utf8 = codecs.getincrementaldecoder("utf-8")()  # refuses what json.loads would refuse
        self.text = ""
        self.pos = 0  # index in text of the next unread character
        self.eof = False
        self._char, self._byte = 0, 0  # a character of text and its byte offset in the file

    def byte_offset(self, index: int) -> int:
        """The file offset of text[index]; indexes only move forward, so the file is counted once."""
        between = self.text[self._char : index]
        self._byte += len(between) if between.isascii() else len(between.encode("utf-8"))
        self._char = index
        return self._byte

    def _more(self) -> bool:
        """Append the next chunk (dropping what was read); False at the end of the file."""
        data = self.stream.read(CHUNK_BYTES)
        self.eof = not data
        chunk = self.utf8.decode(data, final=self.eof)
        self.byte_offset(self.pos)
        self.text = self.text[self.pos :] + chunk
        self.pos = self._char = 0
        return not self.eof

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._more():
                return ""

    def expect(self, allowed: str) -> str:
        char = self.peek()
        if not char or char not in allowed:
            where = self.byte_offset(self.pos)
            raise ValueError(f"expected one of {allowed!r} at byte {where}, found {char or 'the end'!r}")
        self.pos += 1
        return char

    def value(self) -> tuple[object, int, int]:
        """The next JSON value, with the byte offsets where it starts and ends."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                if self._more():
                    continue  # the value goes on in the next chunk
                raise
            if end == len(self.text) and not self.eof and self._more():
                continue  # a number cut at the chunk's end
            start = self.byte_offset(self.pos)
            self.pos = end
            return value, start, self.byte_offset(end)

    def array(self):
        """Yield (value, start, end) for each element of the array that comes next."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if self.expect(",]") == "]":
                return


class AnnotationIndex:
    """What the driver keeps of an annotation file: per image key, the byte ranges of its annotations.

    Four integers per annotation while listing (about 30 MB for COCO train2017), whatever the polygons
    weigh; a run of consecutive annotations of one image becomes one range.
    """

    def __init__(self) -> None:
        self.slots: dict = {}  # image_id as in the file -> slot
        self.slot, self.start, self.end, self.position = array("l"), array("q"), array("q"), array("l")

    def add(self, image_id, start: int, end: int, position: int) -> None:
        self.slot.append(self.slots.setdefault(image_id, len(self.slots)))
        self.start.append(start)
        self.end.append(end)
        self.position.append(position)

    def ranges(self) -> dict[int, list[list[int]]]:
        """slot -> [[start, end], ...] in file order, consecutive annotations merged."""
        out: dict[int, list[list[int]]] = {}
        last: dict[int, int] = {}
        for slot, start, end, position in zip(self.slot, self.start, self.end, self.position, strict=True):
            runs = out.setdefault(slot, [])
            if runs and last[slot] == position - 1:
                runs[-1][1] = end
            else:
                runs.append([start, end])
            last[slot] = position
        return out


def _image_fields(entry):
    """The fields listing reads from an image entry (not its URLs, dates, licence)."""
    if not isinstance(entry, dict):
        return entry
    return {key: entry[key] for key in ("id", "file_name", "height", "width") if key in entry}


def scan_annotation_file(stream: BinaryIO) -> tuple[list, AnnotationIndex]:
    """Stream a COCO instances file: its image entries and an index of where each image's annotations are.

    Memory: one chunk of text, the image entries and four integers per annotation. Raises ValueError
    (json.JSONDecodeError, UnicodeDecodeError) for a file that is not JSON and KeyError without "images".
    """
    reader = _JsonStream(stream)
    images, index = None, AnnotationIndex()
    if reader.peek() == "\ufeff":
        reader.pos += 1  # a UTF-8 byte order mark, which json.loads accepts too
    reader.expect("{")
    if reader.peek() == "}":
        reader.pos += 1
    else:
        while True:
            key, _, _ = reader.value()
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} is not a string")
            reader.expect(":")
            if key in ("images", "annotations") and reader.peek() != "[":
                raise ValueError(f'"{key}" is not a list')
            if key == "images":  # as json.loads, a repeated key keeps its last value
                images = [_image_fields(entry) for entry, _, _ in reader.array()]
            elif key == "annotations":
                index = AnnotationIndex()
                for position, (ann, start, end) in enumerate(reader.array()):
                    if isinstance(ann, dict) and isinstance(ann.get("image_id"), int | str):
                        index.add(ann["image_id"], start, end, position)
            else:
                reader.value()  # info, licenses, categories: small
            if reader.expect(",}") == "}":
                break
    if reader.peek():
        raise ValueError(f"extra data at byte {reader.byte_offset(reader.pos)}")
    if images is None:
        raise KeyError("images")
    return images, index


def read_annotations(uri: str, ranges: list[list[int]]) -> list[dict]:
    """One image's annotations: the byte ranges `scan_annotation_file` found, read from the file."""
    fs, path = storage.filesystem(uri)
    anns = []
    with fs.open_input_file(path) as f:
        for start, end in ranges:
            anns += json.loads(b"[" + f.read_at(end - start, start) + b"]")
    return anns


class Coco(Layout):
    def __init__(self, voc_subset: bool) -> None:
        self.voc_subset = voc_subset
        self.name = "coco_voc" if voc_subset else "coco"
        if voc_subset:
            self.classes, self.palette = VOC_CLASSES, tuple(voc_colormap(len(VOC_CLASSES)))
        else:
            self.classes = ("background",) + tuple(name for _, name in COCO_CATEGORIES)
            self.palette = tuple(voc_colormap(len(self.classes)))
        self._classes = category_to_class(voc_subset)

    def list_split(self, root: str, split: str) -> tuple[list[Sample], list[Rejected]]:
        if not storage.exists(root):
            raise UserError(
                f"dataset root {root} does not exist: pass the folder holding annotations/ and {split}2017/"
            )
        ann_file = storage.join(root, "annotations", f"instances_{split}2017.json")
        image_dir = storage.join(root, f"{split}2017")
        if not storage.exists(ann_file):
            raise UserError(f"annotation file {ann_file} does not exist: check --root and --splits")
        if not storage.is_dir(image_dir):
            raise UserError(f"image folder {image_dir} does not exist: check --root and --splits")
        fs, path = storage.filesystem(ann_file)
        try:
            with fs.open_input_stream(path) as stream:
                images, index = scan_annotation_file(stream)
        except (ValueError, KeyError) as err:
            raise UserError(
                f"{ann_file} is not a COCO annotation file ({type(err).__name__}: {err}): re-download or repair it"
            ) from err

        ranges = index.ranges()
        files = storage.list_files(image_dir, recursive=False)
        samples, rejected = [], []
        for entry in images:
            try:
                file_name, height, width = entry["file_name"], int(entry["height"]), int(entry["width"])
                slot = index.slots.get(entry["id"])
                record = {
                    "height": height,
                    "width": width,
                    "source": ann_file,
                    "ranges": ranges.get(slot, []),
                }
            except (KeyError, TypeError, ValueError) as err:
                entry = entry if isinstance(entry, dict) else {}
                image_id = posixpath.splitext(str(entry.get("file_name", entry.get("id", "?"))))[0]
                rejected.append(Rejected(split, image_id, ann_file, f"malformed image entry: {err!r}"))
                continue
            image_id = posixpath.splitext(file_name)[0]
            image = storage.join(image_dir, file_name)
            if file_name not in files:
                rejected.append(
                    Rejected(split, image_id, image, f"listed in {ann_file} but the image does not exist")
                )
            else:
                samples.append(Sample(split, image_id, image, annotations=json.dumps(record)))
        return samples, rejected

    def label_to_mask(self, sample: Sample, label: bytes | None) -> np.ndarray:
        record = json.loads(sample.annotations)
        try:
            anns = read_annotations(record["source"], record["ranges"])
            return annotations_to_mask(anns, record["height"], record["width"], self._classes)
        except (ValueError, TypeError) as err:
            raise BadSample(f"broken annotation: {err}", record["source"]) from err
