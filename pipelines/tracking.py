"""The one place that talks to MLflow: tracking URI, runs, metrics, model artifacts and the registry.

Embedded default (no server): a sqlite store `mlruns/mlflow.db` with artifacts in `mlruns/artifacts`,
both under the working directory; `--tracking-uri http://...` or `MLFLOW_TRACKING_URI` selects a server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipelines.errors import UserError

DEFAULT_STORE_DIR = "mlruns"
MODEL_ARTIFACT_PATH = "model"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# What the pyfunc model needs at load time besides the code it carries (segmodels/, pipelines/).
PYFUNC_REQUIREMENTS = ("torch", "safetensors", "numpy", "pillow", "pandas", "mlflow")


def resolve_tracking_uri(uri: str = "") -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else the embedded sqlite store in ./mlruns (absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        if uri.startswith(
            ("http://", "https://", "sqlite:///", "file:", "databricks", "postgresql", "mysql")
        ):
            return uri
        # A bare folder: keep it as an embedded sqlite store there.
        return f"sqlite:///{Path(uri).resolve() / 'mlflow.db'}"
    return f"sqlite:///{(Path.cwd() / DEFAULT_STORE_DIR).resolve() / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts for an embedded sqlite store live beside the database; a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def connect(uri: str = ""):
    """Point the mlflow module at `uri` (tracking and registry) and return an MlflowClient."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_server(uri: str) -> None:
    """Fail early with a clear message when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as reply:
            reply.read()
    except (urllib.error.URLError, OSError) as err:
        raise UserError(
            f"MLflow tracking server {uri} does not answer ({err}); start it (`mlflow server --host 127.0.0.1`)"
            " or drop --tracking-uri to use the embedded store in ./mlruns"
        ) from None


def experiment_id(client, name: str) -> str:
    """Id of experiment `name`, created (with the embedded artifact root when local) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_root(client.tracking_uri))


def find_run(client, exp_id: str, run_name: str):
    """The most recent run called `run_name` in the experiment, or None."""
    safe = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [exp_id],
        filter_string=f"attributes.run_name = '{safe}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def start_or_resume_run(
    client,
    experiment: str,
    run_name: str,
    *,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    reuse_finished: bool = False,
) -> tuple[str, bool]:
    """(run_id, resumed): reuse an unfinished run of the same name (or a finished one if `reuse_finished`)
    so that a re-run continues it instead of starting a second run."""
    exp_id = experiment_id(client, experiment)
    if run_name:
        run = find_run(client, exp_id, run_name)
        if run is not None and (reuse_finished or run.info.status != "FINISHED"):
            client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id, True
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name or None, tags=all_tags)
    return run.info.run_id, False


def logged_steps(client, run_id: str, key: str) -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, key)}


def log_metrics_once(client, run_id: str, metrics: dict[str, float], step: int) -> bool:
    """Log `metrics` at `step` unless that step was already logged (a resumed run never logs twice)."""
    from mlflow.entities import Metric

    first = next(iter(metrics))
    if step in logged_steps(client, run_id, first):
        return False
    import time

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
    return True


def sanitize_key(name: str) -> str:
    """MLflow keys allow alphanumerics, _ - . space : / only."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name)


def log_dataset(client, run_id: str, data, context: str = "training") -> None:
    """The prepared dataset as the run's MLflow dataset input: where it is, its fingerprint, its splits."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with (
        warnings.catch_warnings()
    ):  # local paths match two equivalent source kinds: MLflow warns, then picks one
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(data.root)
    splits = {name: info.rows for name, info in data.manifest.splits.items()}
    dataset = MetaDataset(source, name=data.manifest.dataset, digest=data.fingerprint[:32])
    tags = [
        InputTag("mlflow.data.context", context),
        InputTag("segpipe.fingerprint", data.fingerprint),
        InputTag("segpipe.splits", json.dumps(splits)),
    ]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Log flat params, skipping keys already logged with the same value (params are immutable)."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    todo = [
        Param(sanitize_key(k), str(v)[:6000]) for k, v in params.items() if sanitize_key(k) not in existing
    ]
    for i in range(0, len(todo), 100):
        client.log_batch(run_id, params=todo[i : i + 100])


def segpipe_folder(path: Path) -> Path | None:
    """The segpipe model folder at `path`: the folder itself, or the `model` artifact of the MLflow pyfunc
    model there (`log_model_folder`); None when neither holds a model.json."""
    import yaml

    folder = path
    if (path / "MLmodel").is_file():
        flavor = yaml.safe_load((path / "MLmodel").read_text())["flavors"].get("python_function", {})
        folder = path / flavor.get("artifacts", {}).get("model", {}).get("path", ".")
    return folder if (folder / "model.json").is_file() else None


def download_model(model, tracking_uri: str, into: Path) -> Path:
    """Download `model` (a parsed `pipelines.model_uri.ModelUri` of a run, registry version or artifact
    location) into the empty folder `into`; returns the segpipe model folder (model.json + safetensors)
    inside it, unwrapped from the MLflow pyfunc model around it. `pipelines.model_uri.fetched_model` owns
    `into` and removes it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = connect(tracking_uri)
    source = model_version(client, model).source if model.kind == "registry" else model.uri
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into)))
    except (MlflowException, OSError) as err:
        raise UserError(f"cannot fetch model {str(model)!r} from {client.tracking_uri}: {err}") from None
    folder = segpipe_folder(path)
    if folder is None:
        raise UserError(f"{str(model)!r} holds no segpipe model (no model.json); did the run finish?")
    return folder


def pyfunc_requirements() -> list[str]:
    """The installed versions of what the pyfunc model imports (local version tags such as +cpu dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in PYFUNC_REQUIREMENTS]


def pyfunc_signature():
    """Inference options as params; inputs are left open because MLflow's schemas cannot say "a uint8
    N,H,W,3 array or a DataFrame of encoded images", and an input schema would refuse one of the two."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    return ModelSignature(
        params=ParamSchema([ParamSpec("scales", "double", [1.0], (-1,)), ParamSpec("flip", "boolean", False)])
    )


def save_pyfunc(folder: Path, dst: Path) -> Path:
    """Wrap a segpipe model folder as an MLflow pyfunc model at `dst` (models-from-code, no pickle).

    dst/MLmodel, the environment files, the code (pyfunc_model.py plus the segmodels and pipelines
    packages it imports) and dst/artifacts/<folder name> = a copy of `folder`.
    """
    import warnings
    from importlib.util import find_spec

    import mlflow

    from segmodels.artifact import read_spec

    spec = read_spec(folder)
    packages = [Path(find_spec("segmodels").origin).parent, Path(__file__).parent]
    with tempfile.TemporaryDirectory(prefix="segpipe-code-") as tmp:
        # Ship the packages' sources only; byte code is the interpreter's business.
        code = [
            str(shutil.copytree(p, Path(tmp) / p.name, ignore=shutil.ignore_patterns("__pycache__")))
            for p in packages
        ]
        with warnings.catch_warnings():
            # MLflow suggests predict() type hints and an input example, which cannot describe two input kinds.
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(dst),
                python_model=str(PYFUNC_CODE),
                artifacts={"model": str(folder)},
                code_paths=code,
                pip_requirements=pyfunc_requirements(),
                signature=pyfunc_signature(),
                metadata={
                    "segpipe.inputs": "uint8 array N,H,W,3 | DataFrame with an `image` column of bytes",
                    # What the output's class indices mean, for consumers that never open model.json.
                    "segpipe.classes": list(spec.classes),
                    "segpipe.palette": [list(c) for c in spec.palette],
                },
            )
    return dst


def log_model_folder(client, run_id: str, folder: Path, metrics: dict[str, float] | None = None) -> str:
    """Log a segpipe model folder as run `run_id`'s MLflow 3 LoggedModel named `model`: a pyfunc model
    (models-from-code, the safetensors folder as its artifact), listed in the Models tab and by
    `mlflow.search_logged_models`, with `metrics` logged to the run and linked to it. Returns the run's
    model URI (`runs:/RUN_ID/model`, which MLflow resolves to the LoggedModel)."""
    from mlflow.entities import LoggedModelOutput

    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(
        experiment_id, name=MODEL_ARTIFACT_PATH, source_run_id=run_id, model_type="segpipe"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="segpipe-pyfunc-") as tmp:
            client.log_model_artifacts(logged.model_id, str(save_pyfunc(folder, Path(tmp) / "model")))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value), model_id=logged.model_id)
    return f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"


def run_model_id(client, run_id: str) -> str | None:
    """The id of run `run_id`'s LoggedModel `model`; None for a model logged before MLflow 3's LoggedModels
    (plain artifacts under the run), which still loads and registers the old way."""
    experiment_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        [experiment_id], filter_string=f"name = '{MODEL_ARTIFACT_PATH}' AND source_run_id = '{run_id}'"
    )
    return found[0].model_id if found else None


def model_version(client, uri):
    """Resolve `models:/NAME/VERSION` or `models:/NAME@ALIAS` (a string or a parsed ModelUri) to a
    ModelVersion, with clear errors."""
    from mlflow.exceptions import MlflowException

    from pipelines.model_uri import parse

    model = parse(uri)
    if model.kind != "registry":
        raise UserError(f"model URI {str(model)!r} must be models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        if model.alias:
            return client.get_model_version_by_alias(model.name, model.alias)
        return client.get_model_version(model.name, model.version)
    except MlflowException as err:
        what = f"alias {model.alias!r}" if model.alias else f"version {model.version!r}"
        raise UserError(
            f"registered model {model.name!r} has no {what} in {client.tracking_uri}: {err.message}"
        ) from None


# ---------------------------------------------------------------------------------------------- registry
def register_model_folder(
    client,
    name: str,
    folder: Path,
    *,
    run_id: str,
    description: str = "",
    tags: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
):
    """Log a model folder as run `run_id`'s LoggedModel `model` (with `metrics` linked to it) and register
    it as a new version of `name`."""
    log_model_folder(client, run_id, folder, metrics=metrics)
    return register_run_model(client, name, run_id=run_id, description=description, tags=tags)


def register_run_model(
    client, name: str, *, run_id: str, description: str = "", tags: dict[str, str] | None = None
):
    """Register the `model` artifact already logged to `run_id` as a new version of `name`."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="segpipe segmentation models (see model.json)")
    model_id = run_model_id(client, run_id)
    if model_id:  # the version is made from the LoggedModel (MLflow 3)
        source = f"models:/{model_id}"
    else:  # a model logged as the run's plain artifacts
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    return client.create_model_version(
        name, source=source, run_id=run_id, description=description, tags=tags or {}, model_id=model_id
    )


def alias_version(client, name: str, alias: str) -> str | None:
    """The version number an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)  # MLflow 3.x may give an int
    except MlflowException:
        return None


def set_alias(client, name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(name, alias, str(version))
