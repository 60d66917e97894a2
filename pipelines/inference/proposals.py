"""Object proposals for DeconvNet's instance-wise inference (`evaluate --instance`, `predict --instance`).

The paper (Noh et al., ICCV 2015, section 4.1) segments EdgeBoxes' top 50 proposals per image and
aggregates them. segpipe takes the proposals a user computed with the method of their choice (EdgeBoxes,
selective search, a detector) as one JSON file: `{"<image_id>": [[x1, y1, x2, y2], ...], ...}`, pixel boxes
of the original image, best first, end-exclusive; an optional fifth number per box (a score) is ignored.
The image id is the prepared dataset's `image_id`, or for a folder the file's path without extension.
As DeconvNet's release, boxes whose shorter side is under 112 pixels are skipped and the first 50 of the
rest are segmented (`segmodels.instance.select_boxes`); an image left without boxes is one whole-image box.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from pipelines import storage
from pipelines.errors import UserError

Box = tuple[int, int, int, int]


def load_proposals(uri: str) -> dict[str, tuple[Box, ...]]:
    """Read and validate a proposals file (local or s3://); every error names the file and the image."""
    if not storage.exists(uri):
        raise UserError(f"--instance {uri}: no such proposals file")
    try:
        data = json.loads(storage.read_text(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--instance {uri}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(
            f"--instance {uri}: expected a non-empty object {{image_id: [[x1, y1, x2, y2], ...]}}"
        )
    proposals = {}
    for image_id, boxes in data.items():
        if not isinstance(boxes, list):
            raise UserError(f"--instance {uri}: {image_id!r} must map to a list of boxes, got {boxes!r}")
        proposals[image_id] = tuple(_box(uri, image_id, box) for box in boxes)
    return proposals


def _box(uri: str, image_id: str, box) -> Box:
    numbers = isinstance(box, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in box
    )
    if not numbers or len(box) not in (4, 5):
        raise UserError(f"--instance {uri}: {image_id!r} has {box!r}; a box is [x1, y1, x2, y2] (+ score)")
    x1, y1, x2, y2 = (round(v) for v in box[:4])
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise UserError(
            f"--instance {uri}: {image_id!r} has the empty box {box!r}; need 0 <= x1 < x2, 0 <= y1 < y2"
        )
    return x1, y1, x2, y2


def check_covered(proposals: Mapping[str, tuple[Box, ...]], image_ids: Iterable[str], uri: str) -> None:
    """Every image to segment must have its proposals: a UserError listing the first missing ids."""
    missing = [i for i in image_ids if i not in proposals]
    if missing:
        raise UserError(
            f"--instance {uri}: no proposals for {len(missing)} image(s), e.g. {', '.join(missing[:3])}; "
            "add them to the file (an empty list segments the whole image only)"
        )


def clip_boxes(boxes: Iterable[Box], height: int, width: int) -> list[Box]:
    """Boxes cut to the image; those left empty are dropped."""
    out = []
    for x1, y1, x2, y2 in boxes:
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
        if x1 < x2 and y1 < y2:
            out.append((x1, y1, x2, y2))
    return out
