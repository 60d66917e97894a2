"""Selection stage: `ensemble` (greedy selection, registered as challenger) and `promote`."""

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


# ---------------------------------------------------------------------------------------------- ensemble
def add_ensemble(sub: argparse._SubParsersAction) -> None:
    from pipelines.select.ensemble.stage import EnsembleConfig

    p = sub.add_parser("ensemble", help="greedy ensemble selection on val mIoU, registered as 'challenger'")
    p.add_argument(
        "--candidates",
        nargs="+",
        required=True,
        help="model URIs, or best-per-arch:EXPERIMENT for the best finished run of each architecture",
    )
    add_data(p)
    p.add_argument("--split", help=f"selection split (default: {default_of(EnsembleConfig, 'split')})")
    p.add_argument(
        "--register-as", help="register the result as a new version of this model, alias challenger"
    )
    p.add_argument(
        "--crf", action="store_true", help="add a dense CRF stage with parameters tuned on the split"
    )
    p.add_argument(
        "--max-members",
        type=int,
        help=f"selection rounds (default: {default_of(EnsembleConfig, 'max_members')})",
    )
    p.add_argument(
        "--select",
        choices=["greedy", "average"],
        help="greedy selection (default) or the plain average of every candidate (EDeconvNet)",
    )
    p.add_argument("--max-images", type=int, help="select on the first N images (default: all)")
    p.add_argument(
        "--crf-images",
        type=int,
        help="tune the CRF on the first N images, 0 = all "
        f"(default: {default_of(EnsembleConfig, 'crf_images')}, DeepLab's protocol)",
    )
    p.add_argument(
        "--crf-grid",
        choices=["deeplab", "small"],
        help="the CRF search space: deeplab, the paper's 48 + 6 settings (default), or small, 12 + 6",
    )
    p.add_argument(
        "--stride",
        type=int,
        help="compare every Nth pixel, the networks' output stride "
        f"(default: {default_of(EnsembleConfig, 'stride')})",
    )
    p.add_argument(
        "--scratch",
        help="folder or s3:// prefix for the scored shards, reachable from every node (default: local temp)",
    )
    p.add_argument(
        "--experiment",
        help=f"MLflow experiment for the ensemble run (default: {default_of(EnsembleConfig, 'experiment')})",
    )
    add_tracking_uri(p)
    add_json_out(p, "{model_uri, members, weights, metrics}")
    p.set_defaults(run=_run_ensemble)


def _run_ensemble(args: argparse.Namespace) -> None:
    from pipelines.select.ensemble import EnsembleConfig, build_ensemble

    result = build_ensemble(config_from_args(EnsembleConfig, args, candidates=tuple(args.candidates)))
    for m in result["members"]:
        print(f"member {m['uri']}: weight {m['weight']:.3f}, alone {m['val_miou']:.4f}")
    print(f"ensemble mIoU {result['metrics']['miou']:.4f}  crf {result['crf']}  -> {result['model_uri']}")
    write_json(args.json_out, result)


# ---------------------------------------------------------------------------------------------- promote
def add_promote(sub: argparse._SubParsersAction) -> None:
    from pipelines.select.promote import PromoteConfig

    p = sub.add_parser(
        "promote", help="move alias 'champion' to 'challenger' only if it wins on the frozen split"
    )
    p.add_argument("--name", required=True, help="registered model name")
    add_data(p, note=" (the frozen split)")
    p.add_argument("--split", help=f"split to compare on (default: {default_of(PromoteConfig, 'split')})")
    p.add_argument(
        "--margin",
        type=float,
        help=f"mIoU the challenger must win by (default: {default_of(PromoteConfig, 'margin')})",
    )
    add_tracking_uri(p)
    add_json_out(p, "the decision and both scores")
    p.set_defaults(run=_run_promote)


def _run_promote(args: argparse.Namespace) -> None:
    from pipelines.select.promote import PromoteConfig, promote

    result = promote(config_from_args(PromoteConfig, args))
    print(result["reason"])
    print(f"champion: models:/{args.name}/{result['champion_version']}")
    write_json(args.json_out, result)


COMMANDS = [add_ensemble, add_promote]
