"""Connecting to Ray: one front door so every stage attaches to the same cluster the same way.

Quiet by default: segpipe prints its own progress lines, Ray Data's progress bars, Tune's status table and
the results; Ray's INFO logs (cluster start, operator plans, worker group states) go to Ray's log files
under /tmp/ray/session_latest/logs. `segpipe --verbose` (or SEGPIPE_VERBOSE=1) brings them back.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "SEGPIPE_VERBOSE"


def set_verbose(on: bool) -> None:
    """Through the environment, so Ray workers started from this process see the same setting."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


def tune_verbosity() -> int:
    """Tune's `verbose`: its status table only (1), or every trial result as well (3, Tune's default)."""
    return 3 if verbose() else 1


def quiet_ray_data() -> None:
    """Ray Data's INFO records (execution plans, periodic progress summaries) to its log file only."""
    import ray.data  # noqa: F401  (importing it installs Ray Data's logging configuration)

    level = logging.INFO if verbose() else logging.WARNING
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Attach to the running Ray (a job's cluster, $RAY_ADDRESS, or the test session's) or start a local one.

    Returns True when this call started Ray, so the caller knows whether to shut it down.
    """
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return False
    level = logging.INFO if verbose() else logging.WARNING
    kwargs: dict = {
        "logging_level": level,
        "configure_logging": True,
        # The level of every task and actor of the job (Ray Train's controller, Ray Data's workers).
        "logging_config": ray.LoggingConfig(log_level=logging.getLevelName(level)),
    }
    if not os.environ.get("RAY_ADDRESS"):
        # A fresh local instance with CPUs as asked or all. The dashboard (on 127.0.0.1 only) serves Ray's
        # state API, which Ray Train's PlacementGroupCleaner needs to free the CPUs of a run that Tune stopped
        # early (ASHA); without it those placement groups leak and later trials wait forever.
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", num_cpus=num_cpus)
    ray.init(**kwargs)
    return True


def cluster_gpus() -> float:
    """GPUs of the alive nodes now (for sizing actor pools; `preflight` also knows the autoscaler's limit)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
