"""The per-worker training loop run by Ray Train's TorchTrainer (and by Ray Tune trials).

Reads top to bottom: build the model and optimiser, restore the latest checkpoint if Ray hands one
back, then per epoch `train_one_epoch` -> `validate` (confusion matrix all-reduced across workers)
-> rank 0 writes a checkpoint (safetensors weights + plain files) -> `ray.train.report`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from pipelines.config import TrainConfig
from pipelines.errors import UserError

if TYPE_CHECKING:
    from segmodels.metrics import ConfusionMatrix

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.json"


def freeze(model: torch.nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Leave the parameters whose names start with one of `prefixes` untrained; returns their names.

    Dilation trains its context module on the output of a trained, fixed front end (Yu & Koltun, section
    5): `freeze: [features, fc6, fc7, final]`. A prefix that names no parameter is a UserError.
    """

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    params = dict(model.named_parameters())
    for prefix in prefixes:
        if not any(under(name, prefix) for name in params):
            children = ", ".join(name for name, _ in model.named_children())
            raise UserError(f"freeze: {prefix!r} names no parameter of this model; its layers: {children}")
    frozen = [name for name in params if any(under(name, p) for p in prefixes)]
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Param groups with the papers' multipliers: new head layers x head_lr_mult, biases/norms x bias_lr_mult.

    One-dimensional parameters (biases, norm scales) get no weight decay, as in the Caffe recipes.
    """
    groups = []
    for part, params in model.param_groups().items():
        mult = cfg.head_lr_mult if part == "head" else 1.0
        weights = [p for p in params if p.requires_grad and p.ndim > 1]
        vectors = [p for p in params if p.requires_grad and p.ndim <= 1]
        if weights:
            groups.append({"params": weights, "lr_mult": mult, "weight_decay": cfg.weight_decay})
        if vectors:
            groups.append({"params": vectors, "lr_mult": mult * cfg.bias_lr_mult, "weight_decay": 0.0})
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: TrainConfig, iteration: int, iters_per_epoch: int) -> float:
    """Poly / step / fixed schedule with optional linear warm-up, as a factor of each group's base LR."""
    total = max(1, cfg.epochs * iters_per_epoch)
    warm = cfg.warmup_epochs * iters_per_epoch
    if iteration < warm:
        return (iteration + 1) / warm
    if cfg.lr_policy == "poly":
        return (1 - min(iteration, total - 1) / total) ** cfg.poly_power
    if cfg.lr_policy == "step":
        return cfg.step_gamma ** (iteration // max(1, cfg.step_epochs * iters_per_epoch))
    return 1.0


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_input(images: torch.Tensor, device: torch.device, cfg: TrainConfig) -> torch.Tensor:
    """uint8 N,H,W,3 -> ImageNet-normalised float N,3,H,W on `device`."""
    from segmodels.transforms import normalize

    x = normalize(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def iter_train_batches(shard, cfg: TrainConfig, device: torch.device):
    """This worker's augmented train batches for one epoch: image uint8 N,crop,crop,3, mask uint8 N,crop,crop.

    Ray Data prepares `prefetch_batches` batches ahead in a thread while the step runs; on CUDA they are
    pinned so the host-to-device copy is asynchronous. The local shuffle buffer mixes rows across the
    blocks of the (file-shuffled) read.
    """
    return shard.iter_torch_batches(
        batch_size=cfg.batch_size,
        drop_last=True,
        local_shuffle_buffer_size=4 * cfg.batch_size,
        prefetch_batches=4,
        pin_memory=device.type == "cuda",
    )


def train_one_epoch(model, optimizer, scaler, batches, cfg, device, *, iteration: int, iters_per_epoch: int):
    """One pass over this worker's shard; returns (mean loss over all workers, images seen here, iteration).

    The loss is summed on the device and read once, at the end: a `.item()` per step would make the host
    wait for every step's kernels and stall the queue of the next ones.
    """
    from segmodels.losses import segmentation_loss

    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    images = 0
    for batch in batches:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_mult"] * lr_factor(cfg, iteration, iters_per_epoch)
        x = to_input(batch["image"], device, cfg)
        target = batch["mask"].to(device, non_blocking=True).long()
        weight = batch["weight"].to(device, non_blocking=True) if "weight" in batch else None
        with autocast(cfg, device):
            output = model(x)
        output = {k: v.float() for k, v in output.items()} if isinstance(output, dict) else output.float()
        loss = segmentation_loss(
            output,
            target,
            aux_weight=cfg.aux_weight,
            pixel_weight=weight,
            border=cfg.loss_border,
            reduction=cfg.loss_reduction,
        )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * len(x)
        images += len(x)
        iteration += 1
    totals = torch.stack([loss_sum, torch.tensor(float(images), dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    mean_loss = (totals[0] / totals[1].clamp(min=1)).item()
    return mean_loss, images, iteration


def val_batch_plan(
    sizes: Sequence[tuple[int, int]], batch_size: int, rank: int, world: int
) -> list[list[int]]:
    """This rank's validation batches as row positions (sizes[i] = (height, width) of row i).

    Rows of one size are batched together, so no image is padded and none sees another's border; each
    size group is cut into batches of `batch_size` in row order, and batch k goes to rank k % world. The
    batches themselves do not depend on `world`, so any number of workers makes the same predictions.
    """
    order = sorted(range(len(sizes)), key=lambda i: (tuple(sizes[i]), i))
    batches: list[list[int]] = []
    for _, group in itertools.groupby(order, key=lambda i: tuple(sizes[i])):
        rows = list(group)
        batches += [rows[j : j + batch_size] for j in range(0, len(rows), batch_size)]
    return batches[rank::world]


class ValShard:
    """One worker's share of the val split, read once (encoded bytes) and decoded batch by batch.

    Only this rank's rows are decoded; the next batch is decoded in a thread while the current one runs.
    """

    def __init__(self, data, batch_size: int, rank: int, world: int):
        from pipelines.data.dataset import HEIGHT, IMAGE, MASK, WIDTH

        sizes = data.read_rows("val", [HEIGHT, WIDTH])
        sizes = list(zip(sizes[HEIGHT].to_pylist(), sizes[WIDTH].to_pylist(), strict=True))
        self.batches = val_batch_plan(sizes, batch_size, rank, world)
        rows = data.read_rows("val", [IMAGE, MASK], [i for batch in self.batches for i in batch])
        self.images, self.masks = rows[IMAGE].to_pylist(), rows[MASK].to_pylist()

    def __iter__(self):
        """Yields (images uint8 N,H,W,3, masks uint8 N,H,W), one size per batch."""
        from concurrent.futures import ThreadPoolExecutor

        from pipelines.data.dataset import decode_image, decode_mask

        def decode(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
            span = range(start, start + count)
            return (
                np.stack([decode_image(self.images[i]) for i in span]),
                np.stack([decode_mask(self.masks[i]) for i in span]),
            )

        starts = np.cumsum([0] + [len(b) for b in self.batches])
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for start, batch in zip(starts[:-1], self.batches, strict=True):
                ahead = pool.submit(decode, int(start), len(batch))
                if pending is not None:
                    yield pending.result()
                pending = ahead
            if pending is not None:
                yield pending.result()


@torch.no_grad()
def validate(net, batches, num_classes: int, cfg: TrainConfig, device) -> ConfusionMatrix:
    """Whole-image validation of this worker's batches (uint8 N,H,W,3 images, N,H,W masks, one size per
    batch); the confusion matrix is summed over all workers (FCN section 5 metrics)."""
    from segmodels.inference import predict_whole
    from segmodels.metrics import ConfusionMatrix

    cm = ConfusionMatrix(num_classes)
    for images, masks in batches:
        x = to_input(torch.from_numpy(images), device, cfg)
        with autocast(cfg, device):
            probs = predict_whole(net, x)
        cm.update(probs.argmax(1), torch.from_numpy(masks))
    return cm.all_reduce_()


def save_checkpoint(
    folder: Path,
    net,
    optimizer,
    scaler,
    *,
    epoch: int,
    iteration: int,
    cfg: TrainConfig,
    extra: dict[str, Any],
) -> None:
    """Weights as safetensors; optimiser and scaler state via torch.save (read back with weights_only=True)."""
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS_FILE)
    )
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scaler.state_dict(), folder / "scaler.pt")
    state = {"epoch": epoch, "iteration": iteration, "config": cfg.to_dict(), **extra}
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_checkpoint(folder: Path, net, optimizer, scaler, device) -> dict[str, Any]:
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(device)))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    return json.loads((folder / STATE_FILE).read_text())


def init_from(model, cfg: TrainConfig, config: dict[str, Any], rank: int) -> None:
    """`--init-from`: matching tensors of the source model replace the fresh init; rank 0 logs the report."""
    from pipelines.train.init_from import apply_init_from

    run_id = config["run_id"] if rank == 0 else None
    report = apply_init_from(model, cfg.init_from, tracking_uri=config["tracking_uri"], run_id=run_id)
    if rank == 0:
        print(f"[segpipe] initialised {len(report.copied)} tensors from {cfg.init_from}")


def quiet_report_records() -> None:
    """Ray Train 2.60 logs each `report` at INFO through a logger named after its source file, outside
    `ray.train`, so the run's LoggingConfig does not reach it: give it the same level here."""
    from ray.train.v2._internal.execution import context

    from pipelines.runtime import log_level

    logging.getLogger(context.__file__).setLevel(log_level())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"cfg": TrainConfig dict, "classes", "palette", "run_id",
    "tracking_uri", "iters_per_epoch", "fingerprint"}."""
    import ray.train
    import ray.train.torch

    from pipelines import tracking

    quiet_report_records()
    from pipelines.data.dataset import open_prepared
    from segmodels import build_model

    cfg = TrainConfig(**config["cfg"])
    classes = config["classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    model = build_model(cfg.model, len(classes), **cfg.model_args)
    if cfg.pretrained and ray.train.get_checkpoint() is None:
        from segmodels import load_backbone_weights

        load_backbone_weights(model, cfg.pretrained)
    if cfg.init_from and ray.train.get_checkpoint() is None:
        init_from(model, cfg, config, rank)
    freeze(model, cfg.freeze)
    if cfg.sync_bn and cfg.use_gpu and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    net = model
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    if cfg.compile:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    start_epoch, iteration = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder), net, optimizer, scaler, device)
        start_epoch, iteration = state["epoch"] + 1, state["iteration"]
        if rank == 0:
            print(
                f"[segpipe] resuming {cfg.run_name or cfg.model} from epoch {state['epoch'] + 1} checkpoint"
            )

    client = tracking.connect(config["tracking_uri"]) if rank == 0 else None
    iters = config["iters_per_epoch"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ValShard(open_prepared(cfg.data), cfg.val_batch_size, rank, world)
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        loss, images, iteration = train_one_epoch(
            model,
            optimizer,
            scaler,
            iter_train_batches(train_shard, cfg, device),
            cfg,
            device,
            iteration=iteration,
            iters_per_epoch=iters,
        )
        train_time = time.perf_counter() - started
        cm = validate(net, val_shard, len(classes), cfg, device)
        scores = cm.compute()
        metrics = {
            "epoch": epoch,
            "train_loss": loss,
            "val_miou": scores["miou"],
            "val_pixel_acc": scores["pixel_acc"],
            "val_mean_acc": scores["mean_acc"],
            "val_fwiou": scores["fwiou"],
            "images_per_s": images * world / max(train_time, 1e-9),
            "epoch_time_s": time.perf_counter() - started,
            "lr": optimizer.param_groups[0]["lr"],
        }
        for name, iou in zip(classes, scores["per_class_iou"], strict=True):
            if iou is not None and not math.isnan(iou):
                metrics[f"val_iou_{tracking.sanitize_key(name)}"] = iou
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(
                    Path(tmp),
                    net,
                    optimizer,
                    scaler,
                    epoch=epoch,
                    iteration=iteration,
                    cfg=cfg,
                    extra={
                        "classes": classes,
                        "palette": config["palette"],
                        "run_id": config["run_id"],
                        "fingerprint": config["fingerprint"],
                        "metrics": metrics,
                        "confusion": cm.matrix.tolist(),
                    },
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
        if rank == 0:
            tracking.log_metrics_once(
                client, config["run_id"], {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch
            )
            print(
                f"[segpipe] epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f} val mIoU {scores['miou']:.4f} "
                f"pixel acc {scores['pixel_acc']:.4f} {metrics['images_per_s']:.1f} img/s "
                f"{metrics['epoch_time_s']:.1f} s",
                flush=True,
            )
