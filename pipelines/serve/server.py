"""Server lifecycle: the Serve application for a config, and starting/stopping it from Python or the CLI.

`pipelines.serve:app` is the args builder for `serve run` / `serve deploy` (cluster/serve_config.yaml);
`start_server` / `stop_server` run the same application from Python (the CLI, the tests, the demo).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any

from ray import serve

from pipelines.errors import UserError
from pipelines.model_uri import ModelUri
from pipelines.preflight import Capacity, cluster_capacity
from pipelines.runtime import log_level
from pipelines.serve.config import APP_NAME, ServeConfig, config_from_args, replica_sizing
from pipelines.serve.crf import CRFRefiner
from pipelines.serve.ingress import SegmentationIngress
from pipelines.serve.model import SegmentationModel
from pipelines.serve.refs import resolve_model
from pipelines.serve_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

# The proxy gives up this long after the app's own timeout, so clients normally get the app's JSON 504.
PROXY_TIMEOUT_MARGIN_S = 5.0


def autoscaling(cfg: ServeConfig, min_replicas: int) -> dict[str, Any]:
    config = {
        "min_replicas": min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "look_back_period_s": cfg.look_back_period_s,
    }
    if cfg.look_back_period_s < 30:
        # Load is reported every 10 s by default: too coarse for a short look-back window (Serve has
        # deprecated this field for an environment variable of every replica, but still honours it).
        config["metrics_interval_s"] = cfg.look_back_period_s / 3
    return config


def capacity() -> Capacity:
    """The Ray cluster's, or this machine's before Ray starts (`start_server` then starts a local
    instance with all of its cores; it joins a cluster to be joined before sizing anything)."""
    import ray

    if ray.is_initialized():
        return cluster_capacity()
    import torch

    cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
    return Capacity(cpus=cpus, gpus=gpus, node_cpus=cpus, node_gpus=gpus)


def build_app(cfg: ServeConfig):
    """The Serve application for `cfg`: the ingress, the model deployment and (with `crf`) the CRF pool.

    Resolves and reads the model first, so a bad URI fails here with a UserError, before Serve starts.
    The model replicas are sized from the cluster (`replica_sizing`) where `cfg` leaves them at 0.
    """
    from pipelines import tracking

    if ModelUri.parse(cfg.model_uri).kind != "folder":
        # Replicas run in other processes (and nodes): give them an absolute store, not "./mlruns".
        cfg = dataclasses.replace(cfg, tracking_uri=tracking.resolve_tracking_uri(cfg.tracking_uri))
    model = resolve_model(cfg.model_uri, cfg.tracking_uri)
    sizing = replica_sizing(cfg, capacity())
    cfg = dataclasses.replace(
        cfg, max_replicas=sizing.replicas, replica_threads=sizing.threads, member_cpus=sizing.cpus
    )
    logging.getLogger("ray.serve").info("model replicas: %s", sizing)
    actor = {"num_cpus": cfg.member_cpus, **({"num_gpus": cfg.member_gpus} if cfg.member_gpus else {})}
    segmenter = SegmentationModel.options(
        autoscaling_config=autoscaling(cfg, cfg.min_replicas),
        ray_actor_options=actor,
        # Room for a full batch in progress plus the next one forming.
        max_ongoing_requests=2 * cfg.max_batch_size,
        max_queued_requests=cfg.max_queued_requests,
        user_config={"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
    ).bind(cfg, model)
    refiner = None
    if cfg.crf:
        # One CPU each, so pydensecrf (which holds the GIL) never stalls the ingress or the model.
        refiner = CRFRefiner.options(
            autoscaling_config=autoscaling(cfg, max(1, cfg.min_replicas)),
            ray_actor_options={"num_cpus": 1},
            max_ongoing_requests=2,
            max_queued_requests=cfg.max_queued_requests,
            user_config={},
        ).bind()
    admitted = cfg.admitted
    return SegmentationIngress.options(
        # The ingress admits what it may hold and answers 503 JSON itself beyond that.
        max_ongoing_requests=admitted if admitted is not None else cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.ingress_cpus},
    ).bind(cfg, model, segmenter, refiner)


def app(args: dict[str, Any]):
    """Serve's args builder: `serve run pipelines.serve:app model_uri=models:/NAME@champion max_replicas=4`."""
    return build_app(config_from_args(args))


_started_ray = False


def start_server(cfg: ServeConfig) -> str:
    """Deploy the endpoint on Ray ($RAY_ADDRESS's, the running one, or a new local one); returns its base URL."""
    global _started_ray
    import ray

    from pipelines.runtime import ensure_ray, joins_a_cluster

    if not ray.is_initialized() and joins_a_cluster():
        # Size the replicas from the nodes that run them, not from this machine: a job's driver runs on
        # the head, which reserves no CPUs for work and may be smaller than the workers, or have no GPU.
        check_port_free(cfg.host, cfg.port)
        _started_ray = ensure_ray() or _started_ray
    application = build_app(cfg)  # the model URI is checked before a local Ray starts
    if not ray.is_initialized():
        check_port_free(cfg.host, cfg.port)
        # Ray's processes inherit the environment: the proxy then answers its own errors as JSON too.
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    _started_ray = ensure_ray() or _started_ray
    serve.start(
        http_options={
            "host": cfg.host,
            "port": cfg.port,
            "request_timeout_s": cfg.request_timeout_s + PROXY_TIMEOUT_MARGIN_S,
        },
        # Controller and proxy records to Serve's log files unless --verbose.
        logging_config={"log_level": logging.getLevelName(log_level())},
    )
    # The replicas' too, access logs included.
    serve.run(
        application,
        name=APP_NAME,
        route_prefix="/",
        logging_config={"log_level": logging.getLevelName(log_level())},
    )
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def stop_server() -> None:
    """Shut Serve down (applications and proxies), and Ray too when `start_server` started it."""
    global _started_ray
    import ray

    serve.shutdown()
    if _started_ray:
        ray.shutdown()
        _started_ray = False


def check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port") from None


def serve_forever(cfg: ServeConfig) -> None:
    """`segpipe serve`: start the endpoint, answer until SIGINT/SIGTERM, then shut Serve down cleanly."""
    import signal

    url = start_server(cfg)
    print(
        f"serving {cfg.model_uri} at {url}  (upload page {url}/, API docs {url}/docs); Ctrl-C stops",
        flush=True,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("shutting down", flush=True)
        stop_server()
