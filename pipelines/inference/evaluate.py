"""Evaluation stage: whole / sliding-window / multi-scale+flip inference and optional dense CRF on a split.

Images are scored in parallel by a pool of Ray Data actors, each holding the model once, on a GPU when
the cluster has them (`--num-gpus`, `pipelines.runtime.model_actors`); the argmax and each image's
confusion counts are computed on the actor's device and only the confusion matrix leaves it. The driver
sums them, so the metrics are exactly the FCN paper's over the whole split. How a model turns an image
into labels is the inference core's (`pipelines.inference.core`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import UserError
from pipelines.inference.core import InferenceSettings
from pipelines.runtime import ModelActors

SCORE_PER_ACTOR = 8  # val images per scoring actor at least (a small split is scored by fewer actors)
# Images per actor call: same-size ones among them share forward passes within the inference core's pixel
# budget (nine padded VOC images; a 2048x1024 image goes alone), so a GPU actor is not fed one at a time.
IMAGES_PER_CALL = 8


class ScoreImages:
    """Ray Data actor: loads the model once (on `device`), returns one flattened confusion matrix per image;
    the images of a call go through the network in pixel-budgeted passes (`labels_in_passes`)."""

    def __init__(self, payload_ref, settings: InferenceSettings, num_classes: int, device: str, threads: int):
        import ray
        import torch

        from pipelines.inference.core import materialize
        from segmodels.artifact import load_model_dir

        torch.set_num_threads(threads)
        # The ref travels inside a list so Ray hands it over unresolved; fetched once per actor.
        self.model = load_model_dir(materialize(ray.get(payload_ref[0])), device=device)
        self.settings = settings
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pipelines.data.dataset import decode_mask
        from pipelines.images import decode_image
        from pipelines.inference.core import labels_in_passes
        from segmodels.metrics import ConfusionMatrix

        images = [decode_image(data) for data in batch["image"]]
        ids = [str(image_id) for image_id in batch["image_id"]]
        rows: list[np.ndarray] = [np.empty(0)] * len(images)
        for i, labels in labels_in_passes(self.model, images, self.settings, ids):
            truth = torch.from_numpy(decode_mask(batch["mask"][i]))
            cm = ConfusionMatrix(self.num_classes)
            cm.update(labels[None], truth[None])  # bincount on the labels' device; C x C counts come back
            rows[i] = cm.matrix.reshape(-1).numpy()
        return {"image_id": batch["image_id"], "confusion": np.stack(rows)}


@dataclass(frozen=True)
class EvalConfig:
    model_uri: str
    data: str
    split: str = "val"
    settings: InferenceSettings = InferenceSettings()
    tracking_uri: str = ""
    max_images: int = 0  # 0 = the whole split
    concurrency: int = 0  # scoring actors; 0 = as many as the cluster holds (`model_actors`)
    num_gpus: float | None = None  # per actor; None = one each when the cluster has GPUs, else CPUs


def metrics_json(scores: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """ConfusionMatrix.compute() -> the issue's JSON shape, NaN/None made JSON-safe."""

    def clean(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    return {
        "miou": clean(scores["miou"]),
        "pixel_acc": clean(scores["pixel_acc"]),
        "mean_acc": clean(scores["mean_acc"]),
        "fwiou": clean(scores["fwiou"]),
        "per_class_iou": {c: clean(v) for c, v in zip(classes, scores["per_class_iou"], strict=True)},
    }


def score_split(
    model_folder: Path,
    data,
    split: str,
    settings: InferenceSettings,
    *,
    max_images: int = 0,
    concurrency: int = 0,
    actors: ModelActors | None = None,
):
    """Confusion matrix of the model folder on `split`, scored by a pool of Ray actors (`model_actors()`
    unless given)."""
    import ray
    import torch

    from pipelines.inference.core import model_payload
    from pipelines.progress import progress
    from pipelines.runtime import ensure_ray, model_actors
    from segmodels.metrics import ConfusionMatrix

    ensure_ray()
    actors = actors or model_actors()
    if split not in data.manifest.splits:
        raise UserError(f"dataset has no split {split!r}; it has {', '.join(data.manifest.splits)}")
    ds = data.split(split)
    if max_images:
        ds = ds.limit(max_images)
    if settings.proposals is not None:
        from pipelines.data.dataset import IMAGE_ID
        from pipelines.inference.proposals import check_covered

        ids = ds.select_columns([IMAGE_ID]).to_pandas()[IMAGE_ID]
        check_covered(settings.proposals, ids, "proposals file")
    workers = actors.pool(data.rows(split, max_images), SCORE_PER_ACTOR, concurrency)
    payload_ref = [ray.put(model_payload(model_folder))]
    scored = ds.map_batches(
        ScoreImages,
        fn_constructor_kwargs={
            "payload_ref": payload_ref,
            "settings": settings,
            "num_classes": data.num_classes,
            "device": actors.device,
            "threads": actors.threads(workers),
        },
        batch_size=IMAGES_PER_CALL,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        **actors.options,
    )
    cm = ConfusionMatrix(data.num_classes)
    images = 0
    with progress(f"evaluate {split}", data.rows(split, max_images)) as bar:
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            cm.matrix += torch.from_numpy(np.asarray(batch["confusion"]).sum(0).reshape(cm.matrix.shape))
            images += len(batch["confusion"])
            bar.advance(len(batch["confusion"]))
    return cm, images


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Score a model on a prepared split; logs `eval_*` metrics to the run when the URI is `runs:/...`."""
    from pipelines import tracking
    from pipelines.data.dataset import open_prepared
    from pipelines.model_uri import ModelUri, fetched_model
    from pipelines.runtime import ensure_ray, model_actors
    from segmodels.artifact import read_spec

    data = open_prepared(cfg.data)
    ensure_ray()
    actors = model_actors(cfg.num_gpus)  # a wrong --num-gpus fails before the download
    with fetched_model(cfg.model_uri, cfg.tracking_uri) as folder:
        spec = read_spec(folder)
        if list(spec.classes) != list(data.classes):
            raise UserError(
                f"model {cfg.model_uri} predicts {spec.num_classes} classes {spec.classes[:4]}... but "
                f"{cfg.data} has {data.num_classes} {list(data.classes)[:4]}...: evaluate on the dataset "
                "it was trained for"
            )
        started = time.perf_counter()
        cm, images = score_split(
            folder,
            data,
            cfg.split,
            cfg.settings,
            max_images=cfg.max_images,
            concurrency=cfg.concurrency,
            actors=actors,
        )
    seconds = time.perf_counter() - started
    result = {
        "model_uri": cfg.model_uri,
        "split": cfg.split,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / max(seconds, 1e-9),
        "settings": {
            "scales": list(cfg.settings.scales),
            "flip": cfg.settings.flip,
            "slide": list(cfg.settings.slide) if cfg.settings.slide else None,
            "crf": cfg.settings.crf,
            "instance": cfg.settings.proposals is not None,
        },
        "metrics": metrics_json(cm.compute(), list(data.classes)),
        "confusion": cm.to_list(),
    }
    model = ModelUri.parse(cfg.model_uri)
    if model.kind == "run":
        client = tracking.connect(cfg.tracking_uri)
        run_id = model.run_id
        flat = {
            f"eval_{cfg.split}_{k}": v
            for k, v in result["metrics"].items()
            if k != "per_class_iou" and v is not None
        }
        client.log_dict(run_id, result, f"evaluation/{cfg.split}-{int(time.time())}.json")
        for key, value in flat.items():
            client.log_metric(run_id, key, value)
    return result


def print_evaluation(result: dict[str, Any]) -> None:
    from pipelines.report import format_table

    m = result["metrics"]
    rows = [[name, "-" if iou is None else round(iou, 4)] for name, iou in m["per_class_iou"].items()]
    print(format_table(["class", "IoU"], rows))
    print(f"\n{result['split']}: {result['images']} images, {result['images_per_s']:.2f} img/s")
    print(
        format_table(
            ["mIoU", "pixel acc", "mean acc", "fwIoU"],
            [[m["miou"], m["pixel_acc"], m["mean_acc"], m["fwiou"]]],
        )
    )
