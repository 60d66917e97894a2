"""What every subcommand shares: the options several commands take, and configs built from parsed args."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

MODEL_URI_FORMS = "runs:/RUN_ID/model, models:/NAME/VERSION, models:/NAME@ALIAS or a local model folder"


def add_model_uri(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--model-uri", required=True, help=MODEL_URI_FORMS + note)


def add_data(p: argparse.ArgumentParser, required: bool = True, note: str = "") -> None:
    p.add_argument("--data", required=required, help="prepared dataset folder or s3:// prefix" + note)


def add_tracking_uri(p: argparse.ArgumentParser, default: str = "$MLFLOW_TRACKING_URI or ./mlruns") -> None:
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI (default: {default})")


def add_json_out(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json-out", help=f"write {what} here as JSON")


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of config dataclass `cls`, for help texts (one place for defaults)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options given on the command line that name fields of `cls` (None = left out: the config's
    default applies)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }


def config_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """Config dataclass `cls` from the parsed options of the same names, with `values` (converted or
    derived fields) on top; typed configs (`pipelines.config.config_model`) are validated as files are."""
    merged = {**given(args, cls), **values}
    if hasattr(cls, "__pydantic_config__"):
        from pipelines.config import make_config

        return make_config(cls, merged, source="command-line options")
    return cls(**merged)


def write_json(path: str | None, payload: dict) -> None:
    """`--json-out`: the command's result as JSON, for scripts and tests."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
