"""Import stage: an author's released weights file -> a normal segpipe model folder (optionally registered).

    segpipe import-weights --arch fcn8s --from fcn8s-heavy-pascal.caffemodel --out models/fcn8s-voc

The file is read without unpickling (protobuf for `.caffemodel`, `torch.load(weights_only=True)` for
PyTorch checkpoints) and mapped by the release's own layer names (`pipelines.weights.releases`). Every
tensor of the file must land on a model tensor of the same shape and every model tensor must be filled;
otherwise nothing is written and the error lists the offending names. The model folder records the
model options the file implies (fixed upsampling, at-once skip scaling, deep-stem trunk) and the
release's input convention, so evaluate / predict / serve / ensemble use it like a trained model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import UserError

FORMATS = ("auto", "caffe", "torch", "mmseg", "semseg")
CLASS_SETS = ("voc", "cityscapes", "coco", "ade20k", "camvid", "cells")
DEFAULT_CLASSES = {21: "voc", 19: "cityscapes", 81: "coco", 150: "ade20k", 11: "camvid", 2: "cells"}
BINARY_SETS = {"cells": ["background", "cell"]}  # U-Net's ISBI cell-tracking releases
FINAL_LAYER = {  # the classifier whose output count is the number of classes
    "fcn32s": "score_fr.weight",
    "fcn16s": "score_fr.weight",
    "fcn8s": "score_fr.weight",
    "deeplab_largefov": "fc8.weight",
    "dilation": "final.weight",
    "deconvnet": "score.weight",
    "pspnet": "classifier.2.weight",
    "unet": "final.weight",
}
SHOW = 20  # names listed per kind of problem


@dataclass(frozen=True)
class ImportConfig:
    """`segpipe import-weights` options."""

    arch: str
    source: str
    out: str
    format: str = "auto"
    num_classes: int = 0  # 0: from the file's classifier
    classes: str = ""  # voc | cityscapes | coco | a text file with one class name per line; "": by count
    register_as: str = ""
    experiment: str = "segpipe"
    tracking_uri: str = ""


def read_source(path: Path, fmt: str) -> tuple[str, dict[str, Any]]:
    """(format, {name: tensor}) of a weights file; Caffe blobs become `layer.weight`, `layer.bias`, ..."""
    import torch

    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; download the release file first (README)")
    if fmt == "caffe" or (fmt == "auto" and path.suffix == ".caffemodel"):
        from pipelines.weights.caffe import read_caffemodel

        tensors = {}
        for layer, blobs in read_caffemodel(path).items():
            for i, blob in enumerate(blobs):
                tensors[f"{layer}.{('weight', 'bias')[i] if i < 2 else f'blob{i}'}"] = blob
        return "caffe", tensors
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable or unsafe file gets the same advice
        raise UserError(
            f"{path} is not a PyTorch checkpoint loadable with weights_only=True ({type(err).__name__}: "
            f"{str(err)[:200]}); pass the release's .pth state dict or a .caffemodel with --format caffe"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # MMSegmentation and hszhao/semseg checkpoints wrap the weights
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} holds no state dict (name -> tensor)")
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise UserError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:SHOW])}")
    if fmt == "auto":
        fmt = detect_format(state)
    return fmt, state


def detect_format(state: dict[str, Any]) -> str:
    keys = list(state)
    if any(k.startswith(("decode_head.", "backbone.stem.")) for k in keys):
        return "mmseg"
    if any(k.startswith(("module.layer0.", "layer0.", "module.ppm.", "ppm.features.")) for k in keys):
        return "semseg"
    if "conv1_1.weight" in state:
        return "torch"
    raise UserError(
        f"cannot tell the source of this state dict (first keys: {', '.join(keys[:5])}); pass --format "
        "torch (FCN PyTorch port), semseg (hszhao/semseg) or mmseg (MMSegmentation)"
    )


def class_set(choice: str, num_classes: int) -> tuple[list[str], list[list[int]]]:
    """Class names and palette for `--classes` (a known set or a file), checked against the file's count."""
    from pipelines.data.layouts import get_layout
    from pipelines.data.layouts.folder import parse_class_file
    from pipelines.data.layouts.voc import voc_colormap

    choice = choice or DEFAULT_CLASSES.get(num_classes, "")
    if not choice:
        raise UserError(
            f"the file predicts {num_classes} classes: pass --classes {'|'.join(CLASS_SETS)} or a classes file "
            "with one class name per line"
        )
    if choice in BINARY_SETS:
        classes = BINARY_SETS[choice]
        palette = [list(c) for c in voc_colormap(len(classes))]
    elif choice in CLASS_SETS:
        layout = get_layout(choice)
        classes, palette = list(layout.classes), [list(c) for c in layout.palette]
    else:
        if not Path(choice).is_file():
            raise UserError(f"--classes {choice}: not one of {', '.join(CLASS_SETS)} nor an existing file")
        class_list = parse_class_file(choice)  # classes.txt or classes.yaml, as `prepare --dataset folder`
        classes, palette = list(class_list.names), [list(c) for c in class_list.palette]
    if len(classes) != num_classes:
        raise UserError(
            f"--classes {choice} has {len(classes)} classes but the file predicts {num_classes}; "
            "pass the class list the model was trained on"
        )
    return classes, palette


def _problems(converted, source: dict[str, Any], target: dict[str, Any], arch: str) -> list[str]:
    """Everything that keeps the file from loading exactly, one line per kind (names listed)."""

    def listed(what: str, names: list[str]) -> str:
        more = f" (+{len(names) - SHOW} more)" if len(names) > SHOW else ""
        return f"{len(names)} {what}: {', '.join(names[:SHOW])}{more}"

    lines = []
    unused = sorted(set(source) - converted.used)
    if unused:
        lines.append(listed(f"file tensors {arch} has no place for", unused))
    extra = sorted(k for k in converted.state if k not in target)
    if extra:
        lines.append(listed(f"mapped tensors {arch} lacks", extra))
    wrong = [
        f"{k} {tuple(converted.state[k].shape)} vs {tuple(target[k].shape)}"
        for k in converted.state
        if k in target and converted.state[k].shape != target[k].shape
    ]
    if wrong:
        lines.append(listed("tensors of the wrong shape (file vs model)", wrong))
    missing = [k for k in target if k not in converted.state and not k.endswith("num_batches_tracked")]
    if missing:
        lines.append(listed(f"{arch} tensors the file does not provide", missing))
    return lines


def import_weights(cfg: ImportConfig) -> dict[str, Any]:
    """Map, check, and write the model folder `cfg.out` (and register it); returns a summary."""
    import segmodels
    from pipelines.weights.releases import IMPORT_ARCHS, MAPPERS
    from segmodels.artifact import MemberSpec, ModelSpec, save_model_dir

    if cfg.arch not in IMPORT_ARCHS:
        raise UserError(f"--arch {cfg.arch}: released weights can be imported for {', '.join(IMPORT_ARCHS)}")
    if cfg.format not in FORMATS:
        raise UserError(f"--format {cfg.format}: choose one of {', '.join(FORMATS)}")
    path = Path(cfg.source)
    fmt, source = read_source(path, cfg.format)
    mapper = MAPPERS.get((fmt, cfg.arch))
    if mapper is None:
        pairs = ", ".join(sorted(f"{a} from {f}" for f, a in MAPPERS))
        raise UserError(f"no {fmt} release of {cfg.arch} is known; importable: {pairs}")
    converted = mapper(source, cfg.arch)
    final = converted.state.get(FINAL_LAYER[converted.arch])
    if final is None:
        raise UserError(
            f"{path} has no classifier layer for {cfg.arch}: "
            + "; ".join(_problems(converted, source, {FINAL_LAYER[converted.arch]: None}, cfg.arch))
        )
    num_classes = final.shape[0]
    if cfg.num_classes and cfg.num_classes != num_classes:
        raise UserError(f"--num-classes {cfg.num_classes} but {path} predicts {num_classes} classes")
    try:
        model = segmodels.build_model(converted.arch, num_classes, **converted.model_args)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path} implies a {converted.arch} segpipe cannot build: {err}") from None
    target = model.state_dict()
    problems = _problems(converted, source, target, cfg.arch)
    if problems:
        raise UserError(
            f"{path} does not fit {cfg.arch} ({fmt}); nothing written:\n  " + "\n  ".join(problems)
        )
    state = {k: converted.state.get(k, v) for k, v in target.items()}  # num_batches_tracked if absent
    model.load_state_dict(state, strict=True)
    classes, palette = class_set(cfg.classes, num_classes)
    record = {"file": str(path.resolve()), "format": fmt, "arch": cfg.arch}
    member = MemberSpec(
        arch=converted.arch,
        num_classes=num_classes,
        weights="member0.safetensors",
        model_args=converted.model_args,
        config={"import": record},
        source=str(path.resolve()),
        input=converted.convention,
    )
    spec = ModelSpec.single(cfg.register_as or path.stem, member, classes, palette)
    out = save_model_dir(cfg.out, spec, [model.state_dict()])
    summary = {
        "out": str(out),
        **record,
        "segpipe_arch": converted.arch,
        "model_args": converted.model_args,
        "num_classes": num_classes,
        "input": asdict(converted.convention),
        "tensors": len(source),
        "model_uri": "",
    }
    if cfg.register_as:
        summary["model_uri"] = register(cfg, out, record)
    return summary


def register(cfg: ImportConfig, folder: Path, record: dict[str, str]) -> str:
    """Register the written folder as a new version of `cfg.register_as`; returns its models:/ URI."""
    from pipelines import tracking

    client = tracking.connect(cfg.tracking_uri)
    run_id, _ = tracking.start_or_resume_run(
        client, cfg.experiment, "", tags={"segpipe.stage": "import-weights"}
    )
    tracking.log_params(client, run_id, record)
    version = tracking.register_model_folder(
        client,
        cfg.register_as,
        folder,
        run_id=run_id,
        description=f"imported from {Path(record['file']).name} ({record['format']})",
        tags={"imported_from": Path(record["file"]).name},
    )
    client.set_terminated(run_id, status="FINISHED")
    return f"models:/{cfg.register_as}/{version.version}"
