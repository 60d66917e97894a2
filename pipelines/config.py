"""The one config loader: YAML files mapped onto typed, frozen models, command-line flags on top.

A recipe file (`pipelines/configs/<arch>_<dataset>.yaml`) holds one paper's training recipe. Every file
kind (train, search, retrain, reproduce, serve) is a `config_model` dataclass validated by pydantic:
a key that is unknown, missing or of the wrong type exits 2 naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, dataclass_transform

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from pipelines.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"

# Every config model: unknown keys are errors (nested ones too), numbers are accepted for text fields.
MODEL_CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


@dataclass_transform(frozen_default=True)
def config_model(cls: type) -> type:
    """A frozen dataclass that `make_config` parses with pydantic: typed fields, unknown keys refused."""
    cls.__pydantic_config__ = MODEL_CONFIG
    return dataclass(frozen=True)(cls)


@config_model
class TrainConfig:
    """Everything one training run needs; saved in every checkpoint and logged as MLflow params."""

    model: str = "fcn8s"
    data: str = ""
    # The prepared splits trained on and validated on (voc_aug: train_aug/val, or FCN's sbd_train/seg11valid).
    train_split: str = "train"
    val_split: str = "val"
    model_args: dict[str, Any] = field(default_factory=dict)
    # Backbone weights: a torchvision ImageNet state dict (.safetensors/.pth), or Caffe's VGG16
    # (VGG_ILSVRC_16_layers.caffemodel) for the VGG trunks, which needs input_convention caffe_bgr.
    pretrained: str = ""
    # What the network is fed (training, validation and, through the saved model, every later stage):
    # imagenet = RGB 0-1 normalised with ImageNet's mean/std (torchvision's weights); caffe_bgr = BGR 0-255
    # minus Caffe's VGG mean (Caffe's weights, and the FCN reference's learning rates assume that scale).
    input_convention: str = "imagenet"
    init_from: str = ""  # model folder or runs:/, models:/ URI whose matching tensors start the model
    # Optimisation (paper recipes live in pipelines/configs/).
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_policy: str = "poly"  # poly | step | fixed
    poly_power: float = 0.9
    step_epochs: int = 30
    step_iters: int = 0  # > 0: the step policy's stepsize in optimiser steps (Caffe's stepsize), not epochs
    step_gamma: float = 0.1
    # Per-layer rules as the reference prototxts' lr_mult / decay_mult (see `train.loop.build_optimizer`).
    head_lr_mult: float = 1.0  # new layers (the model's "head" group), e.g. DeepLab fc8 x10
    bias_lr_mult: float = 1.0  # conv/linear biases; the Caffe recipes' lr_mult 2
    bias_decay_mult: float = 0.0  # weight decay on biases; the Caffe recipes' decay_mult 0
    norm_decay_mult: float = 0.0  # weight decay on norm-layer scales and shifts (DeconvNet's BN, PSPNet: 1)
    warmup_epochs: int = 0
    # Schedule length: `epochs` (passes over the train split) or `max_iters` (optimiser steps, the papers'
    # unit; epochs are then derived from the split size). Neither: DEFAULT_EPOCHS.
    epochs: int | None = None
    max_iters: int | None = None
    # Images per optimiser step over ALL workers: each worker runs iter_size micro-batches of
    # batch_size / (num_workers x iter_size) images and accumulates their gradients (Caffe's iter_size).
    batch_size: int = 8
    iter_size: int = 1
    aux_weight: float = 0.4
    pixel_weight: str = "none"  # none | unet (U-Net border weight map, w0=10, sigma=5)
    loss_border: int = 0  # crop pixels per side left out of the loss (U-Net overlap-tile training: 92)
    loss_reduction: str = "mean"  # mean | sum: the FCN reference's unnormalised loss (with its lr ~1e-10)
    # Parameter-name prefixes left untrained (Dilation's context stage: the front end), or the only ones
    # trained (DeepLab-MSc: the new branches); frozen modules run in eval mode (no dropout, fixed BN).
    freeze: tuple[str, ...] = ()
    train_only: tuple[str, ...] = ()
    # Augmentation (applied in Ray Data map_batches, per epoch).
    crop: int = 321
    crop_mode: str = "random"  # random | object | proposal: DeconvNet's two training stages (sec. 4.2)
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    rotate_deg: float = 0.0
    jitter: float = 0.0  # photometric jitter strength (brightness/contrast/saturation), 0 = off
    blur: float = 0.0  # probability of a Gaussian blur (PSPNet)
    elastic: bool = False  # U-Net's elastic deformation (3x3 grid, std 10 px)
    # Execution.
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    amp: str = "off"  # bf16 | fp16 | off
    channels_last: bool = False
    sync_bn: bool = True  # used only with several GPU workers
    compile: bool = False
    val_batch_size: int = 4  # val images per forward pass (same-size images only, see train.loop.ValShard)
    # Feed and validation at full size (see train.loop.iter_train_batches and validate). The shuffle buffer
    # holds augmented crops, crop x crop x 4 bytes each (image + mask; 8 with U-Net weights), up to ~2x
    # the size while Ray compacts it: 256 at crop 713 is 0.5-1 GB per worker; 0 turns it off.
    shuffle_buffer: int = 256
    val_slide: tuple[int, int] | None = None  # (crop, stride): val images larger than crop in sliding windows
    # Which checkpoint becomes the run's `model`: the best epoch by val mIoU, or the final one (the
    # papers report their final snapshot).
    keep: str = "best"
    seed: int = 0
    max_failures: int = 2
    checkpoints_to_keep: int = 2
    num_overlays: int = 4
    # MLflow system metrics (CPU, memory, disk, network, GPU) of the first worker every N seconds; 0 = off.
    system_metrics_s: float = 10.0
    # Tracking and storage.
    tracking_uri: str = ""
    experiment: str = "segpipe"
    run_name: str = ""
    storage: str = ""
    parent_run_id: str = ""  # set by `segpipe tune`: each trial is a nested MLflow run

    def __post_init__(self) -> None:
        choices = {
            "optimizer": ("sgd", "adamw"),
            "lr_policy": ("poly", "step", "fixed"),
            "amp": ("bf16", "fp16", "off"),
            "pixel_weight": ("none", "unet"),
            "loss_reduction": ("mean", "sum"),
            "crop_mode": ("random", "object", "proposal"),
            "input_convention": ("imagenet", "caffe_bgr"),
            "keep": ("best", "final"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise UserError(
                    f"{name}={getattr(self, name)!r} is not valid; choose one of {', '.join(valid)}"
                )
        if self.epochs is None and self.max_iters is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS)
        positive = [
            "lr",
            "batch_size",
            "iter_size",
            "crop",
            "num_workers",
            "val_batch_size",
            "cpus_per_worker",
        ]
        positive += [name for name in ("epochs", "max_iters") if getattr(self, name) is not None]
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)!r}")
        parts = self.num_workers * self.iter_size
        if self.batch_size % parts:
            fits = max(parts, round(self.batch_size / parts) * parts)
            raise UserError(
                f"batch_size={self.batch_size} (images per step over all workers) does not split into "
                f"num_workers={self.num_workers} x iter_size={self.iter_size} equal micro-batches; use "
                f"batch_size {fits}, or a num_workers x iter_size that divides {self.batch_size}"
            )
        if self.freeze and self.train_only:
            raise UserError(
                f"freeze={list(self.freeze)} and train_only={list(self.train_only)} both given: use one "
                "(train_only trains the named layers and freezes every other)"
            )
        if not 0 <= 2 * self.loss_border < self.crop:
            raise UserError(
                f"loss_border={self.loss_border} must be >= 0 and leave part of the {self.crop}-pixel crop "
                f"(2 x loss_border < crop); U-Net's 572 tile uses 92"
            )
        if self.shuffle_buffer < 0:
            raise UserError(
                f"shuffle_buffer must be >= 0 images (0 = no shuffle buffer), got {self.shuffle_buffer}"
            )
        if self.val_slide is not None and not 0 < self.val_slide[1] <= self.val_slide[0]:
            raise UserError(
                f"val_slide={list(self.val_slide)} must be [crop, stride] with 0 < stride <= crop, "
                "e.g. [713, 476] for a 713 crop"
            )
        if not 0 < self.scale_min <= self.scale_max:
            raise UserError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")

    @property
    def micro_batch_size(self) -> int:
        """Images per forward pass on one worker: batch_size / (num_workers x iter_size)."""
        return self.batch_size // (self.num_workers * self.iter_size)

    def steps_per_epoch(self, rows: int) -> int:
        """Optimiser steps in one pass over a train split of `rows` images, split equally between the
        workers; the rows left over (fewer than one step's batch on some worker) are not trained on."""
        return rows // self.num_workers // self.micro_batch_size // self.iter_size

    def total_steps(self, steps_per_epoch: int) -> int:
        """The schedule's length in optimiser steps: max_iters, or epochs x steps_per_epoch."""
        return self.max_iters or (self.epochs or 0) * steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_EPOCHS = 30  # when a recipe gives neither epochs nor max_iters


# Names other tools use for our keys, so a config written for them gets a pointed hint.
SYNONYMS = {
    "learning_rate": "lr",
    "base_lr": "lr",
    "wd": "weight_decay",
    "bs": "batch_size",
    "batch": "batch_size",
    "crop_size": "crop",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "max_iter": "max_iters",
    "iterations": "max_iters",
    "accumulation_steps": "iter_size",
    "arch": "model",
    "workers": "num_workers",
    "gpu": "use_gpu",
    "precision": "amp",
}


def make_config(cls: type, values: dict[str, Any], *, source: str = "config") -> Any:
    """Build config model `cls` from a flat dict, naming `source` (the file) in every error.

    Unknown keys get a did-you-mean hint, missing required keys are listed, and pydantic converts each
    value to its field's type (nested models included) or says which key holds what it could not convert.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        hint = [SYNONYMS[unknown[0]]] if SYNONYMS.get(unknown[0]) in known else []
        hint = hint or difflib.get_close_matches(unknown[0], known, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UserError(
            f"{source}: unknown key(s) {', '.join(unknown)}{suggestion}; valid keys: {', '.join(sorted(known))}"
        )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(
            f"{source}: missing required key(s) {', '.join(missing)}; add them (key: value) to the file"
        )
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as err:
        raise UserError(f"{source}: " + "; ".join(_describe(e) for e in err.errors())) from None


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"missing required key {key}"
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown key {key}"
    return f"{key}: {error['msg'].lower()}, got {error['input']!r}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML mapping; a missing file or a non-mapping gives an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; recipes ship in {CONFIG_DIR}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def parse_key_values(pairs: list[str] | None, *, option: str) -> dict[str, Any]:
    """`["width=0.25", "backbone=resnet18"]` -> {"width": 0.25, "backbone": "resnet18"} (YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"{option} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(raw) if raw else ""
    return out


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`values` with `overrides` on top (None values ignored); `model_args` are merged key by key.

    `epochs` and `max_iters` say the same thing in two units: an override giving one of them drops the
    other from `values` (unless the overrides give both), so `--epochs 1` shortens a max_iters recipe.
    """
    for key, other in (("epochs", "max_iters"), ("max_iters", "epochs")):
        if overrides.get(key) is not None and overrides.get(other) is None:
            values.pop(other, None)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "model_args":
            values["model_args"] = {**values.get("model_args", {}), **value}
        else:
            values[key] = value
    return values


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Recipe file (optional) + overrides (None values ignored) -> TrainConfig."""
    values = apply_overrides(read_yaml(path) if path else {}, overrides)
    return make_config(TrainConfig, values, source=str(path) if path else "train options")
