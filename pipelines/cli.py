"""The `segpipe` command line: each subcommand parses its arguments and calls one stage function.

Stage modules are imported inside the `_run_*` functions so that `segpipe --help` stays instant and
nothing heavy (torch, Ray, MLflow) happens at import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.errors import UserError


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- models
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="build every architecture, run one forward pass, print params and GMACs")
    p.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"),
                   help="input size for the GMAC count (default: 512 512)")
    p.add_argument("--num-classes", type=int, default=21, help="output classes (default: 21, PASCAL VOC)")
    p.add_argument("--width", type=float, default=1.0,
                   help="channel multiplier for the VGG and U-Net families (default: 1.0, the papers' widths)")
    p.add_argument("--json-out", help="also write the table as JSON to this file")
    p.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> None:
    from pipelines.demo import model_table, print_model_table

    rows = model_table(size=tuple(args.size), num_classes=args.num_classes, width=args.width)
    print_model_table(rows, size=tuple(args.size))
    _write_json(args.json_out, {"size": list(args.size), "models": rows})


# ---------------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on generated data, on this machine")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from pipelines.demo import run_demo

    run_demo()


COMMANDS = [_add_models, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="Semantic segmentation on Ray: prepare datasets, train, tune, ensemble, register, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as err:
        print(f"segpipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
