"""Data stage: `synth` (generated datasets in the published layouts) and `prepare` (parquet shards)."""

from __future__ import annotations

import argparse

from pipelines.cli.common import add_json_out, config_from_args, write_json

# The names pipelines.data.layouts.DATASETS and pipelines.data.synth.SYNTH_LAYOUTS define (tested equal),
# spelt out so that `segpipe --help` imports neither numpy nor Pillow.
DATASETS = ("voc", "voc_aug", "coco", "coco_voc", "cityscapes", "ade20k", "camvid", "folder")
SYNTH_LAYOUTS = ("voc", "voc_aug", "coco", "cityscapes", "ade20k", "camvid", "folder")


# ---------------------------------------------------------------------------------------------- synth
def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a small learnable dataset in a published layout (VOC, SBD, COCO, Cityscapes, ADE20K, "
        "CamVid) or as a folder of images and masks",
        description="Write a synthetic dataset in exactly the published layout and file naming, "
        "for the demo and the tests: each class has its own colour and shape. Pass the result to "
        "`segpipe prepare --root` (layout coco serves both --dataset coco and coco_voc; layout folder "
        "writes images/, masks/ and classes.yaml as `prepare --dataset folder` reads them).",
    )
    p.add_argument("--layout", required=True, choices=list(SYNTH_LAYOUTS))
    p.add_argument("--out", required=True, help="folder to create the dataset in")
    p.add_argument("--num-train", type=int, help="training images (default: 32)")
    p.add_argument("--num-val", type=int, help="validation images (default: 16)")
    p.add_argument("--seed", type=int, help="random seed: the same seed writes the same files (default: 0)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="fixed image size (default: 96x128 to 120x160, varying; Cityscapes 96x192)",
    )
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> None:
    from pipelines.data.synth import SynthConfig, synthesize

    cfg = config_from_args(SynthConfig, args, size=tuple(args.size) if args.size else None)
    print(
        f"wrote {cfg.num_train} train + {cfg.num_val} val images ({cfg.layout} layout) to {synthesize(cfg)}"
    )


# ---------------------------------------------------------------------------------------------- prepare
def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="validate a published dataset and write parquet shards + manifest (Ray Data)",
        description="Read a dataset as published (local folder or s3://bucket/prefix), decode and "
        "validate every sample, convert its labels to class masks and write DST/{split}/*.parquet, "
        "DST/quarantine.jsonl and DST/manifest.json (last). S3 uses AWS_ENDPOINT_URL and the "
        "standard AWS credential variables.",
    )
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
    p.add_argument("--root", required=True, help="the dataset as published: folder or s3://bucket/prefix")
    p.add_argument(
        "--classes",
        help="--dataset folder: the classes.txt / classes.yaml (default: the one in --root)",
    )
    p.add_argument(
        "--out", required=True, help="where to write the prepared dataset: folder or s3://bucket/prefix"
    )
    p.add_argument(
        "--splits",
        help="comma-separated splits (default: train,val; voc_aug: train_aug,val,sbd_train,seg11valid; "
        "folder: every folder under images/)",
    )
    p.add_argument(
        "--max-side", type=int, help="downscale so the longer side is at most this (default: keep sizes)"
    )
    p.add_argument("--shard-mb", type=float, help="target parquet shard size in MB (default: 128)")
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        help="fail, publishing nothing, if more samples than this are quarantined (default: 0.01)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    add_json_out(p, "the summary")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    from pipelines.data.prepare import PrepareConfig, TooManyBadSamples, format_summary, prepare

    splits = tuple(s for s in (args.splits or "").split(",") if s)
    cfg = config_from_args(PrepareConfig, args, splits=splits, progress=not args.no_progress)
    try:
        result = prepare(cfg)
    except TooManyBadSamples as err:
        print(format_summary(err.result))
        write_json(args.json_out, err.result.to_dict())
        raise
    print(format_summary(result))
    write_json(args.json_out, result.to_dict())


COMMANDS = [add_synth, add_prepare]
