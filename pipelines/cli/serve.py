"""Serving stage: `serve` (Ray Serve endpoint)."""

from __future__ import annotations

import argparse

from pipelines.cli.common import add_model_uri, add_tracking_uri, config_from_args


# ---------------------------------------------------------------------------------------------- serve
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP with Ray Serve (autoscaled, follows an alias)",
        description="Serve a model on Ray Serve until Ctrl-C: POST /v1/segment, GET /v1/model, "
        "an upload page at /, API docs at /docs. With models:/NAME@ALIAS the endpoint switches to "
        "the version the alias points at, without downtime.",
    )
    add_model_uri(p, note=" (an alias is followed)")
    add_tracking_uri(p)
    # Defaults left to ServeConfig (the help texts quote them; importing it here would start Ray's imports).
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: 8000)")
    p.add_argument("--min-replicas", type=int, help="fewest model replicas (default: 1)")
    p.add_argument(
        "--max-replicas",
        type=int,
        help="most model replicas, and CRF replicas with --crf (default: sized from the cluster's cores, "
        "replicas x torch threads = each node's cores less one in eight for the proxy and ingress)",
    )
    p.add_argument(
        "--replica-threads",
        type=int,
        help="torch threads per model replica on CPUs (default: sized from the node, at most 4)",
    )
    p.add_argument(
        "--member-gpus",
        type=float,
        help="GPUs per model replica (the whole ensemble), e.g. 1 or 0.5 (default: 0, CPU)",
    )
    p.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="require `Authorization: Bearer <token>` on /v1/ with the token in FILE (/healthz stays open); "
        "put TLS in front at the ingress or load balancer",
    )
    p.add_argument(
        "--crf",
        action="store_true",
        help="dense CRF post-processing with the model's parameters, in its own 1-CPU replicas",
    )
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from pipelines.serve import ServeConfig, serve_forever

    serve_forever(config_from_args(ServeConfig, args))


COMMANDS = [add_serve]
