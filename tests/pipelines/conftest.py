"""Fixtures for the stage tests: one prepared synthetic VOC dataset per session, tiny training settings."""

from __future__ import annotations

import logging
import os
import shutil
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
    "system_metrics_s": 1.0,  # a sample a second: runs of seconds still log MLflow system metrics
}


@pytest.fixture(scope="session")
def prepared_voc(tmp_path_factory, ray_session) -> str:
    """`segpipe synth --layout voc` -> `segpipe prepare`, once per test session."""
    from pipelines.data.prepare import PrepareConfig, prepare
    from pipelines.data.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("voc")
    src = synthesize(SynthConfig(layout="voc", out=str(root / "src"), num_train=64, num_val=12, seed=3))
    out = str(root / "prepared")
    prepare(PrepareConfig(dataset="voc", root=str(src), out=out))
    return out


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """A new MLflow sqlite store, its tables made once per session (MLflow's migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, empty_mlflow_db) -> str:
    """A store of this test's own: a copy of the empty one."""
    path = tmp_path / "mlruns" / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_mlflow_db, path)
    return f"sqlite:///{path}"


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


S3_BUCKET = "segpipe-test"


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """Point the AWS variables at moto and create an empty bucket; returns its s3:// URI."""
    import boto3

    for name, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    client = boto3.client("s3")
    client.create_bucket(Bucket=S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=S3_BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=S3_BUCKET)


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

    from pipelines.data.dataset import open_prepared
    from segmodels import build_model
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
        spec = ModelSpec.single(f"candidate{seed}", member, data.classes, data.palette)
        return save_model_dir(path, spec, [net.state_dict()])

    return make


# Random-weight networks at a sixteenth of the channels: inference plumbing does not care what they learned.
TINY_MEMBERS = {"fcn8s": {"width": 0.0625}, "deeplab_largefov": {"width": 0.0625}}


@pytest.fixture
def model_folder(tmp_path):
    """Factory: a model folder (model.json + safetensors) of tiny random networks for the given classes."""
    import torch

    import segmodels
    from segmodels.artifact import MemberSpec, ModelSpec, save_model_dir

    def make(classes, palette, archs=("deeplab_largefov",), name="tiny", seed=0) -> Path:
        members, states = [], []
        for i, arch in enumerate(archs):
            torch.manual_seed(seed + i)
            net = segmodels.build_model(arch, len(classes), **TINY_MEMBERS[arch])
            states.append(net.state_dict())
            members.append(
                MemberSpec(
                    arch=arch,
                    num_classes=len(classes),
                    weights=f"member{i}.safetensors",
                    model_args=TINY_MEMBERS[arch],
                )
            )
        spec = ModelSpec(
            name=name,
            classes=list(classes),
            palette=[list(c) for c in palette],
            members=members,
            ensemble_weights=[1.0] * len(archs),
            mean=list(segmodels.IMAGENET_MEAN),
            std=list(segmodels.IMAGENET_STD),
        )
        return save_model_dir(tmp_path / name, spec, states)

    return make


@pytest.fixture(scope="session")
def tricky_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Uploads that decoders disagree on: name -> (file bytes, (height, width) as a viewer shows it).

    A 16-bit grey PNG, a JPEG stored 40 x 28 with EXIF orientation 6 (shown rotated, 28 x 40), a CMYK JPEG
    and a palette PNG with a transparent entry.
    """
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(11)

    def encoded(image, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    photo = Image.fromarray(rng.integers(0, 256, (28, 40, 3), dtype=np.uint8)).resize((40, 28))
    grey16 = np.tile(np.array([0, 300, 40000, 65535], np.uint16), (24, 8))  # 24 x 32
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return {
        "grey16.png": (encoded(Image.fromarray(grey16), "PNG"), (24, 32)),
        "rotated.jpg": (encoded(photo, "JPEG", exif=exif.tobytes(), quality=95), (40, 28)),
        "cmyk.jpg": (encoded(photo.convert("CMYK"), "JPEG", quality=95), (28, 40)),
        "transparent.png": (encoded(palette, "PNG", transparency=0), (28, 40)),
    }


@pytest.fixture
def downloads_removed(tmp_path, monkeypatch):
    """Temporary files of this process go to a fresh folder; after the test, no downloaded model folder
    (`segpipe-model-*`) may be left in it."""
    import tempfile

    scratch = tmp_path / "tempdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield scratch
    left = sorted(p.name for p in scratch.glob("segpipe-model-*"))
    assert not left, f"model downloads left behind: {left}"
