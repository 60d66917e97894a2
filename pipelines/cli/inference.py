"""Inference on splits and folders: `evaluate` and `predict`, with their shared inference options."""

from __future__ import annotations

import argparse

from pipelines.cli.common import write_json
from pipelines.errors import UserError


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
    p.add_argument(
        "--instance",
        metavar="PROPOSALS",
        help="DeconvNet instance-wise inference on the object proposals in this JSON file "
        "({image_id: [[x1, y1, x2, y2], ...]}, best first, e.g. EdgeBoxes'); other members see the whole image",
    )
    p.add_argument(
        "--top-k", type=int, default=50, help="proposals used per image with --instance (default: 50)"
    )


def _add_num_gpus(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num-gpus",
        type=float,
        metavar="N",
        help="GPUs per model actor, a fraction such as 0.25 shares one; 0 runs on CPUs "
        "(default: 1 when the Ray cluster has GPUs, else 0)",
    )


def _inference_settings(args: argparse.Namespace):
    from pipelines.inference.core import InferenceSettings

    try:
        scales = tuple(float(s) for s in args.tta.split(",")) if args.tta else (1.0,)
    except ValueError:
        raise UserError(
            f"--tta expects comma-separated numbers such as 0.75,1,1.25, got {args.tta!r}"
        ) from None
    proposals = None
    if args.instance:
        from pipelines.inference.proposals import load_proposals

        if args.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {args.top_k}")
        proposals = load_proposals(args.instance)
    return InferenceSettings(
        scales=scales,
        flip=args.flip,
        slide=tuple(args.slide) if args.slide else None,
        crf=args.crf,
        proposals=proposals,
        top_k=args.top_k,
    )


def add_evaluate(sub: argparse._SubParsersAction) -> None:
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
    _add_num_gpus(p)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument(
        "--json-out", help="write {metrics: {miou, pixel_acc, mean_acc, fwiou, per_class_iou}} here"
    )
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from pipelines.inference.evaluate import EvalConfig, evaluate, print_evaluation

    result = evaluate(
        EvalConfig(
            model_uri=args.model_uri,
            data=args.data,
            split=args.split,
            settings=_inference_settings(args),
            tracking_uri=args.tracking_uri or "",
            max_images=args.max_images,
            num_gpus=args.num_gpus,
        )
    )
    print_evaluation(result)
    write_json(args.json_out, {k: v for k, v in result.items() if k != "confusion"})


# ---------------------------------------------------------------------------------------------- predict
def add_predict(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images per model call, fewer where they would pass 4 Mpx in one forward (default: 4)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="model actors (default: as many as the cluster holds: per GPU, or per CPU but one)",
    )
    _add_num_gpus(p)
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
    from pipelines.inference.predict import PredictConfig, predict

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
    write_json(args.json_out, result)


COMMANDS = [add_evaluate, add_predict]
