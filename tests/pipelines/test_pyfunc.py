"""The logged `model` artifact is an MLflow pyfunc model: a fresh process loads a run's model and a registered
ensemble with `mlflow.pyfunc.load_model` and predicts both input kinds; segpipe still reads the same folder."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipelines import tracking
from pipelines.inference.core import InferenceSettings, predict_batch
from pipelines.model_uri import fetched_model
from segmodels.artifact import load_model_dir, read_spec

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["background", "disc", "square"]
PALETTE = [[0, 0, 0], [200, 30, 30], [30, 200, 30]]

# What a user would type: nothing from segpipe imported, only MLflow and the model URI.
USER_SCRIPT = textwrap.dedent(
    """
    import io, json, sys
    import numpy as np, pandas as pd, mlflow
    from PIL import Image

    images = np.load(sys.argv[1])["images"]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    out = {}
    for uri in sys.argv[3:]:
        model = mlflow.pyfunc.load_model(uri)
        classes = model.metadata.metadata["segpipe.classes"]
        masks = model.predict(images)
        frame = model.predict(pd.DataFrame({"image": encoded}))
        decoded = [np.asarray(Image.open(io.BytesIO(b))) for b in frame["mask"]]
        modes = [Image.open(io.BytesIO(b)).mode for b in frame["mask"]]
        out[uri] = {"dtype": str(masks.dtype), "masks": masks.tolist(), "classes": classes,
                    "decoded": [d.tolist() for d in decoded], "modes": modes}
    json.dump(out, open(sys.argv[2], "w"))
    """
)


def expected_masks(folder: Path, images: np.ndarray) -> np.ndarray:
    model = load_model_dir(folder)
    return predict_batch(model, images, InferenceSettings()).argmax(1).numpy().astype(np.uint8)


def test_fresh_process_loads_run_and_registered_ensemble(model_folder, mlflow_uri, tmp_path):
    single = model_folder(CLASSES, PALETTE, name="single")
    pair = model_folder(CLASSES, PALETTE, archs=("deeplab_largefov", "fcn8s"), name="pair", seed=5)
    client = tracking.connect(mlflow_uri)
    run_id, _ = tracking.start_or_resume_run(client, "pyfunc", "single")
    run_uri = tracking.log_model_folder(client, run_id, single)
    ensemble_run, _ = tracking.start_or_resume_run(client, "pyfunc", "ensemble")
    version = tracking.register_model_folder(client, "pyfunc-seg", pair, run_id=ensemble_run)
    tracking.set_alias(client, "pyfunc-seg", "champion", version.version)

    # The MLmodel carries the flavor, the signature (inference params) and the pip requirements.
    import mlflow

    logged = Path(
        mlflow.artifacts.download_artifacts(run_uri, dst_path=str(tmp_path), tracking_uri=mlflow_uri)
    )
    mlmodel = yaml.safe_load((logged / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert {p["name"] for p in json.loads(mlmodel["signature"]["params"])} == {"scales", "flip"}
    assert (
        mlmodel["metadata"]["segpipe.classes"] == CLASSES
        and mlmodel["metadata"]["segpipe.palette"] == PALETTE
    )
    requirements = (logged / "requirements.txt").read_text()
    assert "torch==" in requirements and "safetensors==" in requirements
    assert not list(logged.rglob("*.pkl")), "the model must not be pickled"

    # segpipe's own readers get the plain model folder back, for runs and registered versions alike.
    with fetched_model(run_uri, mlflow_uri) as folder:
        assert read_spec(folder).name == "single"
    with fetched_model("models:/pyfunc-seg@champion", mlflow_uri) as folder:
        assert len(read_spec(folder).members) == 2
    assert not folder.exists()  # a download lasts as long as the block

    images = np.random.default_rng(0).integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": ""}
    uris = [run_uri, "models:/pyfunc-seg@champion"]
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "images.npz"), str(tmp_path / "out.json"), *uris],
        check=True,
        env=env,
        cwd=tmp_path,  # neither the repository nor its packages on the path: the model carries its code
        timeout=600,
    )
    out = json.loads((tmp_path / "out.json").read_text())
    for uri, folder in zip(uris, (single, pair), strict=True):
        want = expected_masks(folder, images)
        got = out[uri]
        assert got["dtype"] == "uint8" and got["classes"] == CLASSES  # the class names reach the user
        np.testing.assert_array_equal(np.array(got["masks"]), want)
        assert got["modes"] == ["P", "P"]
        np.testing.assert_array_equal(np.array(got["decoded"]), want)  # input-sized palette PNGs


def test_pyfunc_refuses_bad_arrays_with_a_fix(model_folder, tmp_path):
    """A float or channel-first array is refused with the expected layout named, not silently misread."""
    import mlflow
    import pandas as pd
    import pytest

    folder = model_folder(CLASSES, PALETTE)
    model = mlflow.pyfunc.load_model(str(tracking.save_pyfunc(folder, tmp_path / "pyfunc")))
    image = np.zeros((1, 3, 20, 20), np.uint8)
    with pytest.raises(ValueError, match="N,H,W,3"):
        model.predict(image)
    with pytest.raises(ValueError, match="'image' column"):
        model.predict(pd.DataFrame({"bytes": [b""]}))
    # `mlflow models serve` hands binary columns over as base64 text.
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(buffer, format="JPEG")
    frame = model.predict(pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]}))
    assert Image.open(io.BytesIO(frame["mask"][0])).size == (24, 20)
    flipped = model.predict(np.zeros((1, 20, 24, 3), np.uint8), params={"flip": True})
    assert flipped.shape == (1, 20, 24)
