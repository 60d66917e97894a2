"""Whole-pipeline jobs: `retrain` (one resumable cycle), `reproduce` (a paper's procedure) and `demo`."""

from __future__ import annotations

import argparse

from pipelines.cli.common import (
    add_data,
    add_json_out,
    add_tracking_uri,
    config_from_args,
    default_of,
    write_json,
)


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
    add_tracking_uri(p, default="the file's")
    add_json_out(p, "every step's output and the promotion decision")
    p.set_defaults(run=_run_retrain)


def _run_retrain(args: argparse.Namespace) -> None:
    from pipelines.jobs.retrain import load_retrain, retrain

    result = retrain(load_retrain(args.config, tracking_uri=args.tracking_uri))
    for step, info in result["steps"].items():
        print(f"{step:9s} {info['seconds']:8.1f} s")
    print(result["reason"])
    print(f"champion: {result['champion']} (version {result['champion_version']})")
    write_json(args.json_out, result)


# ---------------------------------------------------------------------------------------------- reproduce
def add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="a paper's training procedure as one resumable job (--list shows the recipes)",
        description="Run a paper's stages (pipelines/configs/reproduce/RECIPE.yaml) on a prepared dataset, "
        "each an MLflow child run; register the result (alias `reproduced`), score it on the paper's split "
        "with its test-time procedure and print it beside the published number for that split. "
        "Re-running continues from the first unfinished stage.",
    )
    p.add_argument("recipe", nargs="?", help="recipe name, e.g. fcn, deeplab, dilation, deconvnet")
    p.add_argument("--list", action="store_true", help="show every recipe, its stages and published numbers")
    add_data(p, required=False, note=" (with the recipe's splits)")
    p.add_argument("--tiny", action="store_true", help="narrow networks, small crops, one epoch: a smoke run")
    p.add_argument(
        "--multi-scale",
        action="store_true",
        help="score with the paper's multi-scale test as well (PSPNet: 0.5-1.75, as hszhao/semseg)",
    )
    p.add_argument("--pretrained", help="ImageNet backbone weights for the stages that start from them")
    p.add_argument("--proposals", help="object proposals JSON for instance-wise scoring (DeconvNet)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="training value for every stage, repeatable (e.g. num_workers=4, use_gpu=true)",
    )
    p.add_argument("--register-as", help="registered model name (default: reproduce-RECIPE-DATASET)")
    add_tracking_uri(p)
    p.add_argument("--experiment", help="MLflow experiment (default: segpipe-reproduce)")
    p.add_argument("--storage", help="checkpoints and stage state (folder or s3://; default as train)")
    add_json_out(p, "the stages, the registered model and the table")
    p.set_defaults(run=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> None:
    from pipelines.config import parse_key_values
    from pipelines.errors import UserError
    from pipelines.jobs.reproduce import (
        LIST_HEADERS,
        TABLE_HEADERS,
        ReproduceConfig,
        list_rows,
        reproduce,
        table_row,
    )
    from pipelines.report import format_table

    if args.list:
        print(format_table(LIST_HEADERS, list_rows()))
        return
    if not args.recipe or not args.data:
        raise UserError("give a RECIPE and --data PREPARED (segpipe reproduce --list shows the recipes)")
    cfg = config_from_args(ReproduceConfig, args, train_overrides=parse_key_values(args.set, option="--set"))
    result = reproduce(cfg)
    for stage, info in result["stages"].items():
        print(f"{stage:12s} {info['seconds']:8.1f} s  {info['output']['model_uri']}")
    table = result["table"]
    print(format_table(TABLE_HEADERS, [table_row(table)]))
    if table["note"]:
        print(f"note: {table['note']}")
    print(f"model: {result['model_uri']}")
    write_json(args.json_out, result)


# ---------------------------------------------------------------------------------------------- demo
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on generated data, on this machine",
        description="synth (your own data's layout: images/, masks/, classes.yaml; or --layout voc) -> prepare -> tune two "
        "architectures -> ensemble -> register and promote -> Ray Serve -> real HTTP requests, all locally.",
    )
    from pipelines.jobs.demo import DEMO_LAYOUTS, DemoConfig

    def default(name: str) -> str:
        return f"(default: {default_of(DemoConfig, name)})"

    p.add_argument(
        "--layout",
        choices=DEMO_LAYOUTS,
        help="the generated dataset: folder (images/, masks/, classes.yaml; 4 classes) or voc (PASCAL VOC "
        f"layout, 21 classes: far from learnt in the demo's minutes) {default('layout')}",
    )
    p.add_argument("--workdir", help=f"where data, runs and overlays go {default('workdir')}")
    p.add_argument("--epochs", type=int, help=f"epochs per trial {default('epochs')}")
    p.add_argument("--trials", type=int, help=f"trials per architecture {default('trials')}")
    p.add_argument("--num-train", type=int, help=f"generated training images {default('num_train')}")
    p.add_argument("--num-val", type=int, help=f"generated val images {default('num_val')}")
    p.add_argument("--port", type=int, help=f"serving port on 127.0.0.1 {default('port')}")
    p.add_argument("--keep-serving", action="store_true", help="leave the endpoint up until Ctrl-C")
    add_json_out(p, "the demo's results")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from pipelines.jobs.demo import DemoConfig, run_demo

    summary = run_demo(config_from_args(DemoConfig, args))
    write_json(args.json_out, summary)


COMMANDS = [add_retrain, add_reproduce, add_demo]
