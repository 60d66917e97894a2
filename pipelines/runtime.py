"""Connecting to Ray: one front door so every stage attaches to the same cluster the same way."""

from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Attach to the running Ray (a job's cluster, $RAY_ADDRESS, or the test session's) or start a local one.

    Returns True when this call started Ray, so the caller knows whether to shut it down.
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": True}
    if not os.environ.get("RAY_ADDRESS"):
        # A fresh local instance with CPUs as asked or all. The dashboard (on 127.0.0.1 only) serves Ray's
        # state API, which Ray Train's PlacementGroupCleaner needs to free the CPUs of a run that Tune stopped
        # early (ASHA); without it those placement groups leak and later trials wait forever.
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", num_cpus=num_cpus)
    ray.init(**kwargs)
    return True
