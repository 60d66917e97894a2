"""Whole-pipeline jobs: `retrain` (one resumable cycle) and `demo`."""

from __future__ import annotations

import argparse

from pipelines.cli.common import write_json


# ---------------------------------------------------------------------------------------------- retrain
def add_retrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="prepare -> tune -> ensemble -> promote as one resumable job",
        description="One retraining cycle from a config such as cluster/retrain-voc.yaml. "
        "Re-running after a crash continues from the finished steps; re-running a finished "
        "cycle on unchanged data does nothing new.",
    )
    p.add_argument(
        "--config", required=True, help="retrain YAML (source, prepared, search, register_as, margin)"
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides the file)")
    p.add_argument("--json-out", help="write every step's output and the promotion decision here")
    p.set_defaults(run=_run_retrain)


def _run_retrain(args: argparse.Namespace) -> None:
    from pipelines.retrain import load_retrain, retrain

    result = retrain(load_retrain(args.config, tracking_uri=args.tracking_uri))
    for step, info in result["steps"].items():
        print(f"{step:9s} {info['seconds']:8.1f} s")
    print(result["reason"])
    print(f"champion: {result['champion']} (version {result['champion_version']})")
    write_json(args.json_out, result)


# ---------------------------------------------------------------------------------------------- demo
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on generated data, on this machine",
        description="synth (VOC layout) -> prepare -> tune two architectures -> ensemble -> "
        "register and promote -> Ray Serve -> real HTTP requests, all locally.",
    )
    p.add_argument("--workdir", default="demo", help="where data, runs and overlays go (default: ./demo)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per trial (default: 6)")
    p.add_argument("--trials", type=int, default=2, help="trials per architecture (default: 2)")
    p.add_argument("--port", type=int, default=8000, help="serving port on 127.0.0.1 (default: 8000)")
    p.add_argument("--keep-serving", action="store_true", help="leave the endpoint up until Ctrl-C")
    p.add_argument("--json-out", help="write the demo's results here")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from pipelines.demo import DemoConfig, run_demo

    summary = run_demo(
        DemoConfig(
            workdir=args.workdir,
            epochs=args.epochs,
            trials=args.trials,
            port=args.port,
            keep_serving=args.keep_serving,
        )
    )
    write_json(args.json_out, summary)


COMMANDS = [add_retrain, add_demo]
