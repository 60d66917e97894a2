"""Training stage: validate inputs, run Ray Train's TorchTrainer on the prepared shards, record it in MLflow.

`train(cfg)` checks everything it can before a worker starts (model and its arguments, dataset, class
count, GPUs, storage, tracking server), then streams the augmented train split to DDP workers. Re-running
with the same `run_name` and `storage` resumes from the last checkpoint and continues the same MLflow run.
At the end the best checkpoint (by val mIoU), or with `keep: final` the last one, becomes a self-describing
model folder logged as the run's `model` artifact, with prediction overlays and a confusion-matrix plot
beside it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.config import TrainConfig
from pipelines.errors import UserError
from pipelines.runtime import log_level, verbose


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    checkpoint: str
    metrics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model_uri": self.model_uri,
            "checkpoint": self.checkpoint,
            "metrics": self.metrics,
        }


def check_model(cfg: TrainConfig, num_classes: int) -> None:
    """Build the model on the meta device (no memory, no time) so bad names or arguments fail now."""
    import torch

    import segmodels

    if cfg.model not in segmodels.MODELS:
        raise UserError(f"unknown model {cfg.model!r}; choose one of {', '.join(segmodels.MODELS)}")
    given = cfg.model_args.get("num_classes")
    if given is not None and int(given) != num_classes:
        raise UserError(
            f"num_classes={given} disagrees with the dataset manifest ({num_classes} classes); "
            "drop num_classes from --model-arg: it is taken from the manifest"
        )
    args = {k: v for k, v in cfg.model_args.items() if k != "num_classes"}
    try:
        with torch.device("meta"):
            net = segmodels.build_model(cfg.model, num_classes, **args)
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot build {cfg.model} with {args}: {err}") from None
    from pipelines.train.loop import freeze

    freeze(net, cfg.freeze, train_only=cfg.train_only)
    if cfg.pretrained:
        from pipelines.train.init_from import check_pretrained, load_pretrained

        check_pretrained(cfg)
        # Load into a CPU copy now: a missing file, a wrong architecture or a width != 1 fails here, not in a worker.
        try:
            load_pretrained(segmodels.build_model(cfg.model, num_classes, **args), cfg.pretrained)
        except (OSError, ValueError) as err:
            raise UserError(f"--pretrained {cfg.pretrained}: {err}") from None


def check_storage(storage: str) -> str:
    """Resolve the checkpoint storage to an absolute path or URI and prove it is writable."""
    from pipelines import storage as store

    location = storage if "://" in storage else str(Path(storage).expanduser().resolve())
    probe = store.join(location, f".segpipe-write-test-{uuid.uuid4().hex[:8]}")
    try:
        store.write_bytes(probe, b"ok")
        store.remove(probe)
    except Exception as err:  # any filesystem error means the same thing to the user
        raise UserError(
            f"storage {storage!r} is not writable ({err}); pass --storage with a writable path "
            "or s3:// prefix"
        ) from None
    return location


def schedule_epochs(cfg: TrainConfig, rows: int) -> int:
    """The passes over a train split of `rows` images that `cfg` asks for: `epochs`, or as many as
    `max_iters` optimiser steps take (the last one cut short at max_iters)."""
    import math

    steps = cfg.steps_per_epoch(rows)
    if steps < 1:
        raise UserError(
            f"the {cfg.train_split!r} split has {rows} training images, fewer than one step of "
            f"batch_size {cfg.batch_size} ({cfg.num_workers} worker(s) x iter_size {cfg.iter_size} x "
            f"{cfg.micro_batch_size} images); lower --batch-size"
        )
    if cfg.max_iters is None:
        return cfg.epochs
    derived = math.ceil(cfg.max_iters / steps)
    if cfg.epochs is not None and cfg.epochs != derived:
        raise UserError(
            f"epochs={cfg.epochs} and max_iters={cfg.max_iters} disagree: {rows} training images at "
            f"batch_size {cfg.batch_size} make {steps} steps per epoch, so max_iters={cfg.max_iters} is "
            f"{derived} epochs; give only one of epochs and max_iters"
        )
    return derived


def resolve(cfg: TrainConfig):
    """Everything `train` needs, validated: (cfg with resolved names/paths, PreparedDataset, tracking URI)."""
    from pipelines import storage as fs
    from pipelines.data.dataset import open_prepared
    from pipelines.preflight import default_storage

    if not cfg.data:
        raise UserError("no dataset: pass --data DST (a folder or s3:// prefix written by `segpipe prepare`)")
    data = open_prepared(cfg.data)
    for option, split in (("train_split", cfg.train_split), ("val_split", cfg.val_split)):
        if split not in data.manifest.splits:
            raise UserError(
                f"{cfg.data} has no {split!r} split (has {', '.join(data.manifest.splits)}): set {option} "
                f"to one of those, or re-run `segpipe prepare` with --splits {split}"
            )
    check_model(cfg, data.num_classes)
    epochs = schedule_epochs(cfg, data.manifest.splits[cfg.train_split].rows)
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    tracking.check_server(uri)
    run_name = cfg.run_name or f"{cfg.model}-{data.manifest.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = check_storage(cfg.storage or default_storage())
    model_args = {k: v for k, v in cfg.model_args.items() if k != "num_classes"}
    init_from = cfg.init_from
    if init_from:
        from pipelines.train.init_from import check_init_from

        init_from = check_init_from(replace(cfg, model_args=model_args), data.num_classes, uri)
    return (
        replace(
            cfg,
            # Absolute, so the workers (whose working directory is Ray's) read the same dataset.
            data=cfg.data if fs.is_s3(cfg.data) else fs.fs_path(cfg.data),
            run_name=run_name,
            epochs=epochs,
            storage=storage,
            tracking_uri=uri,
            model_args=model_args,
            init_from=init_from,
        ),
        data,
        uri,
    )


def train_feed(cfg: TrainConfig, data):
    """The train split as the Ray Dataset the workers stream: uint8 crops (+ U-Net weight maps).

    Every shard already mixes the whole split (`prepare` writes rows in a shuffled order); the shards are
    read in a new random order at every execution, i.e. every epoch (`shuffle="files"` draws it when the
    read tasks are made), and each worker draws its batches from a buffer of `cfg.shuffle_buffer` crops
    (`pipelines.train.loop.iter_train_batches`); unlike a global `randomize_block_order` or
    `random_shuffle`, nothing waits for the whole read before the first batch leaves.
    """
    from pipelines.data.augment import AugmentParams, augment_batch

    rows_per_task = 8
    # One block, hence one augmentation task, per 8 rows: left to itself Ray Data cuts the read into blocks
    # of >= 1 MiB of encoded images (~17 VOC images, more when the split is large), and a task's crops only
    # leave it when its whole block is done, so the first batch of an epoch waited for whole blocks.
    blocks = max(1, data.manifest.splits[cfg.train_split].rows // rows_per_task)
    feed = data.split(cfg.train_split, shuffle="files", override_num_blocks=blocks).map_batches(
        augment_batch,
        fn_kwargs={"params": AugmentParams.from_train_config(cfg)},
        batch_size=rows_per_task,
        batch_format="numpy",
    )
    # Ray Train's split coordinator runs it every epoch; segpipe's epoch lines are the progress to show.
    feed.context.enable_progress_bars = verbose()
    return feed


def make_trainer(cfg: TrainConfig, data, run_id: str, callbacks: list | None = None):
    """The TorchTrainer for `cfg`: the augmented train split streamed to the workers, split between them.

    The val split is not a Ray dataset here: each worker reads and decodes only its own share of it
    (`pipelines.train.loop.ValShard`), so validation costs the same whatever the number of workers.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.loop import train_loop_per_worker

    # Train V2 re-routes worker prints through a logger that also echoes them: one epoch line, not two.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    iters = cfg.steps_per_epoch(data.manifest.splits[cfg.train_split].rows)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "classes": list(data.classes),
            "palette": [list(c) for c in data.palette],
            "run_id": run_id,
            "tracking_uri": cfg.tracking_uri,
            "iters_per_epoch": iters,
            "fingerprint": data.fingerprint,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage,
            callbacks=callbacks or None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Worker group states, checkpoint and report records: INFO, for Ray's log files.
            logging_config=ray.train.LoggingConfig(log_level=logging.getLevelName(log_level())),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute="val_miou",
                checkpoint_score_order="max",
            ),
        ),
        datasets={"train": train_feed(cfg, data)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def model_spec_from_state(state: dict[str, Any], name: str, source: str):
    """Checkpoint state.json -> single-member ModelSpec (the registry's self-describing format); the member
    carries the input convention it was trained on."""
    from pipelines.train.loop import input_convention
    from segmodels.artifact import MemberSpec, ModelSpec

    cfg = state["config"]
    scores = {k: v for k, v in state["metrics"].items() if k.startswith("val_")}
    member = MemberSpec(
        arch=cfg["model"],
        num_classes=len(state["classes"]),
        weights="member0.safetensors",
        model_args=cfg["model_args"],
        config=cfg,
        metrics=scores,
        source=source,
        input=input_convention(cfg.get("input_convention", "imagenet")),
    )
    return ModelSpec.single(
        name,
        member,
        state["classes"],
        state["palette"],
        metrics=scores,
        dataset_fingerprint=state["fingerprint"],
    )


def log_final_model(client, run_id: str, checkpoint, data, cfg: TrainConfig) -> dict[str, Any]:
    """The kept checkpoint -> model folder artifact + overlays + confusion plot; returns its metrics."""
    import numpy as np
    from safetensors.torch import load_file

    from pipelines.report import confusion_figure
    from pipelines.train.loop import STATE_FILE, WEIGHTS_FILE
    from segmodels.artifact import save_model_dir

    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        weights = load_file(str(Path(folder) / WEIGHTS_FILE))
    spec = model_spec_from_state(state, cfg.run_name, source=f"runs:/{run_id}")
    # The logged model is the best or the final epoch (`keep`): its own scores, beside the curves and
    # linked to the LoggedModel (`mlflow.search_logged_models(filter_string="metrics.model_val_miou > 0.5")`).
    scores = {
        f"model_{key}": float(value)
        for key, value in state["metrics"].items()
        if key == "epoch" or (key.startswith("val_") and not key.startswith("val_iou_"))
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model_dir(Path(tmp) / "model", spec, [weights])
        tracking.log_model_folder(client, run_id, model_dir, metrics=scores)
        log_overlays(client, run_id, model_dir, data, cfg.val_split, cfg.num_overlays, Path(tmp))
    client.log_figure(
        run_id, confusion_figure(np.asarray(state["confusion"]), state["classes"]), "confusion_matrix.png"
    )
    return state["metrics"]


def log_overlays(client, run_id: str, model_dir: Path, data, split: str, count: int, tmp: Path) -> None:
    """image | truth | prediction panels for the first `count` images of the val split, under overlays/."""
    import torch

    from pipelines.data.dataset import decode_mask
    from pipelines.images import decode_image
    from pipelines.report import overlay_panel
    from segmodels.artifact import load_model_dir

    if count <= 0:
        return
    model = load_model_dir(model_dir)
    out = tmp / "overlays"
    out.mkdir()
    # A few rows: read in this process (Ray Data's planning would cost more than the reading).
    rows = range(min(count, data.manifest.splits[split].rows))
    for row in data.read_rows(split, ["image_id", "image", "mask"], rows).to_pylist():
        image, truth = decode_image(row["image"]), decode_mask(row["mask"])
        with torch.no_grad():
            probs = model.ensemble(model.normalize(torch.from_numpy(image.copy())[None]))
        pred = probs.argmax(1)[0].numpy().astype("uint8")
        overlay_panel(image, truth, pred, model.spec.palette, model.spec.classes).save(
            out / f"{row['image_id']}.png"
        )
    client.log_artifacts(run_id, str(out), "overlays")


def train(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Run (or resume) one training run; raises UserError for bad input before any worker starts.

    `callbacks`: extra Ray Train callbacks (Tune's TuneReportCallback when run as a trial).
    """
    from pipelines.preflight import check_shared_storage, check_training_resources
    from pipelines.runtime import ensure_ray

    cfg, data, uri = resolve(cfg)
    ensure_ray()
    check_training_resources(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu)
    check_shared_storage(cfg.storage)
    from pipelines import storage

    client = tracking.connect(uri)
    # Ray keeps this run's checkpoints under storage/run_name: if they exist, this is a resume.
    has_checkpoints = storage.exists(storage.join(cfg.storage, cfg.run_name))
    run_id, resumed = tracking.start_or_resume_run(
        client,
        cfg.experiment,
        cfg.run_name,
        tags={"segpipe.stage": "train", "segpipe.model": cfg.model},
        parent_run_id=cfg.parent_run_id or None,
        reuse_finished=has_checkpoints,
    )
    print(f"[segpipe] {'resuming' if resumed else 'starting'} MLflow run {run_id} ({cfg.run_name}) in {uri}")
    tracking.log_params(
        client,
        run_id,
        {
            **{f"cfg.{k}": v for k, v in cfg.to_dict().items()},
            "dataset_fingerprint": data.fingerprint,
            "dataset": data.manifest.dataset,
        },
    )
    if not resumed:
        tracking.log_dataset(client, run_id, data)
    try:
        result = make_trainer(cfg, data, run_id, callbacks).fit()
        # Ray keeps the latest checkpoint beside the best ones (CheckpointConfig.num_to_keep).
        best = result.get_best_checkpoint("val_miou", "max") or result.checkpoint
        kept = result.checkpoint if cfg.keep == "final" else best
        if kept is None:
            raise RuntimeError("training produced no checkpoint")
        metrics = log_final_model(client, run_id, kept, data, cfg)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return TrainResult(
        run_id=run_id,
        model_uri=f"runs:/{run_id}/{tracking.MODEL_ARTIFACT_PATH}",
        checkpoint=kept.path,
        metrics=metrics,
    )
