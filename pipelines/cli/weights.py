"""The authors' released weights: `import-weights`."""

from __future__ import annotations

import argparse

from pipelines.cli.common import write_json


# ---------------------------------------------------------------------------------------------- import-weights
def add_import_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-weights",
        help="turn the authors' released weights (.caffemodel, PyTorch, MMSegmentation) into a model folder",
    )
    p.add_argument(
        "--arch",
        required=True,
        help="fcn32s, fcn16s, fcn8s, fcn8s_atonce, deconvnet, deeplab_largefov, dilation, pspnet or unet",
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
        "--classes",
        default="",
        help="voc, cityscapes, coco, ade20k, camvid, cells, or a classes.txt / classes.yaml (default: by count)",
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
    from pipelines.weights.import_weights import ImportConfig, import_weights

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
    write_json(args.json_out, result)


COMMANDS = [add_import_weights]
