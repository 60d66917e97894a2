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
    p.add_argument("--min-replicas", type=int, default=1, help="fewest model replicas (default: 1)")
    p.add_argument(
        "--max-replicas",
        type=int,
        default=2,
        help="most model replicas, and CRF replicas with --crf (default: 2)",
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

    serve_forever(
        ServeConfig(
            model_uri=args.model_uri,
            tracking_uri=args.tracking_uri or "",
            host=args.host,
            port=args.port,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            member_gpus=args.member_gpus,
            crf=args.crf,
        )
    )


COMMANDS = [add_serve]
