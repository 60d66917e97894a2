"""Local paths through `pipelines.storage` (the S3 side is in data/test_prepare_s3.py, against moto)."""

from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.errors import UserError


def test_local_paths_read_write_list_publish(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.fs_path("rel/x.txt") == str(tmp_path / "rel" / "x.txt")
    assert storage.fs_path(f"file://{tmp_path}/y") == str(tmp_path / "y")
    assert storage.join("s3://b/p/", "a", "b.txt") == "s3://b/p/a/b.txt"
    assert storage.join(str(tmp_path), "a") == str(tmp_path / "a")

    storage.write_text("stage/one/a.txt", "alpha")  # parents are created
    storage.write_bytes("stage/two.bin", b"\x00" * 3)
    assert storage.read_text("stage/one/a.txt") == "alpha" and storage.is_dir("stage")
    assert storage.list_files("stage") == {"one/a.txt": 5, "two.bin": 3}
    assert storage.list_files("stage", recursive=False) == {"two.bin": 3}
    assert not list(tmp_path.glob("stage/**/*.tmp-*"))  # the temporary sibling was renamed over the target

    assert storage.publish("stage", "final") == ["one/a.txt", "two.bin"]
    assert not storage.exists("stage") and storage.read_bytes("final/two.bin") == b"\x00" * 3
    storage.remove("final/two.bin")
    storage.remove("final/two.bin")  # already gone: fine
    storage.remove_tree("final")
    assert not storage.exists("final") and storage.list_files("final") == {}


def test_unsupported_scheme_and_bucketless_uri():
    with pytest.raises(UserError, match="unsupported URI scheme 'gs'"):
        storage.fs_path("gs://bucket/data")
    with pytest.raises(UserError, match="names no bucket"):
        storage.filesystem("s3://")
