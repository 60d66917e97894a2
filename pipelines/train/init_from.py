"""`segpipe train --init-from URI`: start a model from another model's tensors (FCN section 4.2 staging).

The driver (`check_init_from`, called by `train.resolve`) fetches the source once, checks that some tensor
matches by name and shape, and pins the URI (local folder -> absolute path, `models:/NAME@ALIAS` -> its
version) so every worker reads the same model. Each Ray Train worker (`apply_init_from`) then copies the
matching tensors of the source's member 0 into the model it built, on a fresh start only (a resume loads
its checkpoint instead); rank 0 logs what was copied, skipped and kept to the MLflow run.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from pipelines import tracking
from pipelines.config import TrainConfig
from pipelines.errors import UserError

REPORT_ARTIFACT = "init_from.json"


@contextmanager
def source_weights_file(uri: str, tracking_uri: str):
    """Yield the safetensors file of member 0 of the model at `uri`; a downloaded copy is removed after."""
    from segmodels.artifact import read_spec

    folder = tracking.download_model(uri, tracking_uri)
    downloaded = folder != Path(uri).expanduser()
    try:
        spec = read_spec(folder)
        yield folder / spec.members[0].weights
    finally:
        if downloaded:
            shutil.rmtree(folder, ignore_errors=True)


def pin_uri(uri: str, tracking_uri: str) -> str:
    """The same model, named so that it cannot move before the workers read it."""
    if uri.startswith("models:/") and "@" in uri:
        version = tracking.model_version(tracking.connect(tracking_uri), uri)
        return f"models:/{version.name}/{version.version}"
    if "://" not in uri and not uri.startswith(("runs:", "models:")):
        return str(Path(uri).expanduser().resolve())  # workers do not share the driver's directory
    return uri


def check_init_from(cfg: TrainConfig, num_classes: int, tracking_uri: str) -> str:
    """Driver check: the source exists and shares at least one tensor with `cfg.model`; returns the pinned URI."""
    import torch
    from safetensors import safe_open

    from segmodels import build_model
    from segmodels.weights import match_tensors

    uri = pin_uri(cfg.init_from, tracking_uri)
    with torch.device("meta"):
        target = {
            k: v.shape for k, v in build_model(cfg.model, num_classes, **cfg.model_args).state_dict().items()
        }
    with source_weights_file(uri, tracking_uri) as weights, safe_open(str(weights), "pt") as f:
        source = {k: f.get_slice(k).get_shape() for k in f.keys()}  # shapes only: no tensor is read
    report = match_tensors(target, source)
    if not report.copied:
        raise UserError(
            f"--init-from {cfg.init_from}: no tensor of that model matches {cfg.model} "
            f"({num_classes} classes, model args {cfg.model_args}) by name and shape "
            f"({len(report.skipped)} names match with other shapes); initialise from a model of the same "
            "family and width (e.g. fcn16s from fcn32s), or drop --init-from"
        )
    print(
        f"[segpipe] --init-from {uri}: {len(report.copied)} tensors to copy, {len(report.skipped)} skipped "
        f"(shape differs), {len(report.kept)} left at their own init"
    )
    return uri


def apply_init_from(model, uri: str, *, tracking_uri: str, run_id: str | None = None):
    """Worker side: copy the matching tensors into `model`; with `run_id` log the report to MLflow."""
    from safetensors.torch import load_file

    from segmodels.weights import copy_matching

    with source_weights_file(uri, tracking_uri) as weights:
        report = copy_matching(model, load_file(str(weights)))
    if run_id:
        client = tracking.connect(tracking_uri)
        tracking.log_params(
            client,
            run_id,
            {
                "init_from.copied": len(report.copied),
                "init_from.skipped": len(report.skipped),
                "init_from.kept": len(report.kept),
            },
        )
        client.log_dict(run_id, {"source": uri, **report.to_json()}, REPORT_ARTIFACT)
    return report
