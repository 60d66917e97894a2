"""Model folders: per-member input conventions applied behind `normalize` + `ensemble`, old folders unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import segmodels
from segmodels.artifact import InputConvention, MemberSpec, ModelSpec, load_model_dir, save_model_dir
from segmodels.transforms import IMAGENET_MEAN, IMAGENET_STD

ARGS = {"width": 1 / 16}
CAFFE_BGR = InputConvention(channel_order="bgr", scale=255, mean=(104.0, 116.7, 122.7), std=(1, 1, 1))


def network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return segmodels.build_model("deeplab_largefov", 3, **ARGS).eval()


def write(folder, networks, conventions) -> None:
    members = [
        MemberSpec(
            arch="deeplab_largefov", num_classes=3, weights=f"m{i}.safetensors", model_args=ARGS, input=conv
        )
        for i, conv in enumerate(conventions)
    ]
    spec = ModelSpec(
        name="t",
        classes=["a", "b", "c"],
        palette=[[0, 0, 0]] * 3,
        members=members,
        ensemble_weights=[1.0] * len(members),
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
    )
    save_model_dir(folder, spec, [n.state_dict() for n in networks])


def preprocess(images: np.ndarray, conv: InputConvention) -> torch.Tensor:
    """Each release's own recipe, written out: reorder channels, rescale, subtract mean, divide by std."""
    x = torch.from_numpy(images).double()
    if conv.channel_order == "bgr":
        x = x.flip(-1)
    x = x / 255.0 * conv.scale
    x = (x - torch.tensor(conv.mean, dtype=torch.float64)) / torch.tensor(conv.std, dtype=torch.float64)
    return x.permute(0, 3, 1, 2).float()


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 20, 28, 3), dtype=np.uint8)


def test_mixed_conventions_each_member_sees_its_own_input(tmp_path, images) -> None:
    nets = [network(0), network(1)]
    write(tmp_path, nets, [InputConvention(), CAFFE_BGR])
    model = load_model_dir(tmp_path)
    with torch.no_grad():
        got = model.ensemble(model.normalize(torch.from_numpy(images)))
        want = sum(
            net(preprocess(images, conv)).softmax(1)
            for net, conv in zip(nets, [InputConvention(), CAFFE_BGR], strict=True)
        )
    torch.testing.assert_close(got, want / 2, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the BGR member alone: its logits from the reference recipe, within float rounding
        adapter = model.ensemble.members[1]
        logits = adapter(model.normalize(torch.from_numpy(images)))
        torch.testing.assert_close(logits, nets[1](preprocess(images, CAFFE_BGR)), atol=1e-3, rtol=1e-4)
    spec = json.loads((tmp_path / "model.json").read_text())
    assert spec["format_version"] == 2
    assert spec["members"][1]["input"] == {
        "channel_order": "bgr",
        "scale": 255.0,
        "mean": [104.0, 116.7, 122.7],
        "std": [1.0, 1.0, 1.0],
    }


def test_format_1_folder_loads_as_imagenet_rgb(tmp_path, images) -> None:
    net = network(2)
    write(tmp_path, [net], [InputConvention()])
    spec = json.loads((tmp_path / "model.json").read_text())
    spec["format_version"] = 1
    del spec["members"][0]["input"]
    (tmp_path / "model.json").write_text(json.dumps(spec))
    model = load_model_dir(tmp_path)
    assert (
        model.ensemble.members[0] is not None
        and type(model.ensemble.members[0]).__name__ == "DeepLabLargeFOV"
    )
    with torch.no_grad():
        got = model.ensemble(model.normalize(torch.from_numpy(images)))
        want = net(segmodels.transforms.normalize(images)).softmax(1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("field", "value"), [("channel_order", "hsv"), ("scale", 100), ("std", (1, 0, 1)), ("mean", (1, 2))]
)
def test_bad_conventions_are_rejected(field, value) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        InputConvention(**{field: value})
