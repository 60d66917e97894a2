"""Quiet by default: the environment a local Ray's workers get, and the verbosity knobs."""

import json
import os
import subprocess
import sys

from pipelines import runtime

PROBE = """
import json, logging
import ray.data
from ray.data.context import DataContext
console = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
print(json.dumps({
    "bars": DataContext.get_current().enable_progress_bars,
    "console": [logging.getLevelName(h.level) for h in console],
    "progress_logger": logging.getLevelName(logging.getLogger("ray.data._internal.progress").level),
    "data_logger": logging.getLevelName(logging.getLogger("ray.data").level),
}))
"""


def probe(env: dict[str, str]) -> dict:
    """What Ray Data in a fresh worker-like process shows on its console, given `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_DATA_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quiet_worker_env_silences_worker_datasets_but_keeps_their_log_file(monkeypatch):
    monkeypatch.setenv(runtime.VERBOSE_ENV, "0")
    env = runtime.quiet_worker_env()
    quiet = probe(env)
    assert quiet["bars"] is False
    assert quiet["console"] == ["WARNING"]
    assert quiet["progress_logger"] == "ERROR"
    assert quiet["data_logger"] == "DEBUG"  # the file handler still gets everything

    loud = probe({})
    assert loud["bars"] is True and loud["console"] == ["INFO"]


def test_verbose_leaves_workers_and_tune_as_ray_has_them(monkeypatch):
    monkeypatch.setenv(runtime.VERBOSE_ENV, "1")
    assert runtime.quiet_worker_env() == {}
    assert runtime.tune_verbosity() == 3
    monkeypatch.setenv(runtime.VERBOSE_ENV, "0")
    assert runtime.tune_verbosity() == 0
    assert runtime.log_level() > runtime.logging.INFO


def test_reading_a_split_samples_its_files_without_a_bar_unless_verbose(prepared_voc, monkeypatch, capfd):
    from ray.data import DataContext

    from pipelines.data.dataset import open_prepared

    monkeypatch.setattr(DataContext.get_current(), "enable_progress_bars", True)
    monkeypatch.setenv(runtime.VERBOSE_ENV, "0")
    ds = open_prepared(prepared_voc).split("val")
    assert "Parquet dataset sampling" not in capfd.readouterr().err
    assert ds.context.enable_progress_bars is True  # the dataset's own execution keeps the caller's choice
    assert DataContext.get_current().enable_progress_bars is True

    monkeypatch.setenv(runtime.VERBOSE_ENV, "1")
    open_prepared(prepared_voc).split("val")
    assert "Parquet dataset sampling" in capfd.readouterr().err
