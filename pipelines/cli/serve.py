"""Serving stage: `serve` (Ray Serve endpoint)."""

from __future__ import annotations

import argparse


# ---------------------------------------------------------------------------------------------- serve
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP with Ray Serve (autoscaled, follows an alias)",
        description="Serve a model on Ray Serve until Ctrl-C: POST /v1/segment, GET /v1/model, "
        "an upload page at /, API docs at /docs. With models:/NAME@ALIAS the endpoint switches to "
        "the version the alias points at, without downtime.",
    )
    p.add_argument(
        "--model-uri",
        required=True,
        help="runs:/RUN_ID/model, models:/NAME/VERSION, models:/NAME@ALIAS (followed) or a model folder",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
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
        default=0.0,
        help="GPUs per model replica (the whole ensemble), e.g. 1 or 0.5 (default: 0, CPU)",
    )
    p.add_argument(
        "--crf",
        action="store_true",
        help="dense CRF post-processing with the model's parameters, in its own 1-CPU replicas",
    )
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from pipelines.serve import ServeConfig, serve_forever

    # Options left out keep ServeConfig's defaults (one place for them).
    sizing = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
              "replica_threads": args.replica_threads}  # fmt: skip
    serve_forever(
        ServeConfig(
            model_uri=args.model_uri,
            tracking_uri=args.tracking_uri or "",
            host=args.host,
            port=args.port,
            member_gpus=args.member_gpus,
            crf=args.crf,
            **{name: value for name, value in sizing.items() if value is not None},
        )
    )


COMMANDS = [add_serve]
