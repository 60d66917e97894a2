"""Evaluation stage: whole / sliding-window / multi-scale+flip inference and optional dense CRF on a split.

Images are scored in parallel by a pool of Ray Data actors, each holding the model once; every image
contributes a confusion matrix and the driver sums them, so the metrics are exactly the FCN paper's over
the whole split. `predict_image` is the single definition of "run the model on one image" that the
ensemble search and the serving endpoint reuse.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import UserError


@dataclass(frozen=True)
class InferenceSettings:
    """How to turn one image into class probabilities."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    slide: tuple[int, int] | None = None  # (crop, stride) in pixels
    crf: bool = False
    crf_params: dict[str, float] = field(default_factory=dict)  # overrides of the model's / DeepLab's
    # DeconvNet's instance-wise inference: image_id -> proposal boxes (pipelines.inference.proposals); None = off.
    proposals: dict[str, tuple[tuple[int, int, int, int], ...]] | None = None
    top_k: int = 50  # proposals per image (the paper's EdgeBoxes top 50)

    def __post_init__(self) -> None:
        if self.proposals is not None and (self.scales != (1.0,) or self.flip or self.slide):
            raise UserError(
                "--instance segments proposals at the network's input size: drop --tta, --flip and --slide"
            )
        if not self.scales or any(not s > 0 for s in self.scales):
            raise UserError(f"--tta scales must be positive numbers, got {self.scales}")
        if self.slide is not None:
            crop, stride = self.slide
            if not 0 < stride <= crop:
                raise UserError(f"--slide CROP STRIDE needs 0 < STRIDE <= CROP, got {crop} {stride}")


def crf_params_for(model, settings: InferenceSettings):
    """The model's tuned CRF parameters (if any), overridden by explicit settings."""
    from segmodels.crf import CRFParams

    values = {**(model.spec.crf or {}), **settings.crf_params}
    try:
        return CRFParams(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"bad CRF parameters {values}: {err}") from None


def predict_batch(model, images: np.ndarray, settings: InferenceSettings, image_ids=None):
    """uint8 N,H,W,3 images of one size -> float32 N,C,H,W probabilities (torch, on the model's device).

    The network part of `predict_image` (scales, flip, sliding window or proposals; no CRF), for a batch;
    the serving endpoint runs each ensemble member through it on dynamically batched requests. With
    `settings.proposals`, `image_ids` names each image's proposals (see `predict_instances`).
    """
    import torch

    from segmodels.inference import predict_tta

    device = next(model.ensemble.parameters()).device
    # Ray hands read-only arrays over; torch wants to own writable memory (copied only when needed).
    x = model.normalize(torch.from_numpy(np.require(images, requirements=("C", "W"))).to(device))
    if settings.proposals is not None:
        return torch.stack(
            [
                predict_instances(model, image[None], settings, i)
                for image, i in zip(x, image_ids, strict=True)
            ]
        )
    if model.spec.input_scale != 1.0:
        scales = tuple(s * model.spec.input_scale for s in settings.scales)
    else:
        scales = settings.scales
    crop, stride = settings.slide if settings.slide else (None, None)
    with torch.no_grad():
        return predict_tta(
            model.ensemble,
            x,
            scales=scales,
            flip=settings.flip,
            mode="slide" if settings.slide else "whole",
            crop=crop,
            stride=stride,
        ).float()


def predict_instances(model, x, settings: InferenceSettings, image_id: str):
    """Normalised 1,3,H,W image -> C,H,W probabilities, DeconvNet members run instance-wise.

    DeconvNet members segment the image's proposals (`segmodels.instance`, section 4.1) and every other
    member (FCN-8s in EDeconvNet) the whole image; the members' maps are averaged with the ensemble's
    weights, as EDeconvNet does (section 4.2).
    """
    from pipelines.inference.proposals import clip_boxes
    from segmodels.ensemble import combine_probs
    from segmodels.inference import predict_whole
    from segmodels.instance import instance_wise_predict

    boxes = clip_boxes(settings.proposals.get(image_id, ()), *x.shape[-2:])
    members = zip(model.spec.members, model.ensemble.members, strict=True)
    maps = (
        instance_wise_predict(net, x, boxes, top_k=settings.top_k)
        if spec.arch == "deconvnet"
        else predict_whole(net, x)[0]
        for spec, net in members
    )
    return combine_probs(maps, model.ensemble.weights).float()


def predict_image(model, image: np.ndarray, settings: InferenceSettings, image_id: str = "") -> np.ndarray:
    """uint8 H,W,3 image -> float32 C,H,W class probabilities with the model's TTA/slide/CRF settings."""
    from segmodels.crf import dense_crf

    probs = predict_batch(model, image[None], settings, [image_id])[0].cpu().numpy()
    if settings.crf:
        probs = dense_crf(image, probs, crf_params_for(model, settings))
    return probs


def model_payload(folder: Path) -> dict[str, bytes]:
    """A model folder's files as bytes, so Ray actors on any node can rebuild it from the object store."""
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def materialize(payload: dict[str, bytes]) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="segpipe-model-"))
    for name, data in payload.items():
        (folder / Path(name).name).write_bytes(data)
    return folder


SCORE_PER_ACTOR = 8  # val images per scoring actor at least (a small split is scored by fewer actors)


class ScoreImages:
    """Ray Data actor: loads the model once, returns one flattened confusion matrix per image."""

    def __init__(self, payload_ref, settings: InferenceSettings, num_classes: int):
        import ray
        import torch

        from segmodels.artifact import load_model_dir

        torch.set_num_threads(1)
        # The ref travels inside a list so Ray hands it over unresolved; fetched once per actor.
        self.model = load_model_dir(materialize(ray.get(payload_ref[0])))
        self.settings = settings
        self.num_classes = num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.data.dataset import decode_image, decode_mask

        rows = []
        for image_id, img_bytes, mask_bytes in zip(
            batch["image_id"], batch["image"], batch["mask"], strict=True
        ):
            image, truth = decode_image(img_bytes), decode_mask(mask_bytes)
            pred = predict_image(self.model, image, self.settings, str(image_id)).argmax(0)
            valid = truth != 255
            index = truth[valid].astype(np.int64) * self.num_classes + pred[valid]
            rows.append(np.bincount(index, minlength=self.num_classes**2))
        return {"image_id": batch["image_id"], "confusion": np.stack(rows)}


@dataclass(frozen=True)
class EvalConfig:
    model_uri: str
    data: str
    split: str = "val"
    settings: InferenceSettings = InferenceSettings()
    tracking_uri: str = ""
    max_images: int = 0  # 0 = the whole split
    concurrency: int = 0  # scoring actors; 0 = one per CPU of the cluster


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
):
    """Confusion matrix of the model folder on `split`, scored by a pool of Ray actors."""
    import ray
    import torch

    from pipelines.runtime import ensure_ray, pool_size
    from segmodels.metrics import ConfusionMatrix

    ensure_ray()
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
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = concurrency or pool_size(cpus, data.rows(split, max_images), SCORE_PER_ACTOR)
    payload_ref = [ray.put(model_payload(model_folder))]
    scored = ds.map_batches(
        ScoreImages,
        fn_constructor_kwargs={
            "payload_ref": payload_ref,
            "settings": settings,
            "num_classes": data.num_classes,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        num_cpus=1,
    )
    cm = ConfusionMatrix(data.num_classes)
    images = 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        cm.matrix += torch.from_numpy(np.asarray(batch["confusion"]).sum(0).reshape(cm.matrix.shape))
        images += len(batch["confusion"])
    return cm, images


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Score a model on a prepared split; logs `eval_*` metrics to the run when the URI is `runs:/...`."""
    from pipelines import tracking
    from pipelines.data.dataset import open_prepared
    from segmodels.artifact import read_spec

    data = open_prepared(cfg.data)
    folder = tracking.download_model(cfg.model_uri, cfg.tracking_uri)
    spec = read_spec(folder)
    if list(spec.classes) != list(data.classes):
        raise UserError(
            f"model {cfg.model_uri} predicts {spec.num_classes} classes {spec.classes[:4]}... but "
            f"{cfg.data} has {data.num_classes} {list(data.classes)[:4]}...: evaluate on the dataset "
            "it was trained for"
        )
    started = time.perf_counter()
    cm, images = score_split(
        folder, data, cfg.split, cfg.settings, max_images=cfg.max_images, concurrency=cfg.concurrency
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
    if cfg.model_uri.startswith("runs:/"):
        client = tracking.connect(cfg.tracking_uri)
        run_id = cfg.model_uri.removeprefix("runs:/").split("/")[0]
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
