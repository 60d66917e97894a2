"""Selection stage: `ensemble` (greedy selection, registered as challenger) and `promote`."""

from __future__ import annotations

import argparse

from pipelines.cli.common import write_json


# ---------------------------------------------------------------------------------------------- ensemble
def add_ensemble(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--select",
        choices=["greedy", "average"],
        default="greedy",
        help="greedy selection (default) or the plain average of every candidate (EDeconvNet)",
    )
    p.add_argument("--max-images", type=int, default=0, help="select on the first N images (default: all)")
    p.add_argument(
        "--crf-images",
        type=int,
        help="tune the CRF on the first N images, 0 = all (default: 100, DeepLab's protocol)",
    )
    p.add_argument(
        "--crf-grid",
        choices=["deeplab", "small"],
        help="the CRF search space: deeplab, the paper's 48 + 6 settings (default), or small, 12 + 6",
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
    from pipelines.select.ensemble import EnsembleConfig, build_ensemble

    result = build_ensemble(
        EnsembleConfig(
            candidates=tuple(args.candidates),
            data=args.data,
            split=args.split,
            register_as=args.register_as or "",
            crf=args.crf,
            max_members=args.max_members,
            select=args.select,
            max_images=args.max_images,
            stride=args.stride,
            scratch=args.scratch or "",
            experiment=args.experiment,
            tracking_uri=args.tracking_uri or "",
            **({} if args.crf_images is None else {"crf_images": args.crf_images}),
            **({} if args.crf_grid is None else {"crf_grid": args.crf_grid}),
        )
    )
    for m in result["members"]:
        print(f"member {m['uri']}: weight {m['weight']:.3f}, alone {m['val_miou']:.4f}")
    print(f"ensemble mIoU {result['metrics']['miou']:.4f}  crf {result['crf']}  -> {result['model_uri']}")
    write_json(args.json_out, result)


# ---------------------------------------------------------------------------------------------- promote
def add_promote(sub: argparse._SubParsersAction) -> None:
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
    from pipelines.select.promote import PromoteConfig, promote

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
    write_json(args.json_out, result)


COMMANDS = [add_ensemble, add_promote]
