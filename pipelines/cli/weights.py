"""The authors' released weights: `import-weights`."""

from __future__ import annotations

import argparse

from pipelines.cli.common import add_json_out, add_tracking_uri, config_from_args, write_json


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
        choices=("auto", "caffe", "torch", "mmseg", "semseg"),
        help="source format (default: by suffix / key names)",
    )
    p.add_argument("--num-classes", type=int, help="check the file predicts N classes")
    p.add_argument(
        "--classes",
        help="voc, cityscapes, coco, ade20k, camvid, cells, or a classes.txt / classes.yaml (default: by count)",
    )
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--register-as", help="also register the folder as a new version of this model")
    p.add_argument("--experiment", help="MLflow experiment for the import run (default: segpipe)")
    add_tracking_uri(p)
    add_json_out(p, "the import summary")
    p.set_defaults(run=_run_import_weights)


def _run_import_weights(args: argparse.Namespace) -> None:
    from pipelines.weights.import_weights import ImportConfig, import_weights

    result = import_weights(config_from_args(ImportConfig, args))
    print(
        f"imported {result['tensors']} tensors ({result['format']}) -> {result['out']}: "
        f"{result['segpipe_arch']} {result['model_args']}, {result['num_classes']} classes"
        + (f", registered {result['model_uri']}" if result["model_uri"] else "")
    )
    write_json(args.json_out, result)


COMMANDS = [add_import_weights]
