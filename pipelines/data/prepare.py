"""`segpipe prepare`: published dataset (local or S3) -> validated parquet shards + manifest, with Ray Data.

    list (driver, before Ray starts)  ->  read bytes, decode, validate, convert labels (map_batches)
    ->  ShardSink: good rows to parquet under DST/_staging-<run>/, bad rows to the quarantine
    ->  move shards to DST/{split}/, write quarantine.jsonl, then manifest.json last.

Each split's samples are converted in a fixed pseudo-random order (`shuffled`), so every shard, and
every row group in it, mixes the whole split (Cityscapes lists its images city by city) and a training
batch drawn from a few shards does too.

A reader that finds manifest.json sees a complete dataset: it lists exactly the shards it covers, and
shards of an earlier run are only deleted after the new manifest is in place. The fingerprint hashes
each row's content (image bytes and decoded mask), sorted by split and image id, so it does not depend
on how rows landed in shards and re-running on unchanged input reproduces it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import posixpath
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from ray.data.datasource import Datasink

from pipelines import storage
from pipelines.data.dataset import (
    COLUMNS,
    HEIGHT,
    IGNORE_INDEX,
    IMAGE,
    IMAGE_ID,
    MANIFEST_NAME,
    MASK,
    QUARANTINE_NAME,
    WIDTH,
    Manifest,
    SplitInfo,
    encode_mask,
    parquet_schema,
)
from pipelines.data.layouts import BadSample, Layout, Rejected, Sample, check_dataset, get_layout
from pipelines.data.layouts.base import check_class_values
from pipelines.errors import UserError
from pipelines.images import ImageError, to_rgb
from pipelines.images import open_image as open_upright

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

STAGING_PREFIX = "_staging-"
READ_THREADS = 16  # concurrent S3 reads per conversion task
# Row groups of about this size: a reader of a few rows (a training worker's val batch) reads no more.
ROW_GROUP_BYTES = 16 * 2**20


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str  # voc | voc_aug | coco | coco_voc | cityscapes | ade20k | camvid | folder
    root: str  # the dataset as published: local path or s3://bucket/prefix
    out: str  # where the prepared dataset goes: local path or s3://bucket/prefix
    splits: tuple[str, ...] = ()  # () = the dataset's train and val
    max_side: int | None = None  # downscale so the longer side is at most this; None = keep sizes
    shard_mb: float = 128.0  # target parquet shard size
    max_bad_fraction: float = 0.01  # fail (publishing nothing) when more samples than this are quarantined
    batch_size: int = 32  # samples per map_batches task (fewer, larger tasks amortise Ray's per-task cost)
    progress: bool = True  # the progress line (`pipelines.progress`)
    classes: str = ""  # folder: the classes file (default: ROOT/classes.yaml or ROOT/classes.txt)

    def __post_init__(self) -> None:
        check_dataset(self.dataset)  # raises UserError listing the valid names
        if self.classes and self.dataset != "folder":
            raise UserError(f"--classes is for --dataset folder; {self.dataset} has its published classes")
        if self.max_side is not None and self.max_side < 16:
            raise UserError(f"--max-side {self.max_side} is too small: use at least 16 (or leave it out)")
        if self.shard_mb <= 0:
            raise UserError(f"--shard-mb must be > 0, got {self.shard_mb}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise UserError(f"--max-bad-fraction must be between 0 and 1, got {self.max_bad_fraction}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class SplitSummary:
    rows: int
    quarantined: int
    shards: int
    mb: float


@dataclass(frozen=True)
class PrepareResult:
    out: str
    dataset: str
    published: bool
    fingerprint: str
    splits: dict[str, SplitSummary]
    quarantined: int
    bad_fraction: float
    mb_written: float
    seconds: float
    images_per_s: float
    quarantine_file: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TooManyBadSamples(UserError):
    """More samples were quarantined than --max-bad-fraction allows; `result` has the summary."""

    def __init__(self, message: str, result: PrepareResult):
        super().__init__(message)
        self.result = result


# ------------------------------------------------------------------------------ per-sample work (workers)
def read_file(fs: pafs.FileSystem, uri: str) -> bytes:
    """The file's bytes; a missing file is a bad sample, any other I/O error fails the job (it may be
    transient, and quarantining a good sample for it would silently lose data)."""
    try:
        with fs.open_input_stream(storage.fs_path(uri)) as f:
            data = f.readall()
    except FileNotFoundError as err:
        raise BadSample("file does not exist", uri) from err
    if not data:
        raise BadSample("empty file (0 bytes)", uri)
    return data


def open_image(data: bytes, uri: str) -> Image.Image:
    """The decoded, upright image by `pipelines.images`' rules (the feed decodes it the same way), keeping
    Pillow's decompression-bomb limit; an unusable file is a bad sample."""

    try:
        return open_upright(data)
    except ImageError as err:
        raise BadSample(f"unreadable image: {err}", uri) from err


def downscale(image: Image.Image, mask: np.ndarray, max_side: int) -> tuple[bytes, np.ndarray]:
    """Longer side -> max_side: the image antialiased and re-encoded in its format, the mask nearest."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = image if image.mode in ("RGB", "L") else Image.fromarray(to_rgb(image))
    small = small.resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    if image.format == "JPEG":
        small.save(buf, format="JPEG", quality=90)
    else:
        small.save(buf, format="PNG")
    return buf.getvalue(), np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))


def read_sample(sample: Sample, fs: pafs.FileSystem) -> tuple[bytes | BadSample, bytes | BadSample | None]:
    """The image's and the label's bytes, a missing or empty file as its BadSample (raised by
    `convert_sample` in the order a sequential reader would meet them)."""

    def read(uri: str) -> bytes | BadSample:
        try:
            return read_file(fs, uri)
        except BadSample as bad:
            return bad

    return read(sample.image), (read(sample.label) if sample.label else None)


def convert_sample(
    sample: Sample,
    layout: Layout,
    fs: pafs.FileSystem,
    max_side: int | None,
    files: tuple[bytes | BadSample, bytes | BadSample | None] | None = None,
) -> dict:
    """One sample -> one output row (+ content digest and class pixel counts); raises BadSample.

    `files` are the sample's bytes from `read_sample` when the caller fetched them already (concurrently).
    """
    image_bytes, label = files or read_sample(sample, fs)
    if isinstance(image_bytes, BadSample):
        raise image_bytes
    image = open_image(image_bytes, sample.image)
    if isinstance(label, BadSample):
        raise label
    mask = layout.label_to_mask(sample, label)
    if mask.shape != (image.height, image.width):
        raise BadSample(
            f"label is {mask.shape[1]}x{mask.shape[0]} but the image is {image.width}x{image.height}",
            sample.label or sample.image,
        )
    counts = np.bincount(mask.ravel(), minlength=256)  # one pass over the mask: check and statistics
    check_class_values(counts, len(layout.classes), sample.label or sample.image)
    resized = bool(max_side and max(image.size) > max_side)
    if resized:
        image_bytes, mask = downscale(image, mask, max_side)
        counts = np.bincount(mask.ravel(), minlength=256)
    digest = hashlib.blake2b(image_bytes, digest_size=16)
    digest.update(np.asarray(mask.shape, np.int64).tobytes())
    digest.update(mask.tobytes())
    return {
        "split": sample.split,
        IMAGE_ID: sample.image_id,
        IMAGE: image_bytes,
        # A source label PNG that passed the checks already meets the mask contract: keep its bytes.
        MASK: label if layout.label_is_mask_png and not resized else encode_mask(mask),
        HEIGHT: mask.shape[0],
        WIDTH: mask.shape[1],
        "digest": digest.hexdigest(),
        "class_pixels": counts[: len(layout.classes)].tolist() + [int(counts[IGNORE_INDEX])],
    }


def converted_schema() -> pa.Schema:
    import pyarrow as pa

    extra = [
        ("split", pa.string()),
        ("digest", pa.string()),
        ("class_pixels", pa.list_(pa.int64())),  # per class, then ignore
        ("reason", pa.string()),  # set for quarantined rows, whose image/mask are null
        ("path", pa.string()),
    ]
    return pa.schema(list(parquet_schema()) + [pa.field(n, t) for n, t in extra])


def convert_batch(
    batch: pa.Table, *, layout: Layout, fs: pafs.FileSystem, max_side: int | None, counter=None
) -> pa.Table:
    """map_batches body: every listed sample comes out, converted or with the reason it was rejected
    (and counted on the driver's progress `counter` actor when one is given)."""
    import pyarrow as pa

    samples = [Sample(**record) for record in batch.to_pylist()]
    files: list = [None] * len(samples)
    if fs.type_name == "s3" and len(samples) > 1:
        # Each GET waits ~20 ms on S3 while using no CPU: fetch the batch's files concurrently.
        with ThreadPoolExecutor(min(READ_THREADS, len(samples))) as pool:
            files = list(pool.map(lambda sample: read_sample(sample, fs), samples))
    rows = []
    for sample, sample_files in zip(samples, files, strict=True):
        try:
            rows.append(convert_sample(sample, layout, fs, max_side, sample_files))
        except BadSample as bad:
            rows.append(
                {
                    "split": sample.split,
                    IMAGE_ID: sample.image_id,
                    "reason": bad.reason,
                    "path": bad.path or sample.image,
                }
            )
    if counter is not None:
        counter.add.remote(len(rows))
    return pa.Table.from_pylist(rows, schema=converted_schema())


class ShardSink(Datasink):
    """Writes each task's good rows as one parquet shard per split and returns what the manifest needs
    (files, digests, class pixels) and the quarantined rows, so nothing has to be read back."""

    def __init__(self, staging: str, fs: pafs.FileSystem, shard_bytes: int, run_id: str):
        self.staging, self.fs, self.shard_bytes, self.run_id = staging, fs, shard_bytes, run_id
        self.returns: list[dict] = []

    @property
    def min_bytes_per_write(self) -> int:
        return self.shard_bytes  # Ray Data bundles converted blocks up to this size per write task

    def write(self, blocks, ctx) -> dict:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from ray.data.block import BlockAccessor

        writers: dict[str, tuple[pq.ParquetWriter, str]] = {}
        out = {"files": [], "digests": [], "class_pixels": {}, "rejected": []}
        try:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                bad = table.filter(pc.is_valid(table["reason"]))
                out["rejected"] += bad.select(["split", IMAGE_ID, "path", "reason"]).to_pylist()
                good = table.filter(pc.is_null(table["reason"]))
                for split in pc.unique(good["split"]).to_pylist():
                    rows = good.filter(pc.equal(good["split"], split))
                    if split not in writers:
                        # The run id keeps names unique across runs: shards an older manifest lists stay intact.
                        rel = f"{split}/part-{self.run_id}-{ctx.task_idx:05d}.parquet"
                        writers[split] = (self._writer(posixpath.join(self.staging, rel)), rel)
                    per_group = max(1, ROW_GROUP_BYTES * rows.num_rows // max(1, rows.nbytes))
                    writers[split][0].write_table(rows.select(list(COLUMNS)), row_group_size=per_group)
                    pixels = np.asarray(rows["class_pixels"].to_pylist(), np.int64).sum(axis=0)
                    out["class_pixels"][split] = out["class_pixels"].get(split, 0) + pixels
                    ids, digests = rows[IMAGE_ID].to_pylist(), rows["digest"].to_pylist()
                    out["digests"] += [(split, i, d) for i, d in zip(ids, digests, strict=True)]
        finally:
            for writer, _ in writers.values():
                writer.close()
        for split, (_, rel) in writers.items():
            size = self.fs.get_file_info(posixpath.join(self.staging, rel)).size
            out["files"].append((split, rel, size))
        return out

    def _writer(self, path: str):
        import pyarrow.parquet as pq

        storage.ensure_parent(self.fs, path)
        # Image and mask bytes are already compressed: no dictionary, no min/max statistics on them.
        return pq.ParquetWriter(
            path,
            parquet_schema(),
            filesystem=self.fs,
            compression="none",
            use_dictionary=False,
            write_statistics=[IMAGE_ID, HEIGHT, WIDTH],
        )

    def on_write_complete(self, write_result) -> None:
        self.returns = [r for r in write_result.write_returns if r is not None]


# ------------------------------------------------------------------------------ the stage (driver)
def _check_out(out: str) -> None:
    """Refuse a non-empty folder that is not a prepared dataset (nor a failed attempt at one): shards
    would land among someone else's files. Other files beside a manifest (a caller's notes) are kept."""
    files = storage.list_files(out)
    ours = any(rel in (MANIFEST_NAME, QUARANTINE_NAME) or rel.startswith(STAGING_PREFIX) for rel in files)
    if files and not ours:
        raise UserError(
            f"--out {out} is not empty ({min(files)}, ...) and holds no prepared dataset: "
            "choose a new or empty folder"
        )


def _is_shard(rel: str) -> bool:
    return rel.count("/") == 1 and posixpath.basename(rel).startswith("part-") and rel.endswith(".parquet")


def shuffled(samples: list[Sample]) -> list[Sample]:
    """`samples` in a fixed pseudo-random order: by a keyed hash of split and image id.

    The same on every run, whatever order the layout listed them in, so shards stay reproducible; adding
    or removing an image leaves the order of the others as it was.
    """

    def key(sample: Sample) -> bytes:
        name = f"{sample.split}/{sample.image_id}".encode()
        return hashlib.blake2b(name, digest_size=8, key=b"segpipe-prepare").digest()

    return sorted(samples, key=key)


def _fingerprint(layout: Layout, max_side: int | None, digests: list[tuple[str, str, str]]) -> str:
    h = hashlib.sha256(
        json.dumps({"dataset": layout.name, "classes": layout.classes, "max_side": max_side}).encode()
    )
    for split, image_id, digest in sorted(digests):
        h.update(f"{split}\t{image_id}\t{digest}\n".encode())
    return h.hexdigest()


def _run_pipeline(
    samples: list[Sample], layout: Layout, cfg: PrepareConfig, staging: str, run_id: str
) -> list[dict]:
    import ray.data

    from pipelines.progress import follow, progress, remote_counter
    from pipelines.runtime import ensure_ray, verbose

    source_fs, _ = storage.filesystem(cfg.root)
    out_fs, staging_path = storage.filesystem(staging)
    sink = ShardSink(staging_path, out_fs, int(cfg.shard_mb * 2**20), run_id)
    started = ensure_ray()
    try:
        items = [dataclasses.asdict(s) for s in samples]
        ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / cfg.batch_size))
        # Settings for this dataset only (each Dataset carries its own copy of the DataContext). Ray Data's
        # own bars (a line per operator) only with --verbose: segpipe's one line counts the samples.
        ds.context.enable_progress_bars = cfg.progress and verbose()
        counter = remote_counter()
        # Ray Data's per-operator CPU reservation would leave the decode operator one task at a time on
        # a 2-core machine (bench/prepare.py: speed-up over a single process fell to ~1x with it on).
        ds.context.op_resource_reservation_enabled = False
        ds = ds.map_batches(
            convert_batch,
            batch_size=None,  # one block = one batch of cfg.batch_size samples
            batch_format="pyarrow",
            fn_kwargs={"layout": layout, "fs": source_fs, "max_side": cfg.max_side, "counter": counter},
        )
        # Writing shards is I/O: it asks for no CPU, so it never holds a core the decoders could use.
        with progress("prepare", len(items), "samples", enabled=cfg.progress) as bar, follow(bar, counter):
            ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
        ray.kill(counter)
    finally:
        if started:
            ray.shutdown()
    return sink.returns


def _split_infos(
    splits, returns: list[dict], rejected: list[Rejected], num_classes: int
) -> dict[str, SplitInfo]:
    """Per-split rows, shards, bytes and class pixel counts from what the write tasks returned."""
    rows = Counter(split for ret in returns for split, _, _ in ret["digests"])
    bad = Counter(r.split for r in rejected)
    infos = {}
    for split in splits:
        pixels = sum(
            (ret["class_pixels"].get(split, 0) for ret in returns), np.zeros(num_classes + 1, np.int64)
        )
        files = sorted((rel, size) for ret in returns for s, rel, size in ret["files"] if s == split)
        infos[split] = SplitInfo(
            rows=rows[split],
            files=tuple(rel for rel, _ in files),
            quarantined=bad[split],
            bytes=sum(size for _, size in files),
            class_pixels=tuple(int(p) for p in pixels[:-1]),
            ignore_pixels=int(pixels[-1]),
        )
    return infos


def _publish(staging: str, out: str, manifest: Manifest) -> None:
    """Shards into place, then the manifest (the moment the new dataset exists), then old shards out."""
    storage.publish(staging, out)
    manifest.save(storage.join(out, MANIFEST_NAME))
    keep = {rel for info in manifest.splits.values() for rel in info.files}
    for rel in storage.list_files(out):
        if _is_shard(rel) and rel not in keep:
            storage.remove(storage.join(out, rel))  # shards of an earlier run, no longer referenced


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Run the stage; raises UserError for bad inputs (before Ray starts) and TooManyBadSamples."""
    start = time.perf_counter()
    root = cfg.root.rstrip("/") if storage.is_s3(cfg.root) else storage.fs_path(cfg.root)
    layout = get_layout(cfg.dataset, root, cfg.classes)
    splits = cfg.splits or layout.default_splits
    out = cfg.out.rstrip("/") if storage.is_s3(cfg.out) else storage.fs_path(cfg.out)
    samples, rejected = [], []
    for split in splits:
        listed, missing = layout.list_split(root, split)
        samples += shuffled(listed)  # split by split: each write task's shards then mostly hold one split
        rejected += missing
    if not samples and not rejected:
        raise UserError(
            f"no samples listed for splits {', '.join(splits)} under {root}: check --root and --splits"
        )
    _check_out(out)

    run_id = uuid.uuid4().hex[:12]
    staging = storage.join(out, STAGING_PREFIX + run_id)
    try:
        returns = _run_pipeline(samples, layout, cfg, staging, run_id) if samples else []
        rejected += [Rejected(**r) for ret in returns for r in ret["rejected"]]
        digests = [d for ret in returns for d in ret["digests"]]
        quarantine = storage.join(out, QUARANTINE_NAME)
        lines = [
            json.dumps(dataclasses.asdict(r)) + "\n"
            for r in sorted(rejected, key=lambda r: (r.split, r.image_id))
        ]
        storage.write_text(quarantine, "".join(lines))

        split_infos = _split_infos(splits, returns, rejected, len(layout.classes))
        total = len(digests) + len(rejected)
        fingerprint = _fingerprint(layout, cfg.max_side, digests)
        seconds = time.perf_counter() - start
        result = PrepareResult(
            out=out,
            dataset=cfg.dataset,
            published=False,
            fingerprint=fingerprint,
            splits={
                s: SplitSummary(i.rows, i.quarantined, len(i.files), round(i.bytes / 2**20, 3))
                for s, i in split_infos.items()
            },
            quarantined=len(rejected),
            bad_fraction=len(rejected) / total,
            mb_written=round(sum(i.bytes for i in split_infos.values()) / 2**20, 3),
            seconds=round(seconds, 3),
            images_per_s=round(total / seconds, 1),
            quarantine_file=quarantine,
        )
        if result.bad_fraction > cfg.max_bad_fraction:
            raise TooManyBadSamples(
                f"{len(rejected)} of {total} samples ({result.bad_fraction:.1%}) were quarantined, more than "
                f"--max-bad-fraction {cfg.max_bad_fraction}; nothing was published. The reasons are in {quarantine}: "
                "fix those files, or raise --max-bad-fraction to accept the loss.",
                result,
            )

        _publish(
            staging,
            out,
            Manifest(
                dataset=cfg.dataset,
                classes=layout.classes,
                palette=layout.palette,
                splits=split_infos,
                source=root,
                fingerprint=fingerprint,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                max_side=cfg.max_side,
            ),
        )
        return dataclasses.replace(result, published=True)
    finally:
        storage.remove_tree(staging)


def format_summary(result: PrepareResult) -> str:
    """The table `segpipe prepare` prints: rows, quarantined, shards and MB per split."""
    lines = [f"{'split':<12}{'rows':>8}{'quarantined':>13}{'shards':>8}{'MB':>10}"]
    for split, s in result.splits.items():
        lines.append(f"{split:<12}{s.rows:>8}{s.quarantined:>13}{s.shards:>8}{s.mb:>10.2f}")
    rows = sum(s.rows for s in result.splits.values())
    shards = sum(s.shards for s in result.splits.values())
    lines.append(f"{'total':<12}{rows:>8}{result.quarantined:>13}{shards:>8}{result.mb_written:>10.2f}")
    state = f"published to {result.out}" if result.published else "NOT published"
    lines.append(
        f"{rows + result.quarantined} samples in {result.seconds:.1f} s ({result.images_per_s:.1f} images/s); "
        f"{state}; fingerprint {result.fingerprint[:16]}; quarantine: {result.quarantine_file}"
    )
    return "\n".join(lines)
