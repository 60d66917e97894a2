"""What every subcommand shares."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | None, payload: dict) -> None:
    """`--json-out`: the command's result as JSON, for scripts and tests."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
