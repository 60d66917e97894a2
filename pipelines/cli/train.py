"""Training stage: `models`, `train` (Ray Train) and `tune` (Ray Tune searches)."""

from __future__ import annotations

import argparse
import json

from pipelines.cli.common import add_data, add_json_out, add_tracking_uri, given, write_json


# ---------------------------------------------------------------------------------------------- models
def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="build every architecture, run one forward pass, print params and GMACs"
    )
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(512, 512),
        metavar=("H", "W"),
        help="input size for the GMAC count (default: 512 512)",
    )
    p.add_argument("--num-classes", type=int, default=21, help="output classes (default: 21, PASCAL VOC)")
    p.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="channel multiplier for the VGG and U-Net families (default: 1.0, the papers' widths)",
    )
    add_json_out(p, "the table")
    p.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> None:
    from pipelines.jobs.demo import model_table, print_model_table

    rows = model_table(size=tuple(args.size), num_classes=args.num_classes, width=args.width)
    print_model_table(rows, size=tuple(args.size))
    write_json(args.json_out, {"size": list(args.size), "models": rows})


# ---------------------------------------------------------------------------------------------- train
def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one architecture with Ray Train on prepared shards, tracked in MLflow",
        description="Train one architecture with Ray Train (DDP) on a dataset written by "
        "`segpipe prepare`. Flags override the --config recipe (see pipelines/configs/). "
        "Re-running with the same --run-name and --storage resumes from the last checkpoint.",
    )
    p.add_argument(
        "--model", help="architecture: fcn32s fcn16s fcn8s deconvnet deeplab_largefov dilation unet pspnet"
    )
    add_data(p, required=False, note=" (or the recipe's data)")
    p.add_argument("--config", help="recipe YAML, e.g. pipelines/configs/deeplab_largefov_voc.yaml")
    p.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="keyword argument for build_model, repeatable (e.g. width=0.25, backbone=resnet18)",
    )
    p.add_argument(
        "--pretrained",
        help="backbone weights: a torchvision ImageNet state dict (.safetensors or .pth), or Caffe's "
        "VGG_ILSVRC_16_layers.caffemodel for the VGG trunks (with --input-convention caffe_bgr)",
    )
    p.add_argument(
        "--input-convention",
        choices=["imagenet", "caffe_bgr"],
        help="network input: ImageNet-normalised RGB (default) or BGR 0-255 minus Caffe's mean",
    )
    p.add_argument(
        "--init-from",
        metavar="URI",
        help="model folder, runs:/RUN_ID/model or models:/NAME/VERSION|@ALIAS: copy its tensors that match "
        "by name and shape before training (e.g. fcn16s from a trained fcn32s); not applied on resume",
    )
    p.add_argument("--epochs", type=int, help="passes over the train split (replaces the recipe's max_iters)")
    p.add_argument(
        "--max-iters", type=int, help="optimiser steps, the papers' unit (replaces the recipe's epochs)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per optimiser step over all workers; each worker runs batch / (workers x iter-size)",
    )
    p.add_argument("--iter-size", type=int, help="micro-batches accumulated per step (Caffe's iter_size)")
    p.add_argument("--crop", type=int, help="training crop size in pixels")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (one per GPU with --use-gpu)")
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs each worker holds (default 1; workers x this + 1 for Ray Data must fit the cluster)",
    )
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, NCCL")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], help="mixed precision")
    add_tracking_uri(p)
    p.add_argument("--experiment", help="MLflow experiment name (default: segpipe)")
    p.add_argument("--run-name", help="MLflow and Ray run name; reuse it with the same --storage to resume")
    p.add_argument(
        "--storage",
        help="checkpoint storage folder or s3:// prefix (default: $SEGPIPE_STORAGE, "
        "$RAY_STORAGE, ~/ray_results inside a Ray job, else ./ray_results); shared storage on several nodes",
    )
    add_json_out(p, "{run_id, model_uri, checkpoint, metrics}")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from pipelines.config import TrainConfig, load_train_config, parse_key_values
    from pipelines.train.trainer import train

    model_args = parse_key_values(args.model_arg, option="--model-arg") or None
    cfg = load_train_config(args.config, **given(args, TrainConfig), model_args=model_args)
    result = train(cfg)
    print(json.dumps(result.to_json()["metrics"], indent=2))
    print(f"model: {result.model_uri}")
    write_json(args.json_out, result.to_json())


# ---------------------------------------------------------------------------------------------- tune
def add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="Ray Tune search per architecture with ASHA early stopping",
        description="Search each architecture's space from a YAML file (see pipelines/train/tune.py "
        "for the format); every trial is a nested MLflow run. Re-running resumes the search.",
    )
    p.add_argument("--config", required=True, help="search YAML (data, architectures: {arch: {base, space}})")
    p.add_argument("--num-samples", type=int, help="trials per architecture (overrides the file)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (overrides the file)")
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs per Ray Train worker of every trial (overrides the file); leave >= 1 CPU for Ray Data",
    )
    add_tracking_uri(p, default="the file's, else $MLFLOW_TRACKING_URI or ./mlruns")
    add_json_out(p, "the best trial and model URI per architecture")
    p.set_defaults(run=_run_tune)


def _run_tune(args: argparse.Namespace) -> None:
    from pipelines.report import format_table
    from pipelines.train.tune import load_search, tune_search

    search, archs = load_search(
        args.config,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        cpus_per_worker=args.cpus_per_worker,
        tracking_uri=args.tracking_uri,
    )
    summary = tune_search(search, archs)
    rows = []
    for arch, info in summary["architectures"].items():
        for t in info["trials"]:
            best = info["best"] and info["best"]["trial_id"] == t["trial_id"]
            rows.append(
                [
                    arch,
                    t["trial_id"],
                    t["status"],
                    t["iterations"],
                    t.get(search.metric) or 0.0,
                    "*" if best else "",
                ]
            )
    print(format_table(["arch", "trial", "status", "epochs", search.metric, "best"], rows))
    for arch, info in summary["architectures"].items():
        print(f"best {arch}: {info['best']['model_uri'] if info['best'] else 'none finished'}")
    write_json(args.json_out, summary)


COMMANDS = [add_models, add_train, add_tune]
