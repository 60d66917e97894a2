"""Model URIs: the one parser, pinning, and fetching a model folder for as long as it is needed.

    runs:/RUN_ID/model         a run's logged model
    models:/NAME/VERSION       a registered version
    models:/NAME@ALIAS         whatever version the alias points at (pinned before work is handed out)
    /path/to/folder            a segpipe model folder (model.json + safetensors) on this machine
    s3://..., file:..., http(s)://...   an artifact location MLflow can download

`fetched_model(uri)` yields the local segpipe folder and removes what it downloaded when the block ends;
an operator's own folder is used in place and never removed.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import UserError

ARTIFACT_SCHEMES = ("s3://", "file:", "http://", "https://")
FORMS = "runs:/RUN_ID/model, models:/NAME/VERSION, models:/NAME@ALIAS or a local model folder"


@dataclass(frozen=True)
class ModelUri:
    """A parsed model URI; `str()` gives it back in its canonical form."""

    kind: str  # folder | run | registry | artifact
    uri: str  # as given (a folder: absolute)
    run_id: str = ""
    name: str = ""  # registered model name
    version: str = ""  # registered version (digits)
    alias: str = ""

    @classmethod
    def parse(cls, uri: str) -> ModelUri:
        uri = str(uri).strip()
        if not uri:
            raise UserError(f"no model URI: pass {FORMS}")
        if uri.startswith("runs:"):
            match = re.fullmatch(r"runs:/([^/]+)(/.+)?", uri)
            if not match:
                raise UserError(f"model URI {uri!r} must be runs:/RUN_ID/model")
            return cls("run", uri, run_id=match.group(1))
        if uri.startswith("models:"):
            body = uri.removeprefix("models:/") if uri.startswith("models:/") else ""
            alias = re.fullmatch(r"([^/@]+)@([^/@]+)", body)
            version = re.fullmatch(r"([^/@]+)/(\d+)", body)
            if alias:
                return cls("registry", uri, name=alias.group(1), alias=alias.group(2))
            if version:
                return cls("registry", uri, name=version.group(1), version=version.group(2))
            raise UserError(f"model URI {uri!r} must be models:/NAME/VERSION or models:/NAME@ALIAS")
        if uri.startswith(ARTIFACT_SCHEMES):
            return cls("artifact", uri)
        if "://" in uri:
            raise UserError(f"unsupported model URI {uri!r}: use {FORMS}")
        return cls("folder", str(Path(uri).expanduser().resolve()))

    def __str__(self) -> str:
        if self.kind == "registry":
            return (
                f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"
            )
        return self.uri

    @property
    def is_alias(self) -> bool:
        return bool(self.alias)

    def is_version_of(self, name: str) -> bool:
        """A pinned version (models:/NAME/VERSION) of registered model `name`."""
        return self.kind == "registry" and self.name == name and bool(self.version)

    def pinned(self, tracking_uri: str) -> ModelUri:
        """The same model named so that it cannot move: an alias resolved to its current version."""
        if not self.is_alias:
            return self
        from pipelines import tracking

        found = tracking.model_version(tracking.connect(tracking_uri), self)
        return ModelUri(
            "registry", f"models:/{found.name}/{found.version}", name=found.name, version=str(found.version)
        )


def parse(uri: str | ModelUri) -> ModelUri:
    return uri if isinstance(uri, ModelUri) else ModelUri.parse(uri)


@contextmanager
def fetched_model(uri: str | ModelUri, tracking_uri: str = "") -> Iterator[Path]:
    """The segpipe model folder of `uri` for the block's duration; a download is removed afterwards."""
    from pipelines import tracking

    model = parse(uri)
    if model.kind == "folder":
        folder = tracking.segpipe_folder(Path(model.uri))
        if folder is None:
            raise UserError(
                f"model folder {model.uri} has no model.json; pass a folder written by segpipe or an MLflow URI"
            )
        yield folder
        return
    scratch = Path(tempfile.mkdtemp(prefix="segpipe-model-"))
    try:
        yield tracking.download_model(model, tracking_uri, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
