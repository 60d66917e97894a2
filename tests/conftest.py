"""Fixtures shared by every test package."""

from __future__ import annotations

import logging
import os

import pytest

# Ray Train's controller polls its workers every 2 s and its preemption watcher every 5 s: on runs of a
# few seconds (every training run here) that waiting was a fifth of each run. Set before Ray starts, so
# the local instances and the subprocesses the tests start (retrain, demo, Ray jobs) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting Ray costs seconds).

    Tolerant of a Ray that is already running (a test module that built its own cluster, or $RAY_ADDRESS):
    it is used as is and left for its owner to shut down.
    """
    import ray

    from pipelines.runtime import start_local

    started = not ray.is_initialized()
    if started:
        # A fresh instance even when another one on this machine was started with `ray start` (plain
        # ray.init() would attach to that one and reject num_cpus); its workers know its address, so Ray
        # Train's placement-group cleaner keeps working while a test starts a second instance.
        start_local({}, num_cpus=4, logging_level=logging.WARNING, configure_logging=True)
    yield ray
    if started and ray.is_initialized():
        ray.shutdown()
