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
from collections.abc import Iterable, Iterator, Sequence
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


def decode_mask(data: bytes) -> np.ndarray:
    """Single-channel PNG -> H x W uint8 class indices (palette PNGs give their indices, not colours);
    writable, so torch can take it without a warning."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "P"):
            raise ValueError(f"mask PNG has mode {img.mode}; expected a single-channel (L or P) image")
        return np.array(img)


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
        """Rows of split `name` read in this process with pyarrow (no Ray), for small reads such as a few
        overlays. `rows`: positions in the split (its shards in manifest order, rows in file order),
        returned in the order given; default all rows in that order."""
        if rows is None:
            rows = range(self.rows(name))
        return next(self.read_batches(name, columns, [rows]))

    def read_batches(
        self, name: str, columns: Sequence[str], batches: Iterable[Sequence[int]]
    ) -> Iterator[pa.Table]:
        """One table per batch of row positions (as in `read_rows`), read batch by batch in this process.

        Only the parquet row groups that hold a batch's rows are read, and those the next batch shares are
        kept for it (consecutive batches usually fall in the same row group), so memory holds about one
        batch's row groups at a time, and each shard's footer is read once.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, _ = storage.filesystem(self.root)
        groups: list[tuple[pq.ParquetFile, int]] = []  # (shard, row group index) in split order
        sizes: list[int] = []
        for path in self.split_files(name):
            shard = pq.ParquetFile(storage.fs_path(path), filesystem=fs)
            for index in range(shard.metadata.num_row_groups):
                groups.append((shard, index))
                sizes.append(shard.metadata.row_group(index).num_rows)
        starts = np.cumsum([0, *sizes])  # starts[g] = the split position of row group g's first row
        schema = parquet_schema()
        empty = pa.schema([schema.field(c) for c in columns]).empty_table()
        held: dict[int, pa.Table] = {}
        for batch in batches:
            rows = np.asarray(batch, dtype=np.int64).reshape(-1)
            if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
                bad = int(rows.min() if rows.min() < 0 else rows.max())
                raise IndexError(f"row {bad} is outside split {name!r}, which has {int(starts[-1])} rows")
            group_of = np.searchsorted(starts, rows, side="right") - 1
            needed, position = np.unique(group_of, return_inverse=True)
            kept, held = held, {}
            for g in needed.tolist():
                shard, index = groups[g]
                held[g] = kept[g] if g in kept else shard.read_row_group(index, columns=list(columns))
            del kept  # row groups this batch does not share are freed before it is taken
            if not len(rows):
                yield empty
                continue
            table = pa.concat_tables(held.values())
            first = np.cumsum([0, *(sizes[g] for g in needed)])[:-1]  # where each group starts in `table`
            yield table.take(rows - starts[group_of] + first[position])


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
