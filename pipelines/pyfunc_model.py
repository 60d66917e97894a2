"""MLflow pyfunc model code (models-from-code): a segpipe model folder behind `mlflow.pyfunc.load_model`.

MLflow runs this file when the model is loaded (`tracking.log_model_folder` logs it); the model folder
(`model.json` + safetensors) is the pyfunc's `model` artifact, so nothing is ever unpickled. Never
imported by segpipe itself: `set_model` at the bottom is how MLflow finds the model object.

Inputs and outputs:
- uint8 array N,H,W,3 (RGB) -> uint8 array N,H,W of class indices;
- DataFrame with an `image` column of encoded JPEG/PNG bytes (or their base64 text, as `mlflow models
  serve` hands JSON over) -> DataFrame with a `mask` column of palette PNG bytes, each the size of its image.
Params (optional): `scales` (test scales, default [1.0]) and `flip` (average with the mirrored image).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

CHUNK = 8  # images per forward pass, so a large array does not become one huge batch


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """The model folder's ensemble with whole-image inference (the `segpipe evaluate` default)."""

    # No type-hint validation: no hint can say "array or DataFrame" without rejecting one of the two (the
    # module docstring gives the contract, the logged signature the DataFrame form).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        from segmodels.artifact import load_model_dir

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model_dir(context.artifacts["model"], device=device)

    def _masks(self, images: np.ndarray, settings) -> np.ndarray:
        """uint8 N,H,W,3 of one size -> uint8 N,H,W class indices."""
        import torch

        from pipelines.inference.core import predict_batch

        out = [
            predict_batch(self.model, images[i : i + CHUNK], settings).argmax(1).to(torch.uint8)
            for i in range(0, len(images), CHUNK)
        ]
        return torch.cat(out).cpu().numpy()

    def predict(self, context, model_input, params=None):
        from pipelines.inference.core import InferenceSettings

        params = params or {}
        settings = InferenceSettings(
            scales=tuple(float(s) for s in params.get("scales", [1.0])), flip=bool(params.get("flip", False))
        )
        if isinstance(model_input, pd.DataFrame):
            return self._predict_encoded(model_input, settings)
        images = np.asarray(model_input)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 RGB images N,H,W,3, got dtype {images.dtype} shape {images.shape}: stack "
                "same-size images with np.stack, or pass a DataFrame with an `image` column of JPEG/PNG bytes"
            )
        return self._masks(images, settings)

    def _predict_encoded(self, frame: pd.DataFrame, settings) -> pd.DataFrame:
        import base64

        from pipelines.data.dataset import IMAGE, MASK
        from pipelines.images import decode_image
        from pipelines.report import palette_png

        if IMAGE not in frame.columns:
            raise ValueError(
                f"the DataFrame has columns {list(frame.columns)} but no {IMAGE!r} column: put each "
                "image's encoded JPEG/PNG bytes in a column named 'image'"
            )
        masks = []
        for data in frame[IMAGE]:
            image = decode_image(base64.b64decode(data) if isinstance(data, str) else bytes(data))
            masks.append(palette_png(self._masks(image[None], settings)[0], self.model.spec.palette))
        return pd.DataFrame({MASK: masks}, index=frame.index)


mlflow.models.set_model(SegmentationModel())
