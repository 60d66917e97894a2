"""Whole-pipeline jobs: `retrain` (one resumable cycle), `reproduce` (a paper's procedure) and `demo`."""

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
    p.add_argument("--data", help="prepared dataset folder or s3:// prefix (with the recipe's splits)")
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
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--experiment", default="segpipe-reproduce", help="MLflow experiment")
    p.add_argument("--storage", help="checkpoints and stage state (folder or s3://; default as train)")
    p.add_argument("--json-out", help="write the stages, the registered model and the table here")
    p.set_defaults(run=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> None:
    from pipelines.config import make_config, parse_key_values
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
    values = {
        "recipe": args.recipe,
        "data": args.data,
        "tiny": args.tiny,
        "multi_scale": args.multi_scale,
        "pretrained": args.pretrained,
        "proposals": args.proposals,
        "train_overrides": parse_key_values(args.set, option="--set"),
        "register_as": args.register_as,
        "tracking_uri": args.tracking_uri,
        "experiment": args.experiment,
        "storage": args.storage,
    }
    cfg = make_config(
        ReproduceConfig, {k: v for k, v in values.items() if v is not None}, source="reproduce options"
    )
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
        description="synth (VOC layout, or --layout folder: your own data's layout) -> prepare -> tune two "
        "architectures -> ensemble -> register and promote -> Ray Serve -> real HTTP requests, all locally.",
    )
    p.add_argument(
        "--layout",
        choices=("voc", "folder"),
        default="voc",
        help="the generated dataset: voc (PASCAL VOC layout) or folder (images/, masks/, classes.yaml)",
    )
    p.add_argument("--workdir", default="demo", help="where data, runs and overlays go (default: ./demo)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per trial (default: 6)")
    p.add_argument("--trials", type=int, default=2, help="trials per architecture (default: 2)")
    p.add_argument("--num-train", type=int, default=64, help="generated training images (default: 64)")
    p.add_argument("--num-val", type=int, default=16, help="generated val images (default: 16)")
    p.add_argument("--port", type=int, default=8000, help="serving port on 127.0.0.1 (default: 8000)")
    p.add_argument("--keep-serving", action="store_true", help="leave the endpoint up until Ctrl-C")
    p.add_argument("--json-out", help="write the demo's results here")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from pipelines.jobs.demo import DemoConfig, run_demo

    summary = run_demo(
        DemoConfig(
            workdir=args.workdir,
            epochs=args.epochs,
            trials=args.trials,
            num_train=args.num_train,
            num_val=args.num_val,
            port=args.port,
            keep_serving=args.keep_serving,
            layout=args.layout,
        )
    )
    write_json(args.json_out, summary)


COMMANDS = [add_retrain, add_reproduce, add_demo]
