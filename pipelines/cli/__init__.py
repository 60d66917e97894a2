"""The `segpipe` command line: each subcommand parses its arguments and calls one stage function.

One module per stage of the pipeline (data, train, inference, select, serve, jobs, weights), each with an
`add_<command>` that declares a subcommand's arguments and a `_run_<command>` that calls the stage. Stage
modules are imported inside the `_run_*` functions so that `segpipe --help` stays instant and nothing
heavy (torch, Ray, MLflow) happens at import time.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import data, inference, jobs, select, serve, train, weights
from pipelines.errors import UserError

COMMANDS = [
    *data.COMMANDS,
    *train.COMMANDS,
    *inference.COMMANDS,
    *select.COMMANDS,
    *serve.COMMANDS,
    *jobs.COMMANDS,
    *weights.COMMANDS,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="Semantic segmentation on Ray: prepare datasets, train, tune, ensemble, register, serve.",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's INFO logs (by default they go to Ray's log files)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.runtime import set_verbose

    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    if argv is None and not args.verbose:  # the `segpipe` command itself, not a call from Python
        from pipelines.terminal import filter_output

        filter_output()
    try:
        args.run(args)
    except UserError as err:
        print(f"segpipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
