"""The one place that talks to MLflow: tracking URI, runs, metrics, model artifacts and the registry.

Embedded default (no server): a sqlite store `mlruns/mlflow.db` with artifacts in `mlruns/artifacts`,
both under the working directory; `--tracking-uri http://...` or `MLFLOW_TRACKING_URI` selects a server.
"""

from __future__ import annotations

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


def log_model_folder(client, run_id: str, folder: Path) -> str:
    """Log a segpipe model folder to `run_id` as its `model` artifact, an MLflow pyfunc model; returns the URI."""
    with tempfile.TemporaryDirectory(prefix="segpipe-pyfunc-") as tmp:
        client.log_artifacts(run_id, str(save_pyfunc(folder, Path(tmp) / "model")), MODEL_ARTIFACT_PATH)
    return f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"


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
    client, name: str, folder: Path, *, run_id: str, description: str = "", tags: dict[str, str] | None = None
):
    """Log a model folder to `run_id` as its `model` artifact and register it as a new version of `name`."""
    log_model_folder(client, run_id, folder)
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
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    version = client.create_model_version(
        name, source=source, run_id=run_id, description=description, tags=tags or {}
    )
    return version


def alias_version(client, name: str, alias: str) -> str | None:
    """The version number an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)  # MLflow 3.x may give an int
    except MlflowException:
        return None


def set_alias(client, name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(name, alias, str(version))
