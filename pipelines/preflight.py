"""Before a run starts: does the Ray cluster have what it asks for, and where do its checkpoints go.

A Ray Train run whose workers cannot all be placed, or that leaves no CPU for Ray Data's read and augment
tasks, waits forever ("Cluster resources are not enough to run any task from ReadParquet"). So every
stage that starts workers compares its request with the cluster first (and, on an autoscaling cluster,
with what the cluster can scale to) and exits with the numbers and the fix instead.

The CPU rule: workers x cpus_per_worker + DATA_CPUS <= cluster CPUs, and one worker fits on one node. On a
GPU cluster the default (1 CPU + 1 GPU per worker) leaves every other CPU of a GPU node to Ray Data.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import UserError

DATA_CPUS = 1.0  # Ray Data needs at least one CPU of its own to read, decode and augment
PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Capacity:
    """What the cluster has now or can scale to: totals and the largest single node."""

    cpus: float
    gpus: float
    node_cpus: float
    node_gpus: float
    autoscaling: bool = False

    def describe(self) -> str:
        where = "can scale to" if self.autoscaling else "has"
        gpus = f" and {self.gpus:g} GPU(s)" if self.gpus else " and no GPU"
        return f"the Ray cluster {where} {self.cpus:g} CPU(s){gpus} (largest node {self.node_cpus:g} CPUs)"


def cluster_capacity() -> Capacity:
    """Totals of the alive nodes, raised to the autoscaler's maximum where one is configured."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    node_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    node_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    autoscaling = False
    try:  # an autoscaling cluster publishes its node groups and their max counts in the GCS
        from ray._private.state import state

        config = state.get_cluster_config()
        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # an older or a local cluster publishes none: what is there now is all there is
        config, limits = None, {}
    if limits:
        autoscaling = True
        cpus, gpus = max(cpus, float(limits.get("CPU", 0))), max(gpus, float(limits.get("GPU", 0)))
        for group in config.node_group_configs:
            node_cpus = max(node_cpus, float(group.resources.get("CPU", 0)))
            node_gpus = max(node_gpus, float(group.resources.get("GPU", 0)))
    return Capacity(cpus, gpus, node_cpus, node_gpus, autoscaling)


def _suggested_cpus_per_worker(free_cpus: float, num_workers: int) -> float:
    """The largest multiple of 0.25 CPU per worker that still leaves DATA_CPUS free."""
    return math.floor((free_cpus - DATA_CPUS) / num_workers * 4) / 4


def check_training_resources(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    *,
    what: str = "training",
    extra_cpus: float = 0.0,
    capacity: Capacity | None = None,
) -> None:
    """Raise UserError unless `num_workers` workers plus Ray Data fit on the cluster (now or scaled up).

    `extra_cpus`: what the caller holds besides the workers (a Tune trial's driver).
    """
    cap = capacity or cluster_capacity()
    gpus = num_workers if use_gpu else 0
    need = num_workers * cpus_per_worker + DATA_CPUS + extra_cpus
    problems, fixes = [], []
    if need > cap.cpus + 1e-9:
        problems.append(
            f"{what} asks for {num_workers} worker(s) x {cpus_per_worker:g} CPU"
            + (f" + {extra_cpus:g} CPU for the trial driver" if extra_cpus else "")
            + f" + {DATA_CPUS:g} CPU left for Ray Data = {need:g} CPUs, but {cap.describe()}"
        )
        suggestion = _suggested_cpus_per_worker(cap.cpus - extra_cpus, num_workers)
        if suggestion > 0:
            fixes.append(
                f"pass --cpus-per-worker {suggestion:g} ({num_workers} x {suggestion:g} + "
                f"{DATA_CPUS:g} <= {cap.cpus - extra_cpus:g})"
            )
        most = int((cap.cpus - extra_cpus - DATA_CPUS) // cpus_per_worker)
        if 0 < most < num_workers:
            fixes.append(f"pass --num-workers {most}")
    elif cpus_per_worker > cap.node_cpus + 1e-9:
        problems.append(
            f"each {what} worker asks for {cpus_per_worker:g} CPUs but the largest node has {cap.node_cpus:g}"
        )
        fixes.append(f"pass --cpus-per-worker {cap.node_cpus:g} or less")
    if gpus > cap.gpus + 1e-9:
        problems.append(f"--use-gpu asks for {gpus} GPU worker(s) but {cap.describe()}")
        fixes.append("drop --use-gpu" if not cap.gpus else f"pass --num-workers {int(cap.gpus)}")
    if problems:
        fixes.append("or add nodes to the cluster")
        raise UserError("; ".join(problems) + ". Fix: " + ", ".join(fixes))


# ------------------------------------------------------------------------------------------- storage
def job_submission_id() -> str | None:
    """The submission id when this process is the driver of a `ray job submit` job, else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id") or "job"
    except (ValueError, AttributeError):
        return "job"


def default_storage() -> str:
    """Where checkpoints go when --storage is not given.

    $SEGPIPE_STORAGE, else the cluster's own setting ($RAY_STORAGE), else, inside a Ray job, Ray's user
    folder ~/ray_results (a relative path would land in the job's temporary working_dir package and vanish
    with the Ray session), else ./ray_results.
    """
    for var in ("SEGPIPE_STORAGE", "RAY_STORAGE"):
        if os.environ.get(var):
            return os.environ[var]
    if job_submission_id() is not None:
        return str(Path("~/ray_results").expanduser())
    return str(Path.cwd() / "ray_results")


def _sees_marker(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def nodes_missing_path(location: str) -> list[str]:
    """Alive nodes (by IP) on which a file the driver just wrote under local `location` is not visible."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return []
    token = uuid.uuid4().hex
    marker = Path(location) / f".segpipe-shared-{token[:8]}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)
    try:
        probe = ray.remote(num_cpus=0)(_sees_marker)
        refs = {
            n["NodeManagerAddress"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker), token)
            for n in nodes
        }
        try:
            seen = ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise UserError(
                f"could not check within {PROBE_TIMEOUT_S:g} s whether every node sees {location}; "
                "are all nodes alive?"
            ) from None
        return [ip for ip, ok in zip(refs, seen, strict=True) if not ok]
    finally:
        marker.unlink(missing_ok=True)


def check_shared_storage(location: str) -> None:
    """On a multi-node cluster a local checkpoint path must be shared storage (NFS) seen by every node."""
    if "://" in location:
        return
    missing = nodes_missing_path(location)
    if missing:
        raise UserError(
            f"--storage {location} is a local folder that node(s) {', '.join(missing)} cannot see: on a "
            "multi-node cluster checkpoints need shared storage; pass --storage s3://bucket/prefix or a "
            "folder on NFS mounted at the same path on every node"
        )
