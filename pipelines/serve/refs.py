"""Model URIs: which exact model an endpoint serves. Set by the operator only, never by a request."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelRef:
    """One exact model: the pinned URI replicas load it from."""

    source: str  # models:/NAME/VERSION, runs:/ID/model or an absolute model folder
    version: str  # registry version; "" for a run or a folder
    spec: Any  # segmodels.artifact.ModelSpec


def registry_alias(model_uri: str) -> tuple[str, str] | None:
    """models:/NAME@ALIAS -> (NAME, ALIAS); None for any other URI (nothing to follow)."""
    if model_uri.startswith("models:/") and "@" in model_uri:
        name, alias = model_uri.removeprefix("models:/").split("@", 1)
        return name, alias
    return None


def registry_name(model_uri: str) -> str | None:
    if not model_uri.startswith("models:/"):
        return None
    body = model_uri.removeprefix("models:/")
    return body.split("@", 1)[0] if "@" in body else body.rsplit("/", 1)[0]


def is_local_folder(uri: str) -> bool:
    return "://" not in uri and not uri.startswith(("runs:", "models:"))


def resolve_model(model_uri: str, tracking_uri: str) -> ModelRef:
    """Pin `model_uri` (an alias resolves to its current version, a folder becomes absolute) and read its spec."""
    from pipelines import tracking
    from segmodels.artifact import read_spec

    if model_uri.startswith("models:/"):
        version = tracking.model_version(tracking.connect(tracking_uri), model_uri)
        source, number = f"models:/{version.name}/{version.version}", str(version.version)
    elif is_local_folder(model_uri):
        source, number = str(Path(model_uri).expanduser().resolve()), ""
    else:
        source, number = model_uri, ""
    folder = tracking.download_model(source, tracking_uri)
    try:
        spec = read_spec(folder)
    finally:
        discard_download(source, folder)
    return ModelRef(source=source, version=number, spec=spec)


def discard_download(source: str, folder: Path) -> None:
    """Remove a folder `tracking.download_model` fetched; never the operator's own model folder."""
    if not is_local_folder(source):
        shutil.rmtree(folder, ignore_errors=True)
