"""Local paths and `s3://bucket/prefix` URIs behind one small API, so every stage reads and writes either.

Everything goes through `pyarrow.fs`, the same filesystems Ray Data uses. S3 is configured from the
standard AWS variables, read explicitly because pyarrow's own S3 client ignores `AWS_ENDPOINT_URL`:
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (MinIO, moto, Ceph...), `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`. Without keys in the
environment pyarrow falls back to the AWS default chain (profiles, instance roles).

Ray workers on other nodes do not see the driver's environment, so code that ships work to Ray resolves
the filesystem once on the driver (`filesystem(uri)`) and passes the (picklable) object along.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

S3_PREFIX = "s3://"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def fs_path(uri: str) -> str:
    """The path inside the filesystem: `bucket/key` for S3, an absolute path for local files."""
    uri = str(uri)
    if is_s3(uri):
        return uri[len(S3_PREFIX) :].rstrip("/")
    match = _SCHEME.match(uri)
    if match and match.group(1) != "file":
        raise UserError(
            f"unsupported URI scheme {match.group(1)!r} in {uri!r}: use a local path or s3://bucket/prefix"
        )
    if match:
        uri = uri[len("file://") :]
    return str(Path(uri).expanduser().resolve())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    path = fs_path(uri)
    if is_s3(uri):
        if not path:
            raise UserError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        return _s3_filesystem(*_s3_settings()), path
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), path


def _s3_settings() -> tuple[str | None, ...]:
    env = os.environ.get
    return (
        env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
        env("AWS_ACCESS_KEY_ID"),
        env("AWS_SECRET_ACCESS_KEY"),
        env("AWS_SESSION_TOKEN"),
        env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
    )


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint, access_key, secret_key, session_token, region) -> pafs.S3FileSystem:
    import pyarrow.fs as pafs

    kwargs: dict = {"allow_bucket_creation": False}
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=session_token)
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
        # A custom endpoint has no region lookup; most S3-compatible servers accept us-east-1.
        region = region or "us-east-1"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def join(base: str, *parts: str) -> str:
    """Join path components with `/`, keeping the s3:// scheme (os.path.join would mangle it)."""
    base = str(base)
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base, *parts))


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.readall()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Readers never see it half written: an S3 PUT is atomic, and locally the bytes go
    to a temporary sibling that is renamed over the target."""
    put_bytes(*filesystem(uri), data)


def put_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """`write_bytes` on a filesystem resolved beforehand (Ray tasks get it from the driver, see above)."""
    if fs.type_name == "s3":
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    ensure_parent(fs, path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def ensure_parent(fs: pafs.FileSystem, path: str) -> None:
    # Only local disks have directories; on S3 create_dir would leave empty marker objects behind.
    if fs.type_name == "local":
        fs.create_dir(posixpath.dirname(path), recursive=True)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str, recursive: bool = True) -> dict[str, int]:
    """Files under a directory or prefix as {path relative to it (with `/`): size in bytes}; {} if absent."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    files = {}
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            files[posixpath.relpath(info.path, path)] = info.size
    return files


def remove(uri: str) -> None:
    """Delete one file; a missing file is not an error."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def remove_tree(uri: str) -> None:
    """Delete a directory or prefix and everything under it; a missing one is not an error."""
    if exists(uri):
        fs, path = filesystem(uri)
        fs.delete_dir(path)


def publish(staging: str, dest: str) -> list[str]:
    """Move every file under `staging` to the same relative path under `dest`, then drop `staging`.

    Returns the relative paths moved. A local move is a rename; on S3 it is a server-side copy + delete
    per object (S3 has no directory rename), so callers publish an index (e.g. a manifest) last.
    """
    fs, staging_path = filesystem(staging)
    _, dest_path = filesystem(dest)
    moved = sorted(list_files(staging))
    for rel in moved:
        target = posixpath.join(dest_path, rel)
        ensure_parent(fs, target)
        fs.move(posixpath.join(staging_path, rel), target)
    remove_tree(staging)
    return moved
