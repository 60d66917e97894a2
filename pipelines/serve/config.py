"""The endpoint's configuration: `ServeConfig`, the args of `serve run` / a Serve config, and runtime knobs.

Values are coerced by `pipelines.config.make_config`, the one rule every segpipe config follows (so
`crf=on` and `flip: on` mean the same thing everywhere).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.config import config_model, make_config
from pipelines.errors import UserError
from pipelines.preflight import Capacity

APP_NAME = "segpipe"


MIN_TOKEN_CHARS = 16


def read_token(path: str) -> str:
    """The bearer token in `path` (surrounding whitespace dropped); UserError when it cannot serve as one."""
    try:
        token = Path(path).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--auth-token-file {path}: cannot read it ({type(err).__name__}: {err})") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise UserError(
            f"--auth-token-file {path}: the token must be one word of at least {MIN_TOKEN_CHARS} characters "
            "(e.g. `openssl rand -hex 32 > token`)"
        )
    return token


@config_model
class ServeConfig:
    """The endpoint: which model, how it scales, and the limits that protect it."""

    model_uri: str  # runs:/ID/model, models:/NAME/VERSION, models:/NAME@ALIAS (followed) or a model folder
    tracking_uri: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    # Autoscaling of the model deployment (each replica holds every member of the ensemble). Upscaling
    # reacts within seconds: replicas report their load every look_back_period_s / 3 and Serve adds
    # replicas once the average over look_back_period_s has been above target for upscale_delay_s.
    min_replicas: int = 1
    max_replicas: int = 0  # 0 = what the cluster holds (`replica_sizing`)
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 6.0
    # Each model replica's Ray reservation and torch threads; 0 = sized from the nodes (`replica_sizing`:
    # on CPUs, replicas x threads = a node's cores less a share for the proxy and the ingress). A
    # fractional member_gpus packs several replicas on one GPU.
    member_cpus: float = 0.0
    replica_threads: int = 0
    member_gpus: float = 0.0
    ingress_cpus: float = 0.25
    # Dynamic batching in each model replica: the initial runtime knobs (user_config changes them live).
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    # Limits: requests an ingress replica works on and queues beyond that (503 JSON past both), request
    # body, image size, time.
    max_ongoing_requests: int = 32
    max_queued_requests: int = 256
    max_body_mb: float = 10.0
    max_pixels: int = 4096 * 4096
    request_timeout_s: float = 30.0
    # Dense CRF in its own autoscaled pool of 1-CPU replicas (up to max_replicas).
    crf: bool = False
    poll_s: float = 10.0  # how often a models:/NAME@ALIAS endpoint checks where the alias points
    # A file holding the token /v1/ requests must send as `Authorization: Bearer <token>` (a Kubernetes
    # Secret mounted as a file); "" = no authentication. The path travels in the config, the token never.
    auth_token_file: str = ""

    def __post_init__(self) -> None:
        if self.auth_token_file:
            read_token(self.auth_token_file)  # missing, unreadable or empty: an error before Serve starts
        if not self.model_uri:
            raise UserError("no model to serve: pass --model-uri (runs:/..., models:/NAME@ALIAS, a folder)")
        if self.min_replicas < 0 or self.max_replicas < 0 or self.min_replicas > (self.max_replicas or 2**31):
            raise UserError(
                f"replicas need 0 <= --min-replicas <= --max-replicas (0 = sized from the cluster), got "
                f"{self.min_replicas} and {self.max_replicas}"
            )
        for name in ("member_cpus", "replica_threads", "member_gpus", "ingress_cpus"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0 (0 = sized from the nodes), got {getattr(self, name)}")
        if not 0 < self.max_pixels <= (Image.MAX_IMAGE_PIXELS or self.max_pixels):
            raise UserError(
                f"max_pixels must be between 1 and Pillow's MAX_IMAGE_PIXELS "
                f"({Image.MAX_IMAGE_PIXELS}), got {self.max_pixels}"
            )
        positive = (
            "max_ongoing_requests",
            "max_body_mb",
            "request_timeout_s",
            "poll_s",
            "target_ongoing_requests",
            "look_back_period_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_queued_requests == 0 or self.max_queued_requests < -1:
            raise UserError(
                f"max_queued_requests must be -1 (no limit) or >= 1, got {self.max_queued_requests}"
            )
        BatchKnobs(self.max_batch_size, self.batch_wait_timeout_s)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def admitted(self) -> int | None:
        """Requests one ingress replica holds at once (working + queued); None = no limit."""
        return (
            None if self.max_queued_requests == -1 else self.max_ongoing_requests + self.max_queued_requests
        )


PROXY_SHARE = 8  # one core in eight is left to Serve's proxy and the ingress (none below eight cores)
MAX_THREADS = 4  # torch threads per CPU replica: intra-op speed-up flattens past a few threads on
# VOC-size images, while replicas keep scaling (and a request waits only for its own replica's batch)


@dataclass(frozen=True)
class ReplicaSizing:
    """How the model deployment uses the cluster."""

    replicas: int  # most model replicas (autoscaling's max_replicas)
    threads: int  # torch threads in each
    cpus: float  # Ray's CPU reservation for each


def replica_sizing(cfg: ServeConfig, capacity: Capacity) -> ReplicaSizing:
    """The model replicas for `cfg` on a cluster of `capacity`; what `cfg` sets (non-zero) is kept.

    On CPUs, a node of N cores gives S = N - N // PROXY_SHARE cores to the model, split into
    ceil(S / MAX_THREADS) replicas of S // replicas torch threads (8 cores: 2 x 3 threads, 2 cores:
    1 x 2, 64 cores: 14 x 4), and every node of that size as many again. Threads may use the cores the
    proxy and ingress reserve (they need a few ms per request), so a replica's Ray reservation is what is
    left on its node after the ingress and, with `crf`, one CRF replica: the whole set fits on one node.
    On GPUs: one CPU thread per replica and as many replicas as the GPUs hold at `member_gpus` each.
    """
    node_cpus = max(1, int(capacity.node_cpus))
    nodes = max(1, round(capacity.cpus / node_cpus))
    if cfg.member_gpus:
        cpus = cfg.member_cpus or 1.0
        replicas = cfg.max_replicas or max(1, int(capacity.gpus / cfg.member_gpus + 1e-9))
        return ReplicaSizing(
            max(replicas, cfg.min_replicas), cfg.replica_threads or max(1, round(cpus)), cpus
        )
    serving = max(1, node_cpus - node_cpus // PROXY_SHARE)
    per_node = math.ceil(serving / MAX_THREADS)
    threads = cfg.replica_threads or (
        max(1, round(cfg.member_cpus)) if cfg.member_cpus else serving // per_node
    )
    if cfg.replica_threads or cfg.member_cpus:
        per_node = max(1, serving // threads)
    room = node_cpus - cfg.ingress_cpus - (1.0 if cfg.crf else 0.0)
    cpus = cfg.member_cpus or max(0.25, min(float(threads), math.floor(room / per_node * 4) / 4))
    replicas = cfg.max_replicas or per_node * nodes
    return ReplicaSizing(max(replicas, cfg.min_replicas), threads, cpus)


@config_model
class BatchKnobs:
    """The model deployment's `user_config`: changed by `serve deploy` without restarting replicas."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise UserError(
                f"need max_batch_size >= 1 and batch_wait_timeout_s >= 0, got {self.max_batch_size} "
                f"and {self.batch_wait_timeout_s}"
            )


def batch_knobs(config: dict[str, Any]) -> BatchKnobs:
    return make_config(BatchKnobs, config, source="SegmentationModel user_config")


# Everything but where the proxy listens, which belongs to Serve's http_options.
APP_ARGS = tuple(f.name for f in dataclasses.fields(ServeConfig) if f.name not in ("host", "port"))


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """The args of `serve run pipelines.serve:app key=value ...` or a Serve config's `args:` -> ServeConfig.

    `serve run` passes strings; YAML passes typed values. Unknown keys are errors, not silently ignored.
    """
    unknown = sorted(set(args) - set(APP_ARGS))
    if unknown:
        raise UserError(
            f"unknown serve app args {unknown}; valid: {', '.join(APP_ARGS)} (host and port belong to "
            "the Serve config's http_options)"
        )
    if "model_uri" not in args:
        raise UserError("serve app args need model_uri (e.g. model_uri=models:/segpipe-voc@champion)")
    return make_config(ServeConfig, args, source="serve app args")
