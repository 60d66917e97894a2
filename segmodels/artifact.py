"""A self-describing model folder: `model.json` + one safetensors file per member. Never unpickled.

One trained network is an ensemble of one member; `segpipe ensemble` writes several. Everything needed
to rebuild and run the model (architectures and their arguments, classes, palette, normalisation,
input scale, ensemble weights, CRF parameters, metrics, dataset fingerprint) is in `model.json`, so
loading needs only segmodels and the folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "segpipe-model"
FORMAT_VERSION = 1
SPEC_FILE = "model.json"


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


def load_member(
    folder: str | Path, member: MemberSpec, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Rebuild one member network and load its safetensors weights strictly, in eval mode."""
    from segmodels import build_model

    model = build_model(member.arch, member.num_classes, **member.model_args)
    model.load_state_dict(load_file(str(Path(folder) / member.weights), device=str(device)))
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
        """uint8 N,H,W,3 -> float N,3,H,W normalised with the model's own statistics."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Folder written by `save_model_dir` -> LoadedModel whose `.ensemble(x)` returns N,C,H,W probabilities."""
    from segmodels.ensemble import Ensemble

    spec = read_spec(path)
    members = [load_member(path, m, device) for m in spec.members]
    ensemble = Ensemble(members, weights=spec.ensemble_weights).to(device).eval()
    return LoadedModel(spec=spec, ensemble=ensemble, folder=Path(path))
