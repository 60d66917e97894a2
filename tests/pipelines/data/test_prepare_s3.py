"""The whole S3 path against moto's S3 server on 127.0.0.1: storage helpers, prepare from and to s3://,
then reading the prepared dataset back from the bucket."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import storage
from pipelines.data.dataset import decode_mask, open_prepared
from pipelines.data.layouts import get_layout
from pipelines.data.prepare import PrepareConfig, convert_batch, prepare
from pipelines.data.synth import SynthConfig, synthesize
from pipelines.errors import UserError

BUCKET = "segpipe-test"


def upload(local: Path, uri: str) -> None:
    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes())


def test_storage_helpers_on_s3(s3):
    uri = storage.join(s3, "a", "b.txt")
    assert uri == f"{s3}/a/b.txt" and storage.fs_path(uri) == f"{BUCKET}/a/b.txt"
    assert not storage.exists(uri)
    storage.write_text(uri, "hello")
    storage.write_bytes(storage.join(s3, "stage", "x", "1.bin"), b"\x00\x01")
    assert storage.read_text(uri) == "hello" and storage.exists(uri) and storage.is_dir(storage.join(s3, "a"))
    assert storage.list_files(s3) == {"a/b.txt": 5, "stage/x/1.bin": 2}
    assert storage.publish(storage.join(s3, "stage"), storage.join(s3, "final")) == ["x/1.bin"]
    assert storage.read_bytes(storage.join(s3, "final", "x", "1.bin")) == b"\x00\x01"
    assert not storage.exists(storage.join(s3, "stage"))
    storage.remove_tree(storage.join(s3, "final"))
    assert storage.list_files(s3) == {"a/b.txt": 5}
    assert storage.list_files(storage.join(s3, "nothing-here")) == {}
    with pytest.raises(UserError, match="unsupported URI scheme"):
        storage.filesystem("gs://bucket/x")


def test_prepare_from_s3_to_s3_and_read_back(s3, tmp_path, ray_session):
    src = synthesize(SynthConfig("voc", str(tmp_path / "src"), num_train=6, num_val=3, seed=11))
    base = src / "VOCdevkit" / "VOC2012"
    bad = (base / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[1]
    (base / "JPEGImages" / f"{bad}.jpg").write_bytes(b"")  # one bad sample: quarantined on S3 too
    upload(src, storage.join(s3, "raw"))

    cfg = PrepareConfig(
        dataset="voc", root=f"{s3}/raw/", out=f"{s3}/prepared", progress=False, max_bad_fraction=0.2
    )
    result = prepare(cfg)
    assert result.published and result.quarantined == 1
    assert {s: r.rows for s, r in result.splits.items()} == {"train": 5, "val": 3}
    objects = storage.list_files(f"{s3}/prepared")
    assert "manifest.json" in objects and "quarantine.jsonl" in objects
    assert not [k for k in objects if k.startswith("_staging-")]
    assert f"{s3}/raw/VOCdevkit/VOC2012/JPEGImages/{bad}.jpg" in storage.read_text(
        f"{s3}/prepared/quarantine.jsonl"
    )

    prepared = open_prepared(f"{s3}/prepared")
    assert prepared.num_classes == 21 and all(
        f.startswith(f"{s3}/prepared/") for f in prepared.split_files("train")
    )
    rows = prepared.split("train").take_all()
    assert len(rows) == 5 and bad not in {r["image_id"] for r in rows}
    for row in rows:
        label = np.asarray(Image.open(base / "SegmentationClass" / f"{row['image_id']}.png"))
        assert np.array_equal(decode_mask(row["mask"]), label)
        assert row["image"] == (base / "JPEGImages" / f"{row['image_id']}.jpg").read_bytes()
        assert row["mask"] == (base / "SegmentationClass" / f"{row['image_id']}.png").read_bytes()

    # The fingerprint hashes content, not where it is stored: a local run over the same files agrees.
    local = prepare(
        PrepareConfig("voc", str(src), str(tmp_path / "local"), progress=False, max_bad_fraction=0.2)
    )
    assert local.fingerprint == result.fingerprint == prepared.fingerprint


def test_missing_s3_inputs_are_user_errors(s3, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare(PrepareConfig(dataset="coco", root=f"{s3}/nothing", out=f"{s3}/out", progress=False))
    with pytest.raises(UserError, match="has no manifest.json"):
        storage.write_text(f"{s3}/half/train/part-0.parquet", "x")
        open_prepared(f"{s3}/half")


class SlowS3:
    """A filesystem that answers like S3 (`type_name` "s3", 0.2 s per GET) from local files, and records
    how many reads were in flight at once."""

    type_name = "s3"

    def __init__(self):
        import pyarrow.fs as pafs

        self.local, self.lock, self.active, self.peak, self.reads = (
            pafs.LocalFileSystem(),
            threading.Lock(),
            0,
            0,
            0,
        )

    def open_input_stream(self, path: str):
        with self.lock:
            self.active, self.reads = self.active + 1, self.reads + 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(0.2)
            return self.local.open_input_stream(path)
        finally:
            with self.lock:
                self.active -= 1


def test_s3_reads_of_a_batch_run_concurrently_and_still_quarantine(tmp_path):
    import pyarrow as pa
    import pyarrow.fs as pafs

    src = synthesize(SynthConfig("voc", str(tmp_path / "src"), num_train=8, num_val=0, seed=5))
    samples, _ = get_layout("voc").list_split(str(src), "train")
    missing = Path(samples[3].label)
    missing.unlink()  # its label is gone: quarantined, the others converted
    batch = pa.Table.from_pylist([dataclasses.asdict(s) for s in samples])

    fs = SlowS3()
    started = time.perf_counter()
    slow = convert_batch(batch, layout=get_layout("voc"), fs=fs, max_side=None).to_pylist()
    seconds = time.perf_counter() - started
    assert fs.reads == 16 and fs.peak >= 2, (fs.reads, fs.peak)  # 8 images + 8 labels
    assert seconds < 0.2 * fs.reads / 2  # sequential GETs would take 3 s
    local = convert_batch(
        batch, layout=get_layout("voc"), fs=pafs.LocalFileSystem(), max_side=None
    ).to_pylist()
    assert slow == local
    assert [r["reason"] for r in slow if r["reason"]] == ["file does not exist"]
    assert slow[3]["path"] == str(missing)
