"""Loading torchvision ImageNet classifiers (vgg16, vgg16_bn, resnet18/34/50/101) into model backbones.

Files are read locally and never unpickled: `.safetensors` via safetensors, `.pth`/`.pt` via
`torch.load(weights_only=True)`. VGG `features.*` and ResNet trunk keys map one-to-one; VGG's fully
connected fc6/fc7 (`classifier.0`, `classifier.3`) become the 7x7 / 1x1 convolutions fc6/fc7 by reshaping
(FCN section 3.1), and are subsampled by decimation where the model's fc6/fc7 are smaller (DeepLab-LargeFOV
3x3 / 1024 channels: every 4th filter and taps 0, 3, 6, DeepLab section 3.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

# torchvision's VGG classifier: Linear(512*7*7, 4096) -> fc6 (7x7), Linear(4096, 4096) -> fc7 (1x1).
VGG_FC = {"fc6": ("classifier.0", 7), "fc7": ("classifier.3", 1)}
PARAMS = ("weight", "bias")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local `.safetensors` or `.pth`/`.pt` state dict, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; pass a local torchvision state dict")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        raise ValueError(
            f"{path} is not a plain state dict (name -> tensor); save `model.state_dict()` itself"
        )
    raise ValueError(f"weights file {path} must end in .safetensors, .pth or .pt")


def load_backbone_weights(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Copy a torchvision ImageNet state dict at `path` into `model`'s backbone, by key.

    Returns (missing, unexpected): model keys left as initialised (the new head layers) and file keys
    not used (e.g. the 1000-way classifier). Raises ValueError if the file lacks any backbone key or a
    shape differs, naming the torchvision model the architecture expects.
    """
    if not Path(path).is_file():  # the first thing to fix, whatever else is wrong
        raise FileNotFoundError(f"weights file {path} does not exist; pass a local torchvision state dict")
    _check_source(model)
    return load_backbone_state(model, read_state_dict(path), str(path))


def _check_source(model: nn.Module) -> None:
    if getattr(model, "imagenet_source", None) is None:
        arch = getattr(model, "arch", type(model).__name__)
        raise ValueError(
            f"{arch} is trained from scratch in its paper; there are no ImageNet weights to load"
        )


def load_backbone_state(
    model: nn.Module, source: Mapping[str, torch.Tensor], path: str
) -> tuple[list[str], list[str]]:
    """`load_backbone_weights` for tensors already read from `path`, in torchvision's layout: how
    `--pretrained` copies Caffe's VGG16 once its layers are renamed."""
    _check_source(model)
    source_name = model.imagenet_source
    arch = getattr(model, "arch", type(model).__name__)
    target = model.state_dict()
    first = "conv1.weight" if source_name == "resnet" else "features.0.weight"
    ours = target.get(f"backbone.{first}" if source_name == "resnet" else first)
    if model.width != 1.0 and (first not in source or ours is None or source[first].shape != ours.shape):
        raise ValueError(
            f"ImageNet weights need the paper's channels: {arch} was built with width={model.width}; "
            "rebuild it with width=1.0"
        )
    expected = model.backbone_name if source_name == "resnet" else source_name
    if source_name == "resnet" and "_" in expected:
        raise ValueError(
            f"{arch} backbone {expected} has a deep stem that torchvision's ImageNet ResNets lack; import "
            "the released checkpoint with `segpipe import-weights`, or use backbone=resnet50/resnet101"
        )
    if source_name == "resnet":
        mapped, used = _map_resnet(source)
        wanted = [k for k in target if k.startswith("backbone.")]
    else:
        mapped, used = _map_vgg(source, target)
        wanted = [k for k in target if k.startswith("features.")] + [
            f"{fc}.0.{p}" for fc in VGG_FC for p in PARAMS
        ]
    absent = [k for k in wanted if k not in mapped]
    if absent:
        raise ValueError(
            f"{path} does not hold {expected} ImageNet weights for {arch}: {len(absent)} backbone tensors "
            f"missing (first: {', '.join(absent[:3])}); pass a torchvision {expected} state dict"
        )
    wrong = [k for k in mapped if k in target and target[k].shape != mapped[k].shape]
    if wrong:
        key = wrong[0]
        raise ValueError(
            f"{path}: {key} has shape {tuple(mapped[key].shape)} but {arch} expects {tuple(target[key].shape)} "
            f"({len(wrong)} tensors differ); pass a torchvision {expected} state dict"
        )
    extra = [k for k in mapped if k not in target]
    if extra:
        raise ValueError(
            f"{path} has {len(extra)} backbone tensors {arch} lacks (first: {', '.join(extra[:3])}); "
            f"pass a torchvision {expected} state dict"
        )
    model.load_state_dict(mapped, strict=False)
    return [k for k in target if k not in mapped], [k for k in source if k not in used]


@dataclass(frozen=True)
class InitReport:
    """What initialising one model from another did, by tensor name (see `match_tensors`)."""

    copied: list[str]  # same name and shape in both: taken from the source
    skipped: list[str]  # same name, different shape (e.g. a score layer for other classes): own init kept
    kept: list[str]  # not in the source at all (new layers, e.g. FCN-16s score_pool4): own init kept
    unused: list[str]  # source tensors the model has no place for

    def to_json(self) -> dict[str, list[str]]:
        return asdict(self)


def match_tensors(target: Mapping[str, Sequence[int]], source: Mapping[str, Sequence[int]]) -> InitReport:
    """Compare two {name: shape} maps: which target tensors a source can initialise (FCN section 4.2)."""
    copied = [k for k in target if k in source and tuple(source[k]) == tuple(target[k])]
    skipped = [k for k in target if k in source and tuple(source[k]) != tuple(target[k])]
    return InitReport(
        copied=copied,
        skipped=skipped,
        kept=[k for k in target if k not in source],
        unused=[k for k in source if k not in target],
    )


def copy_matching(model: nn.Module, source: Mapping[str, torch.Tensor]) -> InitReport:
    """Copy every tensor of `source` whose name and shape match into `model`; the rest keep their init.

    How FCN-16s starts from a trained FCN-32s and FCN-8s from FCN-16s (FCN section 4.2): all shared
    layers carry over, the new score layers stay as built (zero).
    """
    target = model.state_dict()
    report = match_tensors({k: v.shape for k, v in target.items()}, {k: v.shape for k, v in source.items()})
    model.load_state_dict({k: source[k] for k in report.copied}, strict=False)
    return report


def _map_resnet(source: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """ResNet trunk keys under `backbone.`; the 1000-way `fc` is left out."""
    mapped = {f"backbone.{k}": v for k, v in source.items() if not k.startswith("fc.")}
    return mapped, {k.removeprefix("backbone.") for k in mapped}


def _map_vgg(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """`features.*` by key; classifier.0 / classifier.3 reshaped (and decimated) into fc6.0 / fc7.0."""
    mapped = {k: v for k, v in source.items() if k.startswith("features.")}
    used = set(mapped)
    for fc, (linear, kernel) in VGG_FC.items():
        weight, bias = source.get(f"{linear}.weight"), source.get(f"{linear}.bias")
        if weight is None or bias is None or weight.ndim != 2 or weight.shape[1] % (kernel * kernel):
            continue  # reported as missing by the caller
        conv = weight.reshape(weight.shape[0], -1, kernel, kernel)
        mapped[f"{fc}.0.weight"], mapped[f"{fc}.0.bias"] = _decimate(
            conv, bias, target[f"{fc}.0.weight"].shape
        )
        used |= {f"{linear}.{p}" for p in PARAMS}
    return mapped, used


def _decimate(
    weight: torch.Tensor, bias: torch.Tensor, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsample an O,I,k,k conv (and its bias) to `shape` by taking evenly spaced filters, inputs and taps."""
    out_ch, in_ch, kernel = shape[0], shape[1], shape[2]
    if weight.shape[0] % out_ch or weight.shape[1] % in_ch or kernel > weight.shape[2]:
        return weight, bias  # cannot decimate: the caller's shape check reports the mismatch
    taps = torch.linspace(0, weight.shape[2] - 1, kernel).round().long()
    out_step, in_step = weight.shape[0] // out_ch, weight.shape[1] // in_ch
    weight = weight[::out_step, ::in_step][:, :, taps][:, :, :, taps]
    return weight.contiguous(), bias[::out_step].contiguous()
