"""A self-describing model folder: `model.json` + one safetensors file per member. Never unpickled.

One trained network is an ensemble of one member; `segpipe ensemble` writes several. Everything needed
to rebuild and run the model (architectures and their arguments, classes, palette, normalisation,
input scale, ensemble weights, CRF parameters, metrics, dataset fingerprint) is in `model.json`, so
loading needs only segmodels and the folder.

Input conventions: `LoadedModel.normalize` turns uint8 pixels into the model-level representation
(ImageNet-normalised RGB, `ModelSpec.mean/std`); each member whose own `InputConvention` differs (a Caffe
release takes BGR 0-255 minus a mean) is wrapped by `load_member` in a `ConventionAdapter` that converts
that representation into the member's. So every consumer that goes through `normalize` + the members
(evaluate, predict, serve, ensembles mixing conventions) feeds each network what it was trained on.
Format version 1 folders have no conventions and load as ImageNet RGB 0-1, as before.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from segmodels.transforms import IMAGENET_MEAN, IMAGENET_STD

FORMAT = "segpipe-model"
FORMAT_VERSION = 2  # 2: members carry an `input` convention (absent in 1 = ImageNet RGB 0-1)
SPEC_FILE = "model.json"
CHANNEL_ORDERS = ("rgb", "bgr", "gray")
# Each channel order as rows over R, G, B: gray is ITU-R 601 luma, as PIL's "L" conversion.
CHANNEL_MIX = {
    "rgb": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "bgr": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),
    "gray": ((0.299, 0.587, 0.114),),
}
VALUE_SCALES = (1.0, 255.0)


@dataclass(frozen=True)
class InputConvention:
    """How one member network expects its input: x = (pixels[channel_order] * scale/255 - mean) / std.

    `mean` and `std` are in the member's channel order and value scale, one value per channel: ImageNet
    RGB 0-1 (segpipe's own training) is the default; the Caffe releases are `bgr`, scale 255, their mean,
    std 1; U-Net's release reads one `gray` channel of raw 0-255 values.
    """

    channel_order: str = "rgb"
    scale: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        if float(self.scale) not in VALUE_SCALES:
            raise ValueError(f"scale must be 1 (pixels 0-1) or 255 (pixels 0-255), got {self.scale!r}")
        channels = len(CHANNEL_MIX[self.channel_order])
        if len(self.mean) != channels or len(self.std) != channels or any(s <= 0 for s in self.std):
            raise ValueError(
                f"mean and std need {channels} value(s) each for {self.channel_order}, std > 0; "
                f"got {self.mean!r}, {self.std!r}"
            )
        # JSON gives lists: store tuples so equal conventions compare (and hash) equal.
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


@dataclass(frozen=True)
class MemberSpec:
    """One network of the model: rebuilt by `build_model(arch, num_classes, **model_args)`."""

    arch: str
    num_classes: int
    weights: str
    model_args: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    input: InputConvention = field(default_factory=InputConvention)

    def __post_init__(self) -> None:
        if isinstance(self.input, dict):  # read from model.json
            object.__setattr__(self, "input", InputConvention(**self.input))


@dataclass(frozen=True)
class ModelSpec:
    """The whole model: members, how their probabilities combine, and how to pre/post-process."""

    name: str
    classes: list[str]
    palette: list[list[int]]
    members: list[MemberSpec]
    ensemble_weights: list[float]
    mean: list[float]
    std: list[float]
    input_scale: float = 1.0
    ignore_index: int = 255
    crf: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset_fingerprint: str = ""

    @classmethod
    def single(cls, name: str, member: MemberSpec, classes, palette, **fields: Any) -> ModelSpec:
        """A one-network model normalised with ImageNet's statistics (the member keeps its own convention)."""
        return cls(
            name=name,
            classes=list(classes),
            palette=[list(p) for p in palette],
            members=[member],
            ensemble_weights=[1.0],
            mean=list(IMAGENET_MEAN),
            std=list(IMAGENET_STD),
            **fields,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a segpipe model (format={data.get('format')!r}, expected {FORMAT!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"model format version {data['format_version']} is newer than this segpipe "
                f"({FORMAT_VERSION}); upgrade segpipe"
            )
        body = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        body["members"] = [MemberSpec(**m) for m in body["members"]]
        return cls(**body)


def save_model_dir(path: str | Path, spec: ModelSpec, state_dicts: list[dict[str, torch.Tensor]]) -> Path:
    """Write `model.json` and each member's weights (contiguous CPU tensors) into folder `path`."""
    if len(state_dicts) != len(spec.members):
        raise ValueError(f"{len(spec.members)} members but {len(state_dicts)} state dicts")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for member, state in zip(spec.members, state_dicts, strict=True):
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, str(path / member.weights), metadata={"arch": member.arch})
    (path / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return path


def read_spec(path: str | Path) -> ModelSpec:
    file = Path(path) / SPEC_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a segpipe model folder")
    return ModelSpec.from_json(json.loads(file.read_text()))


class ConventionAdapter(nn.Module):
    """Feeds `network` its own input convention: forward(x: N,3,H,W in `source` convention) -> its output.

    The conversion is one affine map per pixel across channels (a gain and shift per channel, a channel
    flip for rgb <-> bgr, luma for gray), so it commutes with the resizing, flipping and sliding of
    `segmodels.inference`.
    """

    def __init__(self, network: nn.Module, target: InputConvention, source: InputConvention) -> None:
        super().__init__()
        self.network = network
        self.num_classes = getattr(network, "num_classes", None)
        self.arch = getattr(network, "arch", type(network).__name__)
        if source.channel_order == "gray":
            raise ValueError("the source convention must have 3 channels (rgb or bgr)")
        f64 = torch.float64
        # source value v -> RGB pixel p (0-1) = S^T (v * std_s + mean_s) / scale_s, with S the source's rows
        # over RGB (a permutation); target channel c = (scale_t * (T p)_c - mean_t_c) / std_t_c, with T the
        # target's rows over RGB. So x_t = A v + b: computed in float64, stored as float32.
        rows_s = torch.tensor(CHANNEL_MIX[source.channel_order], dtype=f64)
        rows_t = torch.tensor(CHANNEL_MIX[target.channel_order], dtype=f64)
        s_mean, s_std = (torch.tensor(v, dtype=f64) / source.scale for v in (source.mean, source.std))
        t_mean, t_std = (torch.tensor(v, dtype=f64) for v in (target.mean, target.std))
        to_rgb = rows_s.T  # v-space -> RGB
        matrix = target.scale * (rows_t @ to_rgb) * s_std / t_std[:, None]
        shift = (target.scale * rows_t @ (to_rgb @ s_mean) - t_mean) / t_std
        self.register_buffer("matrix", matrix.float(), persistent=False)
        self.register_buffer("shift", shift.float().view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> Any:
        mixed = torch.einsum("ck,nkhw->nchw", self.matrix.to(x.dtype), x)
        return self.network(mixed + self.shift.to(x.dtype))


def load_member(
    folder: str | Path,
    member: MemberSpec,
    device: str | torch.device = "cpu",
    source: InputConvention | None = None,
) -> torch.nn.Module:
    """Rebuild one member network and load its safetensors weights strictly, in eval mode.

    Inputs are expected in the `source` convention (default: the model-level ImageNet RGB 0-1 that
    `LoadedModel.normalize` produces); a member with another convention comes wrapped in a
    `ConventionAdapter`.
    """
    from segmodels import build_model

    model = build_model(member.arch, member.num_classes, **member.model_args)
    model.load_state_dict(load_file(str(Path(folder) / member.weights), device=str(device)))
    source = source or InputConvention()
    if member.input != source:
        model = ConventionAdapter(model, member.input, source)
    return model.to(device).eval()


@dataclass
class LoadedModel:
    """A model folder in memory: the spec and the probability-averaging ensemble of its members."""

    spec: ModelSpec
    ensemble: torch.nn.Module
    folder: Path

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.spec.mean).view(1, 3, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.spec.std).view(1, 3, 1, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB N,H,W,3 -> float N,3,H,W normalised with the model-level statistics.

        Members with another input convention convert this themselves (`ConventionAdapter`).
        """
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Folder written by `save_model_dir` -> LoadedModel whose `.ensemble(x)` returns N,C,H,W probabilities."""
    from segmodels.ensemble import Ensemble

    spec = read_spec(path)
    source = InputConvention(mean=tuple(spec.mean), std=tuple(spec.std))
    members = [load_member(path, m, device, source) for m in spec.members]
    ensemble = Ensemble(members, weights=spec.ensemble_weights).to(device).eval()
    return LoadedModel(spec=spec, ensemble=ensemble, folder=Path(path))
