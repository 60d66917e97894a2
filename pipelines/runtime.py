"""Connecting to Ray: one front door so every stage attaches to the same cluster the same way.

Quiet by default: segpipe prints its own progress lines (epochs, trials, steps), the driver's Ray Data
progress bars (prepare, predict) and the results. Ray's INFO logs (cluster start, operator plans, worker
group states, checkpoint reports, Serve's access logs), Tune's tables and the progress of the datasets
that Ray workers run (every training feed) go to Ray's log files under /tmp/ray/session_latest/logs;
what Ray prints past its loggers is filtered off the `segpipe` command's stderr (`pipelines.terminal`).
`segpipe --verbose` (or SEGPIPE_VERBOSE=1) brings them back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipelines.errors import UserError

VERBOSE_ENV = "SEGPIPE_VERBOSE"


def set_verbose(on: bool) -> None:
    """Through the environment, so Ray workers started from this process see the same setting."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    # Tune's new output engine prints a configuration box and result paths per search even when silent;
    # its legacy engine at verbosity 0 prints nothing (segpipe prints each trial's epochs itself).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if on else "0"
    # MLflow's per-file download bars (a model folder is ~100 files): only with --verbose.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if on else "false")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


def log_level() -> int:
    """The console level of Ray's loggers: INFO with --verbose, else WARNING."""
    return logging.INFO if verbose() else logging.WARNING


def tune_verbosity() -> int:
    """Tune's `verbose`: silent (0; segpipe prints each trial's epochs), or every table and result (3)."""
    return 3 if verbose() else 0


def quiet_ray_data() -> None:
    """Ray Data's INFO records (execution plans, periodic progress summaries) to its log file only."""
    import ray.data  # noqa: F401  (importing it installs Ray Data's logging configuration)

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(log_level())
    if not verbose():  # connecting to Serve, MLflow creating its tables: INFO, not for the terminal
        for name in ("ray.serve", "mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # "Token authentication is enabled" at every local start (segpipe's instances are token-only),
        # "Progress bars disabled" (segpipe prints its own progress line): nothing to act on.
        for name in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
            logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if verbose() else "false")


def quiet_worker_env() -> dict[str, str]:
    """Environment for the Ray workers of a local instance started quiet.

    Datasets that workers execute (each training feed, in Ray Train's split coordinator or a Tune trial)
    would print their progress summaries on the terminal every few seconds: their bars are off and
    Ray Data's console handler shows warnings only. Ray Data's log file keeps everything.
    Tune prints nothing of its own at verbosity 0 with its legacy output engine (`set_verbose`).
    """
    if verbose():
        return {}
    import copy
    import tempfile

    import yaml
    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "WARNING"
    # Its one record here says that the bars are off, which is what was asked for.
    config["loggers"]["ray.data._internal.progress"] = {"level": "ERROR", "propagate": True}
    path = os.path.join(tempfile.gettempdir(), f"segpipe-ray-data-logging-{os.getuid()}.yaml")
    with open(path, "w") as out:
        yaml.safe_dump(config, out)
    return {
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_DATA_LOGGING_CONFIG": path,
        # Deprecations inside Ray's own calls (Ray Train passing Ray Data an old option) are Ray's to fix.
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Attach to the running Ray (a job's cluster, $RAY_ADDRESS, or the test session's) or start a local one.

    Returns True when this call started Ray, so the caller knows whether to shut it down.
    """
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return False
    kwargs: dict = {
        "logging_level": log_level(),
        "configure_logging": True,
        # The level of every task and actor of the job (Ray Train's controller, Ray Data's workers).
        "logging_config": ray.LoggingConfig(log_level=logging.getLevelName(log_level())),
    }
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)  # a job on a cluster keeps the runtime environment it was given
    elif joins_a_cluster():  # the `ray start` cluster of this machine
        ray.init(runtime_env={"env_vars": quiet_worker_env()}, **kwargs)
    else:
        start_local(quiet_worker_env(), num_cpus=num_cpus, **kwargs)
    return True


def joins_a_cluster() -> bool:
    """Whether `ensure_ray` joins a running cluster ($RAY_ADDRESS's, or this machine's `ray start` one)
    rather than starting a local instance (no cluster, or RAY_ADDRESS=local)."""
    from ray._private.services import find_bootstrap_address

    address = os.environ.get("RAY_ADDRESS", "")
    return address != "local" if address else find_bootstrap_address(None) is not None


def start_local(env: dict[str, str], **init_args) -> None:
    """`ray.init` of a new instance on this machine whose workers know its address (`env` added to theirs).

    Ray's state API (Ray Train's PlacementGroupCleaner asks it whether a run's controller is alive)
    otherwise finds "the" local instance by scanning processes, and fails when this machine runs two (a
    test session beside `segpipe demo`, a `ray start` head beside a command): the cleaner then dies, the
    placement groups of runs Tune stopped early leak and later trials wait forever. So the GCS port is
    chosen here. The dashboard (on 127.0.0.1 only) serves that state API.
    """
    import ray
    from ray._private.services import get_node_ip_address

    port = str(free_port())
    os.environ["RAY_GCS_SERVER_PORT"] = port
    try:
        ray.init(
            address="local",
            runtime_env={"env_vars": {**env, "RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}},
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **init_args,
        )
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


def free_port() -> int:
    """A TCP port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def cluster_gpus() -> float:
    """GPUs of the alive nodes now (for sizing actor pools; `preflight` also knows the autoscaler's limit)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def largest_node_memory() -> int:
    """Bytes of Ray's `memory` resource on the largest alive node: the most one task can reserve."""
    import ray

    return int(max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]), default=0))


@dataclass(frozen=True)
class ModelActors:
    """Where the model-holding actors of evaluate, predict and ensemble scoring run, and how many fit."""

    num_gpus: float  # per actor; 0 = on CPUs
    slots: int  # actors the cluster runs at once
    cpus: int  # CPUs of the cluster

    @property
    def device(self) -> str:
        """Where each actor loads its model."""
        return "cuda" if self.num_gpus else "cpu"

    @property
    def options(self) -> dict[str, float]:
        """One actor's Ray resources, as `map_batches` keyword arguments."""
        return {"num_cpus": 1, "num_gpus": self.num_gpus} if self.num_gpus else {"num_cpus": 1}

    def pool(self, items: int, per_actor: int, concurrency: int = 0) -> int:
        """Actors for `items` (`concurrency` when the user chose), see `pool_size`."""
        return concurrency or pool_size(self.slots, items, per_actor)

    def threads(self, actors: int) -> int:
        """Torch threads per actor: one beside a GPU; on CPUs the cluster's cores shared by the actors."""
        return 1 if self.num_gpus else max(1, self.cpus // actors)


def model_actors(num_gpus: float | None = None, option: str = "--num-gpus") -> ModelActors:
    """The one rule for model actors: GPUs per actor as asked (a fraction shares a GPU, 0 = CPUs), or,
    when not asked (None), one GPU each if the cluster has GPUs, else CPUs.

    Checked against the cluster now, so a wrong `option` fails before any work starts. On CPUs one core
    is left to the read/decode/write tasks, which would otherwise never be scheduled; a fixed pool of that
    size, each actor's torch threads using the cores it holds (a pool left to grow from one actor stayed
    at one, on a single core).
    """
    gpus, cpus = cluster_gpus(), cluster_cpus()
    if num_gpus is None:
        num_gpus = min(1.0, gpus)
    if num_gpus < 0 or (num_gpus > 1 and not float(num_gpus).is_integer()):
        raise UserError(
            f"{option} {num_gpus:g}: give 0 (CPUs), a fraction of one GPU such as 0.25, or a whole number"
        )
    if num_gpus > gpus:
        raise UserError(
            f"{option} {num_gpus:g} but the Ray cluster has {gpus:g} GPUs: add GPU nodes, lower {option}, "
            f"or pass {option} 0 to run on CPUs"
        )
    spare = max(1, cpus - 1)
    slots = min(spare, max(1, int(gpus / num_gpus + 1e-9))) if num_gpus else spare
    return ModelActors(num_gpus=float(num_gpus), slots=slots, cpus=cpus)


def pool_size(workers: int, items: int, per_actor: int) -> int:
    """Actors for a pool of model-loading actors over `items` batches/images: at most `workers`, and none
    started for fewer than `per_actor` items (each loads torch and a model: seconds before its first item)."""
    return max(1, min(workers, -(-items // max(1, per_actor))))
