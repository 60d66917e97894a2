"""Inference on splits and folders: `evaluate` and `predict`, with their shared inference options."""

from __future__ import annotations

import argparse

from pipelines.cli.common import (
    add_data,
    add_json_out,
    add_model_uri,
    add_tracking_uri,
    config_from_args,
    default_of,
    write_json,
)
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
    from pipelines.inference.evaluate import EvalConfig

    p = sub.add_parser("evaluate", help="score a model on a prepared split (whole, sliding, TTA, CRF)")
    add_model_uri(p)
    add_data(p)
    p.add_argument("--split", help=f"split to score (default: {default_of(EvalConfig, 'split')})")
    _add_inference_options(p)
    p.add_argument("--max-images", type=int, help="score only the first N images (default: all)")
    _add_num_gpus(p)
    add_tracking_uri(p)
    add_json_out(p, "{metrics: {miou, pixel_acc, mean_acc, fwiou, per_class_iou}}")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from pipelines.inference.evaluate import EvalConfig, evaluate, print_evaluation

    result = evaluate(config_from_args(EvalConfig, args, settings=_inference_settings(args)))
    print_evaluation(result)
    write_json(args.json_out, {k: v for k, v in result.items() if k != "confusion"})


# ---------------------------------------------------------------------------------------------- predict
def add_predict(sub: argparse._SubParsersAction) -> None:
    from pipelines.inference.predict import FORMATS, PredictConfig

    p = sub.add_parser(
        "predict",
        help="segment a folder, s3:// prefix or prepared split and write masks (Ray Data, resumable)",
        description="Batch inference with Ray Data: read -> decode -> model (actor pool) -> CRF -> write. "
        "Unreadable or oversized inputs are listed in OUT/quarantine.jsonl; a re-run skips inputs whose "
        "output exists; OUT/classes.json names each class index with its colour. Formats: png (palette "
        "masks named after the inputs), overlay, parquet (image_id, mask, height, width), voc (the VOC "
        "evaluation server's results/ layout), cityscapes (label ids, as cityscapesScripts evaluates them).",
    )
    add_model_uri(p)
    p.add_argument(
        "--input", required=True, help="image folder or s3:// prefix (recursive), or PREPARED:SPLIT"
    )
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--format", choices=FORMATS, help=f"(default: {default_of(PredictConfig, 'format')})")
    _add_inference_options(p)
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per model call, fewer where they would pass 4 Mpx in one forward "
        f"(default: {default_of(PredictConfig, 'batch_size')})",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        help="model actors (default: as many as the cluster holds: per GPU, or per CPU but one)",
    )
    _add_num_gpus(p)
    p.add_argument(
        "--max-pixels",
        type=int,
        help="quarantine larger images instead of decoding them "
        f"(default: {default_of(PredictConfig, 'max_pixels')})",
    )
    add_tracking_uri(p)
    add_json_out(p, "{written, skipped, quarantined, seconds, images_per_s}")
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> None:
    from pipelines.inference.predict import PredictConfig, predict

    result = predict(config_from_args(PredictConfig, args, settings=_inference_settings(args)))
    print(
        f"wrote {result['written']} predictions ({result['format']}) to {result['out']} in "
        f"{result['seconds']:.1f} s ({result['images_per_s']:.2f} img/s); skipped {result['skipped']} "
        f"already done; quarantined {result['quarantined']} (see {result['quarantine']})"
    )
    write_json(args.json_out, result)


COMMANDS = [add_evaluate, add_predict]
