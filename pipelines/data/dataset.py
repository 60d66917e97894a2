"""The prepared-dataset contract: the one place that knows the parquet columns and the manifest.

Layout written by `segpipe prepare` (local directory or s3:// prefix):

    DST/manifest.json         written last: a directory without it is not a dataset (yet)
    DST/quarantine.jsonl      one {"split", "image_id", "path", "reason"} object per rejected sample
    DST/{split}/*.parquet     columns below, one row per image

Columns: `image_id` (string), `image` (encoded JPEG or PNG, the source bytes when not resized),
`mask` (single-channel uint8 PNG: class index < num_classes, or 255 = ignore), `height`, `width` (int32).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipelines import storage
from pipelines.errors import UserError
from pipelines.runtime import verbose

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

SCHEMA_VERSION = 1
IGNORE_INDEX = 255
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"

IMAGE_ID = "image_id"
IMAGE = "image"
MASK = "mask"
HEIGHT = "height"
WIDTH = "width"
COLUMNS = (IMAGE_ID, IMAGE, MASK, HEIGHT, WIDTH)


def parquet_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            (IMAGE_ID, pa.string()),
            (IMAGE, pa.binary()),
            (MASK, pa.binary()),
            (HEIGHT, pa.int32()),
            (WIDTH, pa.int32()),
        ]
    )


def decode_image(data: bytes, max_pixels: int = 0) -> np.ndarray:
    """Encoded JPEG/PNG -> H x W x 3 uint8 RGB (grayscale and CMYK sources are converted).

    max_pixels > 0: refuse (ValueError) an image with more pixels, from its header, before decoding it.
    """
    with Image.open(io.BytesIO(data)) as img:
        if max_pixels and img.width * img.height > max_pixels:
            raise ValueError(
                f"{img.width}x{img.height} image is over the {max_pixels}-pixel limit (raise --max-pixels)"
            )
        return np.asarray(img.convert("RGB"))


def decode_mask(data: bytes) -> np.ndarray:
    """Single-channel PNG -> H x W uint8 class indices (palette PNGs give their indices, not colours)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "P"):
            raise ValueError(f"mask PNG has mode {img.mode}; expected a single-channel (L or P) image")
        return np.asarray(img)


def encode_mask(mask: np.ndarray) -> bytes:
    """H x W uint8 -> grayscale PNG bytes (compression level 1: masks are mostly runs, so level 1 is
    nearly as small as the default and several times faster)."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be H x W uint8, got shape {mask.shape} dtype {mask.dtype}")
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass(frozen=True)
class SplitInfo:
    """One split of a prepared dataset: its shards and how its pixels divide between the classes."""

    rows: int
    files: tuple[str, ...]  # shard paths relative to the dataset root, e.g. "train/part-....parquet"
    quarantined: int
    bytes: int
    class_pixels: tuple[int, ...]  # pixels per class index, for class weights and sanity checks
    ignore_pixels: int


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`: what the dataset is, where its shards are and a fingerprint of its content."""

    dataset: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    splits: dict[str, SplitInfo]
    source: str
    fingerprint: str  # hash of the prepared rows, stable across runs on unchanged input
    created: str
    max_side: int | None = None
    ignore_index: int = IGNORE_INDEX
    quarantine: str = QUARANTINE_NAME
    columns: tuple[str, ...] = COLUMNS
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(
                f"manifest schema_version {version!r} is not {SCHEMA_VERSION}: re-run `segpipe prepare` "
                "with this version of segpipe"
            )
        data = dict(data)
        data["splits"] = {
            name: SplitInfo(
                rows=s["rows"],
                files=tuple(s["files"]),
                quarantined=s["quarantined"],
                bytes=s["bytes"],
                class_pixels=tuple(s["class_pixels"]),
                ignore_pixels=s["ignore_pixels"],
            )
            for name, s in data["splits"].items()
        }
        data["classes"] = tuple(data["classes"])
        data["palette"] = tuple(tuple(c) for c in data["palette"])
        data["columns"] = tuple(data["columns"])
        return cls(**data)

    @classmethod
    def load(cls, uri: str) -> Manifest:
        return cls.from_dict(json.loads(storage.read_text(uri)))

    def save(self, uri: str) -> None:
        storage.write_text(uri, json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset opened for reading: its manifest, plus one Ray Dataset per split."""

    root: str
    manifest: Manifest

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    @property
    def num_classes(self) -> int:
        return len(self.manifest.classes)

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        return self.manifest.palette

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def ignore_index(self) -> int:
        return self.manifest.ignore_index

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest.splits)

    def _split_info(self, name: str) -> SplitInfo:
        if name not in self.manifest.splits:
            raise UserError(
                f"split {name!r} is not in {storage.join(self.root, MANIFEST_NAME)}; it has "
                f"{', '.join(self.manifest.splits) or 'no splits'}: pick one of those or re-run "
                f"`segpipe prepare --splits {name}`"
            )
        return self.manifest.splits[name]

    def rows(self, name: str, limit: int = 0) -> int:
        """Rows of split `name` (from the manifest), at most `limit` when it is not 0."""
        rows = self._split_info(name).rows
        return min(rows, limit) if limit else rows

    def split_files(self, name: str) -> list[str]:
        """The split's parquet shards as full paths / s3:// URIs."""
        return [storage.join(self.root, rel) for rel in self._split_info(name).files]

    def split(self, name: str, **read_parquet_args) -> ray.data.Dataset:
        """The split as a Ray Dataset with the columns in `COLUMNS` (read lazily, local or S3).

        `read_parquet_args` go to `ray.data.read_parquet`, e.g. `shuffle="files"` for a training feed
        whose file order is drawn afresh at every execution (every epoch).
        """
        import ray.data

        files = self.split_files(name)
        if not files:
            return ray.data.from_arrow(parquet_schema().empty_table())
        fs, _ = storage.filesystem(self.root)
        # Ray 2.60's default parquet path (DataSourceV2: ListFiles -> ReadFiles) spent 5-10 s per execution
        # listing the manifest's few files on a 2-core machine, i.e. per training epoch; the V1 reader reads
        # them in 0.2 s. The choice is made here, when the plan is built, so scope it to this call.
        # The reader also samples the files' metadata right here, behind a "Parquet dataset sampling" bar
        # of its own: shown with --verbose only (the dataset keeps the caller's progress setting).
        context = ray.data.DataContext.get_current()
        default_v2, context.use_datasource_v2 = context.use_datasource_v2, False
        default_bars, context.enable_progress_bars = context.enable_progress_bars, verbose()
        try:
            ds = ray.data.read_parquet(
                [storage.fs_path(f) for f in files], filesystem=fs, **read_parquet_args
            )
        finally:
            context.use_datasource_v2 = default_v2
            context.enable_progress_bars = default_bars
        ds.context.enable_progress_bars = default_bars
        return ds

    def read_rows(self, name: str, columns: Sequence[str], rows: Sequence[int] | None = None) -> pa.Table:
        """Rows of split `name` read in this process with pyarrow (no Ray), for small reads such as one
        worker's share of the val split. `rows`: positions in the split (its shards in manifest order,
        rows in file order), returned in the order given; default all rows in that order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, _ = storage.filesystem(self.root)
        wanted = None if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        pieces, offset = [], 0
        for path in self.split_files(name):
            shard = pq.ParquetFile(storage.fs_path(path), filesystem=fs)
            count = shard.metadata.num_rows
            if wanted is None:
                pieces.append(shard.read(columns=list(columns)))
            else:
                local = wanted[(wanted >= offset) & (wanted < offset + count)] - offset
                if len(local):
                    pieces.append(shard.read(columns=list(columns)).take(local))
            offset += count
        if wanted is not None and len(wanted) and wanted[-1] >= offset:
            raise IndexError(f"row {int(wanted[-1])} is past the end of split {name!r} ({offset} rows)")
        schema = parquet_schema()
        table = (
            pa.concat_tables(pieces)
            if pieces
            else pa.schema([schema.field(c) for c in columns]).empty_table()
        )
        # `wanted` is sorted and unique: map the caller's order (repeats allowed) onto it.
        return (
            table if rows is None else table.take(np.searchsorted(wanted, np.asarray(rows, dtype=np.int64)))
        )


def open_prepared(path: str) -> PreparedDataset:
    """Open the output of `segpipe prepare` (a local directory or s3:// prefix)."""
    root = str(path).rstrip("/") if storage.is_s3(path) else storage.fs_path(path)
    manifest_uri = storage.join(root, MANIFEST_NAME)
    if not storage.exists(root):
        raise UserError(f"prepared dataset {path!r} does not exist: run `segpipe prepare --out {path}` first")
    if not storage.exists(manifest_uri):
        raise UserError(
            f"{path!r} has no {MANIFEST_NAME}, so it is not a prepared dataset (or its preparation did not "
            f"finish): run `segpipe prepare --out {path}`"
        )
    return PreparedDataset(root=root, manifest=Manifest.load(manifest_uri))
