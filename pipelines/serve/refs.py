"""Model URIs: which exact model an endpoint serves. Set by the operator only, never by a request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelRef:
    """One exact model: the pinned URI replicas load it from."""

    source: str  # models:/NAME/VERSION, runs:/ID/model or an absolute model folder
    version: str  # registry version; "" for a run or a folder
    spec: Any  # segmodels.artifact.ModelSpec


def resolve_model(model_uri: str, tracking_uri: str) -> ModelRef:
    """Pin `model_uri` (an alias resolves to its current version, a folder becomes absolute) and read its spec."""
    from pipelines.model_uri import ModelUri, fetched_model
    from segmodels.artifact import read_spec

    pinned = ModelUri.parse(model_uri).pinned(tracking_uri)
    with fetched_model(pinned, tracking_uri) as folder:
        spec = read_spec(folder)
    return ModelRef(source=str(pinned), version=pinned.version, spec=spec)
