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


# ---------------------------------------------------------------------------------------------- synth
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a small learnable dataset in a published layout (VOC, SBD, COCO, Cityscapes)",
        description="Write a synthetic dataset in exactly the published layout and file naming, "
        "for the demo and the tests: each class has its own colour and shape. Pass the result to "
        "`segpipe prepare --root` (layout coco serves both --dataset coco and coco_voc).",
    )
    p.add_argument("--layout", required=True, choices=["voc", "voc_aug", "coco", "cityscapes"])
    p.add_argument("--out", required=True, help="folder to create the dataset in")
    p.add_argument("--num-train", type=int, default=32, help="training images (default: 32)")
    p.add_argument("--num-val", type=int, default=16, help="validation images (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="fixed image size (default: 96x128 to 120x160, varying; Cityscapes 96x192)",
    )
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> None:
    from pipelines.synth import SynthConfig, synthesize

    cfg = SynthConfig(
        layout=args.layout,
        out=args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        size=tuple(args.size) if args.size else None,
    )
    print(
        f"wrote {args.num_train} train + {args.num_val} val images ({args.layout} layout) to {synthesize(cfg)}"
    )


# ---------------------------------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="validate a published dataset and write parquet shards + manifest (Ray Data)",
        description="Read a dataset as published (local folder or s3://bucket/prefix), decode and "
        "validate every sample, convert its labels to class masks and write DST/{split}/*.parquet, "
        "DST/quarantine.jsonl and DST/manifest.json (last). S3 uses AWS_ENDPOINT_URL and the "
        "standard AWS credential variables.",
    )
    p.add_argument("--dataset", required=True, choices=["voc", "voc_aug", "coco", "coco_voc", "cityscapes"])
    p.add_argument("--root", required=True, help="the dataset as published: folder or s3://bucket/prefix")
    p.add_argument(
        "--out", required=True, help="where to write the prepared dataset: folder or s3://bucket/prefix"
    )
    p.add_argument("--splits", default="", help="comma-separated splits (default: train,val)")
    p.add_argument(
        "--max-side", type=int, help="downscale so the longer side is at most this (default: keep sizes)"
    )
    p.add_argument(
        "--shard-mb", type=float, default=128.0, help="target parquet shard size in MB (default: 128)"
    )
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="fail, publishing nothing, if more samples than this are quarantined (default: 0.01)",
    )
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    p.add_argument("--json-out", help="also write the summary as JSON to this file")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    from pipelines.prepare import PrepareConfig, TooManyBadSamples, format_summary, prepare

    cfg = PrepareConfig(
        dataset=args.dataset,
        root=args.root,
        out=args.out,
        splits=tuple(s for s in args.splits.split(",") if s),
        max_side=args.max_side,
        shard_mb=args.shard_mb,
        max_bad_fraction=args.max_bad_fraction,
        progress=not args.no_progress,
    )
    try:
        result = prepare(cfg)
    except TooManyBadSamples as err:
        print(format_summary(err.result))
        _write_json(args.json_out, err.result.to_dict())
        raise
    print(format_summary(result))
    _write_json(args.json_out, result.to_dict())


# ---------------------------------------------------------------------------------------------- models
def _add_models(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--json-out", help="also write the table as JSON to this file")
    p.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> None:
    from pipelines.demo import model_table, print_model_table

    rows = model_table(size=tuple(args.size), num_classes=args.num_classes, width=args.width)
    print_model_table(rows, size=tuple(args.size))
    _write_json(args.json_out, {"size": list(args.size), "models": rows})


# ---------------------------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--data", help="prepared dataset folder or s3:// prefix")
    p.add_argument("--config", help="recipe YAML, e.g. pipelines/configs/deeplab_largefov_voc.yaml")
    p.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="keyword argument for build_model, repeatable (e.g. width=0.25, backbone=resnet18)",
    )
    p.add_argument(
        "--pretrained", help="local torchvision ImageNet state dict (.safetensors or .pth) for the backbone"
    )
    p.add_argument(
        "--init-from",
        metavar="URI",
        help="model folder, runs:/RUN_ID/model or models:/NAME/VERSION|@ALIAS: copy its tensors that match "
        "by name and shape before training (e.g. fcn16s from a trained fcn32s); not applied on resume",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per worker per step")
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
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--experiment", help="MLflow experiment name (default: segpipe)")
    p.add_argument("--run-name", help="MLflow and Ray run name; reuse it with the same --storage to resume")
    p.add_argument(
        "--storage",
        help="checkpoint storage folder or s3:// prefix (default: $SEGPIPE_STORAGE, "
        "$RAY_STORAGE, ~/ray_results inside a Ray job, else ./ray_results); shared storage on several nodes",
    )
    p.add_argument("--json-out", help="write {run_id, model_uri, checkpoint, metrics} to this file")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from pipelines.config import load_train_config, parse_key_values
    from pipelines.train import train

    cfg = load_train_config(
        args.config,
        model=args.model,
        data=args.data,
        pretrained=args.pretrained,
        init_from=args.init_from,
        epochs=args.epochs,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.use_gpu,
        amp=args.amp,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        run_name=args.run_name,
        storage=args.storage,
        model_args=parse_key_values(args.model_arg, option="--model-arg") or None,
    )
    result = train(cfg)
    print(json.dumps(result.to_json()["metrics"], indent=2))
    print(f"model: {result.model_uri}")
    _write_json(args.json_out, result.to_json())


# ---------------------------------------------------------------------------------------------- tune
def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="Ray Tune search per architecture with ASHA early stopping",
        description="Search each architecture's space from a YAML file (see pipelines/tune.py "
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
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--json-out", help="write the best trial and model URI per architecture here")
    p.set_defaults(run=_run_tune)


def _run_tune(args: argparse.Namespace) -> None:
    from pipelines.report import format_table
    from pipelines.tune import load_search, tune_search

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
    _write_json(args.json_out, summary)


# ---------------------------------------------------------------------------------------------- evaluate
def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta", metavar="SCALES", help="comma-separated test scales, e.g. 0.75,1,1.25 (default: 1)"
    )
    p.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    p.add_argument(
        "--slide",
        type=int,
        nargs=2,
        metavar=("CROP", "STRIDE"),
        help="sliding-window inference with CROP-sized windows every STRIDE pixels",
    )
    p.add_argument("--crf", action="store_true", help="dense CRF post-processing (DeepLab's mean field)")


def _inference_settings(args: argparse.Namespace):
    from pipelines.evaluate import InferenceSettings

    try:
        scales = tuple(float(s) for s in args.tta.split(",")) if args.tta else (1.0,)
    except ValueError:
        raise UserError(
            f"--tta expects comma-separated numbers such as 0.75,1,1.25, got {args.tta!r}"
        ) from None
    return InferenceSettings(
        scales=scales, flip=args.flip, slide=tuple(args.slide) if args.slide else None, crf=args.crf
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a model on a prepared split (whole, sliding, TTA, CRF)")
    p.add_argument(
        "--model-uri",
        required=True,
        help="runs:/RUN_ID/model, models:/NAME/VERSION, models:/NAME@ALIAS or a local model folder",
    )
    p.add_argument("--data", required=True, help="prepared dataset folder or s3:// prefix")
    p.add_argument("--split", default="val", help="split to score (default: val)")
    _add_inference_options(p)
    p.add_argument("--max-images", type=int, default=0, help="score only the first N images (default: all)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument(
        "--json-out", help="write {metrics: {miou, pixel_acc, mean_acc, fwiou, per_class_iou}} here"
    )
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from pipelines.evaluate import EvalConfig, evaluate, print_evaluation

    result = evaluate(
        EvalConfig(
            model_uri=args.model_uri,
            data=args.data,
            split=args.split,
            settings=_inference_settings(args),
            tracking_uri=args.tracking_uri or "",
            max_images=args.max_images,
        )
    )
    print_evaluation(result)
    _write_json(args.json_out, {k: v for k, v in result.items() if k != "confusion"})


# ---------------------------------------------------------------------------------------------- predict
def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment a folder, s3:// prefix or prepared split and write masks (Ray Data, resumable)",
        description="Batch inference with Ray Data: read -> decode -> model (actor pool) -> CRF -> write. "
        "Unreadable or oversized inputs are listed in OUT/quarantine.jsonl; a re-run skips inputs whose "
        "output exists. Formats: png (palette masks named after the inputs), overlay, parquet (image_id, "
        "mask, height, width), voc (the VOC evaluation server's results/ layout), cityscapes (label ids, "
        "as cityscapesScripts evaluates them).",
    )
    p.add_argument(
        "--model-uri",
        required=True,
        help="runs:/RUN_ID/model, models:/NAME/VERSION, models:/NAME@ALIAS or a local model folder",
    )
    p.add_argument(
        "--input", required=True, help="image folder or s3:// prefix (recursive), or PREPARED:SPLIT"
    )
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--format", default="png", choices=["png", "overlay", "parquet", "voc", "cityscapes"])
    _add_inference_options(p)
    p.add_argument("--batch-size", type=int, default=4, help="images per model call (default: 4)")
    p.add_argument(
        "--concurrency", type=int, default=0, help="model actors (default: one per GPU, or per CPU but one)"
    )
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model actor (default: 0, CPU)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=50_000_000,
        help="quarantine larger images instead of decoding them (default: 50000000)",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--json-out", help="write {written, skipped, quarantined, seconds, images_per_s} here")
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> None:
    from pipelines.predict import PredictConfig, predict

    result = predict(
        PredictConfig(
            model_uri=args.model_uri,
            input=args.input,
            out=args.out,
            format=args.format,
            settings=_inference_settings(args),
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            num_gpus=args.num_gpus,
            max_pixels=args.max_pixels,
            tracking_uri=args.tracking_uri or "",
        )
    )
    print(
        f"wrote {result['written']} predictions ({result['format']}) to {result['out']} in "
        f"{result['seconds']:.1f} s ({result['images_per_s']:.2f} img/s); skipped {result['skipped']} "
        f"already done; quarantined {result['quarantined']} (see {result['quarantine']})"
    )
    _write_json(args.json_out, result)


# ---------------------------------------------------------------------------------------------- ensemble
def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="greedy ensemble selection on val mIoU, registered as 'challenger'")
    p.add_argument(
        "--candidates",
        nargs="+",
        required=True,
        help="model URIs, or best-per-arch:EXPERIMENT for the best finished run of each architecture",
    )
    p.add_argument("--data", required=True, help="prepared dataset folder or s3:// prefix")
    p.add_argument("--split", default="val", help="selection split (default: val)")
    p.add_argument(
        "--register-as", help="register the result as a new version of this model, alias challenger"
    )
    p.add_argument(
        "--crf", action="store_true", help="add a dense CRF stage with parameters tuned on the split"
    )
    p.add_argument("--max-members", type=int, default=5, help="selection rounds (default: 5)")
    p.add_argument("--max-images", type=int, default=0, help="select on the first N images (default: all)")
    p.add_argument(
        "--crf-images", type=int, default=0, help="tune the CRF on the first N images (default: all)"
    )
    p.add_argument(
        "--stride",
        type=int,
        default=8,
        help="compare every Nth pixel, the networks' output stride (default: 8)",
    )
    p.add_argument(
        "--scratch",
        help="folder or s3:// prefix for the scored shards, reachable from every node (default: local temp)",
    )
    p.add_argument("--experiment", default="segpipe", help="MLflow experiment for the ensemble run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--json-out", help="write {model_uri, members, weights, metrics} here")
    p.set_defaults(run=_run_ensemble)


def _run_ensemble(args: argparse.Namespace) -> None:
    from pipelines.ensemble import EnsembleConfig, build_ensemble

    result = build_ensemble(
        EnsembleConfig(
            candidates=tuple(args.candidates),
            data=args.data,
            split=args.split,
            register_as=args.register_as or "",
            crf=args.crf,
            max_members=args.max_members,
            max_images=args.max_images,
            crf_images=args.crf_images,
            stride=args.stride,
            scratch=args.scratch or "",
            experiment=args.experiment,
            tracking_uri=args.tracking_uri or "",
        )
    )
    for m in result["members"]:
        print(f"member {m['uri']}: weight {m['weight']:.3f}, alone {m['val_miou']:.4f}")
    print(f"ensemble mIoU {result['metrics']['miou']:.4f}  crf {result['crf']}  -> {result['model_uri']}")
    _write_json(args.json_out, result)


# ---------------------------------------------------------------------------------------------- promote
def _add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote", help="move alias 'champion' to 'challenger' only if it wins on the frozen split"
    )
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--data", required=True, help="prepared dataset folder or s3:// prefix (the frozen split)")
    p.add_argument("--split", default="val", help="split to compare on (default: val)")
    p.add_argument("--margin", type=float, default=0.0, help="mIoU the challenger must win by (default: 0)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--json-out", help="write the decision and both scores here")
    p.set_defaults(run=_run_promote)


def _run_promote(args: argparse.Namespace) -> None:
    from pipelines.promote import PromoteConfig, promote

    result = promote(
        PromoteConfig(
            name=args.name,
            data=args.data,
            margin=args.margin,
            split=args.split,
            tracking_uri=args.tracking_uri or "",
        )
    )
    print(result["reason"])
    print(f"champion: models:/{args.name}/{result['champion_version']}")
    _write_json(args.json_out, result)


# ---------------------------------------------------------------------------------------------- retrain
def _add_retrain(sub: argparse._SubParsersAction) -> None:
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
    _write_json(args.json_out, result)


# ---------------------------------------------------------------------------------------------- serve
def _add_serve(sub: argparse._SubParsersAction) -> None:
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


# ---------------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
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
    _write_json(args.json_out, summary)


# ---------------------------------------------------------------------------------------------- import-weights
def _add_import_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-weights",
        help="turn the authors' released weights (.caffemodel, PyTorch, MMSegmentation) into a model folder",
    )
    p.add_argument(
        "--arch",
        required=True,
        help="fcn32s, fcn16s, fcn8s, fcn8s_atonce, deconvnet, deeplab_largefov, dilation or pspnet",
    )
    p.add_argument("--from", dest="source", required=True, help="the release's weights file")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "caffe", "torch", "mmseg", "semseg"),
        help="source format (default: by suffix / key names)",
    )
    p.add_argument("--num-classes", type=int, default=0, help="check the file predicts N classes")
    p.add_argument(
        "--classes", default="", help="voc, cityscapes, coco or a file of class names (default: by count)"
    )
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument(
        "--register-as", default="", help="also register the folder as a new version of this model"
    )
    p.add_argument("--experiment", default="segpipe", help="MLflow experiment for the import run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--json-out", help="write the import summary here")
    p.set_defaults(run=_run_import_weights)


def _run_import_weights(args: argparse.Namespace) -> None:
    from pipelines.import_weights import ImportConfig, import_weights

    result = import_weights(
        ImportConfig(
            arch=args.arch,
            source=args.source,
            out=args.out,
            format=args.format,
            num_classes=args.num_classes,
            classes=args.classes,
            register_as=args.register_as,
            experiment=args.experiment,
            tracking_uri=args.tracking_uri or "",
        )
    )
    print(
        f"imported {result['tensors']} tensors ({result['format']}) -> {result['out']}: "
        f"{result['segpipe_arch']} {result['model_args']}, {result['num_classes']} classes"
        + (f", registered {result['model_uri']}" if result["model_uri"] else "")
    )
    _write_json(args.json_out, result)


COMMANDS = [
    _add_synth,
    _add_prepare,
    _add_models,
    _add_train,
    _add_tune,
    _add_evaluate,
    _add_predict,
    _add_ensemble,
    _add_promote,
    _add_retrain,
    _add_serve,
    _add_demo,
    _add_import_weights,
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
