"""Fixtures for the stage tests: one prepared synthetic VOC dataset per session, tiny training settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.config import TrainConfig

# The same architectures as the papers at a fraction of the channels, so a CPU trains them in seconds.
# U-Net with BN ("same" padding): plain VGG nets need ImageNet weights (--pretrained) to train at all.
TINY = {
    "model": "unet",
    "model_args": {"width": 0.125, "padding": "same"},
    "crop": 64,
    "batch_size": 4,
    "epochs": 3,
    "optimizer": "adamw",
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "lr_policy": "poly",
    "scale_min": 0.75,
    "scale_max": 1.25,
    "num_workers": 1,
    "max_failures": 2,
    "num_overlays": 2,
}


@pytest.fixture(scope="session")
def prepared_voc(tmp_path_factory, ray_session) -> str:
    """`segpipe synth --layout voc` -> `segpipe prepare`, once per test session."""
    from pipelines.prepare import PrepareConfig, prepare
    from pipelines.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("voc")
    src = synthesize(SynthConfig(layout="voc", out=str(root / "src"), num_train=64, num_val=12, seed=3))
    out = str(root / "prepared")
    prepare(PrepareConfig(dataset="voc", root=str(src), out=out))
    return out


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.fixture
def tiny_config(prepared_voc, mlflow_uri, tmp_path):
    """TrainConfig factory: tiny settings on the session dataset, storage and MLflow inside tmp_path."""

    def make(**overrides) -> TrainConfig:
        values = {
            **TINY,
            "data": prepared_voc,
            "tracking_uri": mlflow_uri,
            "storage": str(tmp_path / "ray"),
            "experiment": "test",
            **overrides,
        }
        return TrainConfig(**values)

    return make


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test from tmp_path, so the embedded defaults (./mlruns, ./ray_results) land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Path(os.getcwd())


@pytest.fixture(scope="session")
def make_candidate(prepared_voc):
    """Factory of candidate model folders for the session dataset: an untrained tiny U-Net whose output
    bias is raised by `bias[class]`, so candidates differ clearly without training."""
    import torch

    from pipelines.dataset import open_prepared
    from segmodels import IMAGENET_MEAN, IMAGENET_STD, build_model
    from segmodels.artifact import MemberSpec, ModelSpec, save_model_dir

    data = open_prepared(prepared_voc)
    args = {"width": 0.125, "padding": "same"}

    def make(path: Path, seed: int, bias: dict[int, float]) -> Path:
        torch.manual_seed(seed)
        net = build_model("unet", data.num_classes, **args)
        last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            for cls, value in bias.items():
                last.bias[cls] += value
        member = MemberSpec(
            arch="unet", num_classes=data.num_classes, weights="m.safetensors", model_args=args
        )
        spec = ModelSpec(
            name=f"candidate{seed}",
            classes=list(data.classes),
            palette=[list(p) for p in data.palette],
            members=[member],
            ensemble_weights=[1.0],
            mean=list(IMAGENET_MEAN),
            std=list(IMAGENET_STD),
        )
        return save_model_dir(path, spec, [net.state_dict()])

    return make
