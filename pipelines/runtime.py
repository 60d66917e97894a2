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
        # A fresh local instance: no dashboard (saves ~1 s and 200 MB), CPUs as asked or all.
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    ray.init(**kwargs)
    return True


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
