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
from dataclasses import dataclass
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


def freeze(
    model: torch.nn.Module, prefixes: tuple[str, ...] = (), *, train_only: tuple[str, ...] = ()
) -> list[str]:
    """Leave parameters untrained by name prefix; returns their names.

    `prefixes` (the config's `freeze`) names the untrained layers: Dilation trains its context module on the output of a trained,
    fixed front end (Yu & Koltun, section 5), `freeze: [features, fc6, fc7, final]`. `train_only` names
    the trained ones: DeepLab-MSc adjusts only the new branches (Chen et al., section 4.3),
    `train_only: [multiscale]`. A prefix that names no parameter is a UserError.
    """

    def under(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)

    params = dict(model.named_parameters())
    option = "train_only" if train_only else "freeze"
    for prefix in train_only or prefixes:
        if not any(under(name, (prefix,)) for name in params):
            children = ", ".join(name for name, _ in model.named_children())
            raise UserError(f"{option}: {prefix!r} names no parameter of this model; its layers: {children}")
    if train_only:
        frozen = [name for name in params if not under(name, train_only)]
    else:
        frozen = [name for name in params if under(name, prefixes)]
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def frozen_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The largest submodules whose parameters are all frozen: they run in eval mode during training.

    A frozen front end is used as at test time: its dropout off and its batch-norm statistics fixed
    (the Dilation release trains the context module on the front end's test-mode output).
    """
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Param groups with the reference prototxts' lr_mult / decay_mult, as multipliers of lr and weight_decay.

    |                    | backbone lr | head lr                     | weight decay                   |
    | weights            | 1           | head_lr_mult                | 1                              |
    | conv/linear biases | bias_lr_mult| head_lr_mult x bias_lr_mult | bias_decay_mult                |
    | norm scale/shift   | 1           | head_lr_mult                | norm_decay_mult                |

    Caffe recipes (FCN, DeepLab, Dilation, DeconvNet) give every convolution `lr_mult: 1 decay_mult: 1`
    and `lr_mult: 2 decay_mult: 0` (bias_lr_mult 2, bias_decay_mult 0), DeepLab's fc8 10 / 20
    (head_lr_mult 10). Frozen parameters (`freeze`) are left out.
    """
    kinds: dict[int, str] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or param.ndim <= 1 and name != "bias":
                kinds[id(param)] = "norm"
            else:
                kinds[id(param)] = "bias" if name == "bias" else "weight"
    rules = {  # kind -> (lr multiplier, weight decay)
        "weight": (1.0, cfg.weight_decay),
        "bias": (cfg.bias_lr_mult, cfg.weight_decay * cfg.bias_decay_mult),
        "norm": (1.0, cfg.weight_decay * cfg.norm_decay_mult),
    }
    groups = []
    for part, params in model.param_groups().items():
        mult = cfg.head_lr_mult if part == "head" else 1.0
        for kind, (lr_mult, decay) in rules.items():
            chosen = [p for p in params if p.requires_grad and kinds[id(p)] == kind]
            if chosen:
                groups.append({"params": chosen, "lr_mult": mult * lr_mult, "weight_decay": decay})
    # Each group's rate is set by LrSchedule.apply before every step (the first one included).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: TrainConfig, iteration: int, iters_per_epoch: int) -> float:
    """Poly / step / fixed schedule with optional linear warm-up, as a factor of each group's base LR.

    `iteration` counts optimiser steps. Poly decays over the whole schedule, max_iters steps (or epochs x
    iters_per_epoch): (1 - iteration / total) ** poly_power, Caffe's "poly". Step multiplies by step_gamma
    every step_iters steps (Caffe's stepsize), or every step_epochs epochs.
    """
    total = max(1, cfg.total_steps(iters_per_epoch))
    warm = cfg.warmup_epochs * iters_per_epoch
    if iteration < warm:
        return (iteration + 1) / warm
    if cfg.lr_policy == "poly":
        return (1 - min(iteration, total - 1) / total) ** cfg.poly_power
    if cfg.lr_policy == "step":
        return cfg.step_gamma ** (iteration // max(1, cfg.step_iters or cfg.step_epochs * iters_per_epoch))
    return 1.0


@dataclass(frozen=True)
class LrSchedule:
    """The one place learning rates are set: each param group's cfg.lr x lr_mult (the prototxts'
    per-layer multipliers) x the policy's factor at the optimiser step (`lr_factor`)."""

    cfg: TrainConfig
    iters_per_epoch: int

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        factor = lr_factor(self.cfg, iteration, self.iters_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = self.cfg.lr * group["lr_mult"] * factor


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def input_convention(name: str):
    """`TrainConfig.input_convention` -> the InputConvention the network is trained, validated and saved
    with (the saved model's member spec carries it, so evaluate / predict / serve feed the same)."""
    from pipelines.weights.releases import CAFFE_BGR
    from segmodels.artifact import InputConvention

    return {"imagenet": InputConvention(), "caffe_bgr": CAFFE_BGR}[name]


def to_input(images: torch.Tensor, device: torch.device, cfg: TrainConfig) -> torch.Tensor:
    """uint8 RGB N,H,W,3 -> float N,3,H,W on `device` in `cfg.input_convention`: ImageNet-normalised
    RGB 0-1, or (caffe_bgr) BGR 0-255 minus Caffe's VGG mean, as Caffe's VGG16 and the FCN reference's
    learning rates expect."""
    convention = input_convention(cfg.input_convention)
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if convention.channel_order == "bgr":
        x = x.flip(1)
    if convention.scale != 255.0:
        x = x.div_(255.0 / convention.scale)
    mean = torch.tensor(convention.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(convention.std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x.contiguous()


def iter_train_batches(shard, cfg: TrainConfig, device: torch.device):
    """This worker's augmented train batches for one epoch: image uint8 N,crop,crop,3, mask uint8 N,crop,crop.

    Ray Data prepares `prefetch_batches` batches ahead in a thread while the step runs; on CUDA they are
    pinned so the host-to-device copy is asynchronous. Batches are drawn at random from a buffer of
    `cfg.shuffle_buffer` augmented crops, which mixes the rows of several (file-shuffled) shards, so the
    batches differ from epoch to epoch although each shard's rows keep the order `prepare` gave them.
    """
    return shard.iter_torch_batches(
        batch_size=cfg.micro_batch_size,
        drop_last=True,
        local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        prefetch_batches=4,
        pin_memory=device.type == "cuda",
    )


def train_one_epoch(model, optimizer, scaler, batches, cfg, device, *, iteration: int, iters_per_epoch: int):
    """One pass over this worker's shard; returns (mean loss over all workers, images seen here, iteration).

    `batches` are this worker's micro-batches of `cfg.micro_batch_size` images; every `cfg.iter_size` of
    them make one optimiser step of `cfg.batch_size` images over all workers. The step's gradient is the
    mean of the micro-batch losses over the workers (DDP averages) and the accumulated micro-batches (each
    loss / iter_size), as Caffe's iter_size and multi-GPU solvers do. With `loss_reduction: sum` (the
    per-image sum of pixel losses, averaged over images) that is the loss of the whole batch, the same for
    any split of it; with `mean` each micro-batch is the mean over its labelled pixels, which equals the
    whole batch's mean when the micro-batches hold equally many labelled pixels (always close otherwise).
    The epoch ends after `iters_per_epoch` steps, or at the schedule's last step (`cfg.total_steps`).

    The loss is summed on the device and read once, at the end: a `.item()` per step would make the host
    wait for every step's kernels and stall the queue of the next ones.
    """
    from segmodels.losses import segmentation_loss

    model.train()
    for module in frozen_modules(model):
        module.eval()
    schedule = LrSchedule(cfg, iters_per_epoch)
    total = cfg.total_steps(iters_per_epoch)
    stop = min(total, iteration + iters_per_epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    images, micro = 0, 0
    for batch in batches:
        if iteration >= stop:
            if iteration >= total:
                break
            continue  # a remainder too small for a step: read to the end so the next epoch starts afresh
        if micro == 0:
            optimizer.zero_grad(set_to_none=True)
            schedule.apply(optimizer, iteration)
        micro += 1
        stepping = micro == cfg.iter_size
        x = to_input(batch["image"], device, cfg)
        target = batch["mask"].to(device, non_blocking=True).long()
        weight = batch["weight"].to(device, non_blocking=True) if "weight" in batch else None
        # DDP all-reduces the gradients on the step's last backward only (forward and backward inside).
        with nullcontext() if stepping or not hasattr(model, "no_sync") else model.no_sync():
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
            scaler.scale(loss / cfg.iter_size).backward()
        loss_sum += loss.detach().double() * len(x)
        images += len(x)
        if stepping:
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            micro = 0
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
    size group is cut into batches of `batch_size` in row order. Rank r gets the r-th of `world` runs of
    consecutive batches (their counts differ by one at most), so its rows lie together in the shards and
    it reads few row groups beyond its own. The batches themselves do not depend on `world`, so any number
    of workers makes the same predictions.
    """
    order = sorted(range(len(sizes)), key=lambda i: (tuple(sizes[i]), i))
    batches: list[list[int]] = []
    for _, group in itertools.groupby(order, key=lambda i: tuple(sizes[i])):
        rows = list(group)
        batches += [rows[j : j + batch_size] for j in range(0, len(rows), batch_size)]
    return batches[rank * len(batches) // world : (rank + 1) * len(batches) // world]


class ValShard:
    """One worker's share of the val split, read and decoded batch by batch at every validation.

    Building it reads only the split's heights and widths (to plan the batches). Each pass reads just the
    parquet row groups that hold this rank's rows (`PreparedDataset.read_batches`), decodes the next batch
    in a thread while the current one runs and keeps nothing afterwards: between validations a worker
    holds no val image, and while validating about two batches.
    """

    def __init__(self, data, batch_size: int, rank: int, world: int, split: str = "val"):
        from pipelines.data.dataset import HEIGHT, WIDTH

        sizes = data.read_rows(split, [HEIGHT, WIDTH])
        sizes = list(zip(sizes[HEIGHT].to_pylist(), sizes[WIDTH].to_pylist(), strict=True))
        self.data, self.split = data, split
        self.batches = val_batch_plan(sizes, batch_size, rank, world)
        self.rows = sum(len(batch) for batch in self.batches)

    def __iter__(self):
        """Yields (images uint8 N,H,W,3, masks uint8 N,H,W), one size per batch."""
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow as pa

        from pipelines.data.dataset import IMAGE, MASK, decode_mask
        from pipelines.images import decode_image

        tables = self.data.read_batches(self.split, [IMAGE, MASK], self.batches)

        def load() -> tuple[np.ndarray, np.ndarray]:
            table = next(tables)
            return (
                np.stack([decode_image(data) for data in table[IMAGE].to_pylist()]),
                np.stack([decode_mask(data) for data in table[MASK].to_pylist()]),
            )

        try:
            with ThreadPoolExecutor(max_workers=1) as pool:  # one thread: `tables` is read in order
                pending = None
                for _ in self.batches:
                    ahead = pool.submit(load)
                    if pending is not None:
                        yield pending.result()
                    pending = ahead
                if pending is not None:
                    yield pending.result()
        finally:
            tables.close()
            # Arrow's allocator keeps freed buffers for reuse: give the pass's row groups back to the OS.
            pa.default_memory_pool().release_unused()


@torch.no_grad()
def validate(net, batches, num_classes: int, cfg: TrainConfig, device) -> ConfusionMatrix:
    """Validation of this worker's batches (uint8 N,H,W,3 images, N,H,W masks, one size per batch); the
    confusion matrix is summed over all workers (FCN section 5 metrics).

    Images are predicted whole, or, with `cfg.val_slide` = (crop, stride) and an image larger than the
    crop, as the mean of crop-sized windows every `stride` pixels (`predict_sliding`): a Cityscapes
    2048x1024 image at the training crop, as it is evaluated, in a fraction of the whole image's memory.
    """
    from segmodels.inference import predict_sliding, predict_whole
    from segmodels.metrics import ConfusionMatrix

    cm = ConfusionMatrix(num_classes)
    for images, masks in batches:
        x = to_input(torch.from_numpy(images), device, cfg)
        with autocast(cfg, device):
            if cfg.val_slide and max(x.shape[-2:]) > cfg.val_slide[0]:
                probs = predict_sliding(net, x, crop=cfg.val_slide[0], stride=cfg.val_slide[1])
            else:
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


@dataclass
class WorkerModel:
    """One worker's model, ready to train: the (DDP-wrapped, compiled) module, the plain module whose
    state is saved, its optimiser and gradient scaler, and where a resumed run continues."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    start_epoch: int = 0
    iteration: int = 0


def setup_model(cfg: TrainConfig, config: dict[str, Any], rank: int, world: int, device) -> WorkerModel:
    """Build the network (ImageNet or `init_from` weights on a fresh run), freeze what the recipe fixes,
    wrap it for DDP, and restore model, optimiser and scaler from Ray Train's checkpoint when resuming."""
    import ray.train
    import ray.train.torch

    from segmodels import build_model

    checkpoint = ray.train.get_checkpoint()
    model = build_model(cfg.model, len(config["classes"]), **cfg.model_args)
    if cfg.pretrained and checkpoint is None:
        from pipelines.train.init_from import load_pretrained

        load_pretrained(model, cfg.pretrained)
    if cfg.init_from and checkpoint is None:
        init_from(model, cfg, config, rank)
    freeze(model, cfg.freeze, train_only=cfg.train_only)
    if cfg.sync_bn and cfg.use_gpu and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    net = model
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    if cfg.compile:
        model = torch.compile(model)
    worker = WorkerModel(model, net, optimizer, torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"))
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder), net, optimizer, worker.scaler, device)
        worker.start_epoch, worker.iteration = state["epoch"] + 1, state["iteration"]
        if rank == 0:
            print(
                f"[segpipe] resuming {cfg.run_name or cfg.model} from epoch {state['epoch'] + 1} checkpoint"
            )
    return worker


def epoch_metrics(
    epoch: int,
    loss: float,
    scores: dict[str, Any],
    classes: list[str],
    throughput: float,
    seconds: float,
    lr: float,
) -> dict[str, Any]:
    """What every epoch reports to Ray Train and MLflow: loss, the val scores (per class too), speed, lr."""
    from pipelines import tracking

    metrics = {
        "epoch": epoch,
        "train_loss": loss,
        "val_miou": scores["miou"],
        "val_pixel_acc": scores["pixel_acc"],
        "val_mean_acc": scores["mean_acc"],
        "val_fwiou": scores["fwiou"],
        "images_per_s": throughput,
        "epoch_time_s": seconds,
        "lr": lr,
    }
    for name, iou in zip(classes, scores["per_class_iou"], strict=True):
        if iou is not None and not math.isnan(iou):
            metrics[f"val_iou_{tracking.sanitize_key(name)}"] = iou
    return metrics


def report_epoch(
    worker: WorkerModel, cfg: TrainConfig, config: dict[str, Any], rank: int, metrics, cm
) -> None:
    """Ray Train's report for the epoch, with rank 0's checkpoint (model, optimiser, scaler, the classes,
    the metrics and the confusion matrix the final model folder is made from)."""
    import ray.train

    epoch = metrics["epoch"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_checkpoint(
                Path(tmp),
                worker.net,
                worker.optimizer,
                worker.scaler,
                epoch=epoch,
                iteration=worker.iteration,
                cfg=cfg,
                extra={
                    "classes": config["classes"],
                    "palette": config["palette"],
                    "run_id": config["run_id"],
                    "fingerprint": config["fingerprint"],
                    "metrics": metrics,
                    "confusion": cm.matrix.tolist(),
                },
            )
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"cfg": TrainConfig dict, "classes", "palette", "run_id",
    "tracking_uri", "iters_per_epoch", "fingerprint"}."""
    import ray.train
    import ray.train.torch

    from pipelines import tracking

    quiet_report_records()
    cfg = TrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    worker = setup_model(cfg, config, rank, world, device)
    client = tracking.connect(config["tracking_uri"]) if rank == 0 else None
    monitor = system_metrics(cfg, config, rank, resumed=worker.start_epoch > 0)
    try:
        run_epochs(worker, cfg, config, rank, world, device, client)
    finally:
        if monitor is not None:
            monitor.finish()


def system_metrics(cfg: TrainConfig, config: dict[str, Any], rank: int, resumed: bool):
    """MLflow's system-metrics monitor on the first worker (a thread sampling CPU, memory, disk, network and
    GPUs into the run's `system/...` metrics), or None."""
    if rank != 0 or cfg.system_metrics_s <= 0:
        return None
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from pipelines.runtime import log_level

    # Its start/stop notices are INFO records on the worker's stderr, which Ray relays to the terminal.
    logging.getLogger("mlflow.system_metrics").setLevel(log_level())
    monitor = SystemMetricsMonitor(
        config["run_id"],
        sampling_interval=cfg.system_metrics_s,
        resume_logging=resumed,
        tracking_uri=config["tracking_uri"],
    )
    monitor.start()
    return monitor


def run_epochs(
    worker: WorkerModel, cfg: TrainConfig, config: dict[str, Any], rank, world, device, client
) -> None:
    """Train, validate, checkpoint and report every remaining epoch."""
    import ray.train

    from pipelines import tracking
    from pipelines.data.dataset import open_prepared

    classes = config["classes"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ValShard(open_prepared(cfg.data), cfg.val_batch_size, rank, world, cfg.val_split)
    for epoch in range(worker.start_epoch, cfg.epochs):
        started = time.perf_counter()
        loss, images, worker.iteration = train_one_epoch(
            worker.model,
            worker.optimizer,
            worker.scaler,
            iter_train_batches(train_shard, cfg, device),
            cfg,
            device,
            iteration=worker.iteration,
            iters_per_epoch=config["iters_per_epoch"],
        )
        throughput = images * world / max(time.perf_counter() - started, 1e-9)
        cm = validate(worker.net, val_shard, len(classes), cfg, device)
        scores = cm.compute()
        lr = worker.optimizer.param_groups[0]["lr"]
        metrics = epoch_metrics(epoch, loss, scores, classes, throughput, time.perf_counter() - started, lr)
        report_epoch(worker, cfg, config, rank, metrics, cm)
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
