"""What a resumable job (`retrain`, `reproduce`) has finished: one state.json per run, written after each
step, so a re-run skips the finished steps."""

from __future__ import annotations

import json
import time
from typing import Any

from pipelines import storage


class StepState:
    """Finished steps of one job run, persisted after each step (local folder or s3://)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.data: dict[str, Any] = (
            json.loads(storage.read_text(uri)) if storage.exists(uri) else {"steps": {}}
        )

    def done(self, step: str) -> dict[str, Any] | None:
        return self.data["steps"].get(step)

    def record(self, step: str, output: dict[str, Any], seconds: float) -> None:
        self.data["steps"][step] = {"output": output, "seconds": seconds, "finished": time.time()}
        storage.write_text(self.uri, json.dumps(self.data, indent=2, default=str))
