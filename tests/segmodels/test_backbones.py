"""Backbone trunks keep torchvision's layout, and torchvision ImageNet state dicts load into them by key.

The source state dicts come from torchvision's own constructors (random weights, nothing downloaded),
saved once per module as .safetensors / .pth. Full-width targets are built on `meta` and materialised
uninitialised with `to_empty`, so the cost is the memory copy only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import segmodels
from segmodels._blocks import DilatedResNet, VGG16Features


@pytest.fixture(scope="module")
def imagenet_files(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """name -> (file, state dict) for torchvision vgg16 (.safetensors), vgg16_bn (.pth), resnet50, resnet18."""
    folder = tmp_path_factory.mktemp("imagenet")
    files = {}
    for name, suffix in (
        ("vgg16", "safetensors"),
        ("vgg16_bn", "pth"),
        ("resnet50", "safetensors"),
        ("resnet18", "pth"),
    ):
        torch.manual_seed(0)
        state = getattr(torchvision.models, name)(weights=None).state_dict()
        path = folder / f"{name}.{suffix}"
        if suffix == "safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)
        files[name] = (path, state)
    return files


def on_meta(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return segmodels.build_model(name, 21, **kw)


def materialised(name: str, **kw) -> nn.Module:
    return on_meta(name, **kw).to_empty(device="cpu")


def assert_features_equal(model: nn.Module, source: dict[str, torch.Tensor], prefix: str = "") -> None:
    target = model.state_dict()
    keys = [k for k in source if not k.startswith(("classifier.", "fc."))]
    assert keys and all(torch.equal(target[prefix + k], source[k]) for k in keys)


@pytest.mark.parametrize(("batch_norm", "name"), [(False, "vgg16"), (True, "vgg16_bn")])
def test_vgg_trunk_has_torchvision_layout(batch_norm: bool, name: str) -> None:
    with torch.device("meta"):
        ours = VGG16Features(batch_norm=batch_norm).state_dict()
        theirs = getattr(torchvision.models, name)().features.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_dilated_resnet_has_output_stride_8(name: str) -> None:
    with torch.device("meta"):
        trunk = DilatedResNet(name)
        layer3, layer4 = trunk(torch.zeros(1, 3, 96, 128))
    assert layer3.shape[-2:] == layer4.shape[-2:] == (12, 16)
    assert (layer3.shape[1], layer4.shape[1]) == (trunk.layer3_channels, trunk.out_channels)


@pytest.mark.parametrize(
    ("name", "stem", "layer3_rates"),
    [("resnet50_v1c", (32, 32, 64), (1, 2)), ("resnet50_deepbase", (64, 64, 128), (2, 2))],
)
def test_deep_stem_trunks(name: str, stem: tuple[int, ...], layer3_rates: tuple[int, int]) -> None:
    with torch.device("meta"):
        trunk = DilatedResNet(name)
        layer3, layer4 = trunk(torch.zeros(1, 3, 96, 128))
    assert layer3.shape[-2:] == layer4.shape[-2:] == (12, 16)
    convs = [m for m in trunk.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(stem) and convs[0].stride == (2, 2)
    assert not hasattr(trunk, "conv1") and trunk.layer1[0].conv1.in_channels == stem[-1]
    assert (trunk.layer3[0].conv2.dilation[0], trunk.layer3[1].conv2.dilation[0]) == layer3_rates
    assert trunk.layer4[1].conv2.dilation == (4, 4)


def test_deep_stem_has_no_torchvision_weights(imagenet_files) -> None:
    path, _ = imagenet_files["resnet50"]
    model = on_meta("pspnet", backbone="resnet50_v1c")
    with pytest.raises(ValueError, match="import-weights"):
        segmodels.load_backbone_weights(model, path)


def test_vgg16_into_fcn8s(imagenet_files) -> None:
    path, source = imagenet_files["vgg16"]
    model = materialised("fcn8s")
    missing, unexpected = segmodels.load_backbone_weights(model, path)
    assert_features_equal(model, source)
    assert torch.equal(model.fc6[0].weight, source["classifier.0.weight"].view(4096, 512, 7, 7))
    assert torch.equal(model.fc7[0].weight, source["classifier.3.weight"].view(4096, 4096, 1, 1))
    assert torch.equal(model.fc7[0].bias, source["classifier.3.bias"])
    assert {k.split(".")[0] for k in missing} == {"score_fr", "score_pool4", "score_pool3", "upscore2",
                                                   "upscore_pool4", "upscore8"}  # fmt: skip
    assert sorted(unexpected) == ["classifier.6.bias", "classifier.6.weight"]


def test_vgg16_into_deeplab_decimates_fc6_fc7(imagenet_files) -> None:
    path, source = imagenet_files["vgg16"]
    model = materialised("deeplab_largefov")
    missing, _ = segmodels.load_backbone_weights(model, path)
    assert_features_equal(model, source)
    fc6 = source["classifier.0.weight"].view(4096, 512, 7, 7)
    assert torch.equal(model.fc6[0].weight[10, 7], fc6[40, 7][[0, 3, 6]][:, [0, 3, 6]])
    assert torch.equal(model.fc6[0].bias, source["classifier.0.bias"][::4])
    assert torch.equal(model.fc7[0].weight[5, :, 0, 0], source["classifier.3.weight"][20, ::4])
    assert sorted(missing) == ["fc8.bias", "fc8.weight"]


def test_vgg16_into_dilation_front_end(imagenet_files) -> None:
    path, source = imagenet_files["vgg16"]
    model = materialised("dilation", context="basic")
    missing, _ = segmodels.load_backbone_weights(model, path)
    assert_features_equal(model, source)
    assert torch.equal(model.fc6[0].weight, source["classifier.0.weight"].view(4096, 512, 7, 7))
    assert {k.split(".")[0] for k in missing} == {"final", "context"}


def test_vgg16_bn_pth_into_deconvnet(imagenet_files) -> None:
    path, source = imagenet_files["vgg16_bn"]
    model = materialised("deconvnet")
    missing, unexpected = segmodels.load_backbone_weights(model, path)
    assert_features_equal(model, source)
    assert torch.equal(model.fc6[0].weight, source["classifier.0.weight"].view(4096, 512, 7, 7))
    assert "fc6.1.running_var" in missing and "score.weight" in missing
    assert not any(k.startswith("features.") for k in missing)
    assert sorted(unexpected) == ["classifier.6.bias", "classifier.6.weight"]


@pytest.mark.parametrize("backbone", ["resnet50", "resnet18"])
def test_resnet_into_pspnet(imagenet_files, backbone: str) -> None:
    path, source = imagenet_files[backbone]
    model = materialised("pspnet", backbone=backbone)
    missing, unexpected = segmodels.load_backbone_weights(model, path)
    assert_features_equal(model, source, prefix="backbone.")
    assert {k.split(".")[0] for k in missing} == {"ppm", "classifier", "aux_classifier"}
    assert sorted(unexpected) == ["fc.bias", "fc.weight"]


def test_wrong_weights_are_clear_errors(imagenet_files, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not hold vgg16 ImageNet weights for fcn8s"):
        segmodels.load_backbone_weights(on_meta("fcn8s"), imagenet_files["resnet50"][0])
    with pytest.raises(ValueError, match="does not hold vgg16_bn ImageNet weights for deconvnet"):
        segmodels.load_backbone_weights(on_meta("deconvnet"), imagenet_files["vgg16"][0])
    with pytest.raises(ValueError, match="layer1.0.conv1.weight has shape .* pass a torchvision resnet18"):
        segmodels.load_backbone_weights(on_meta("pspnet", backbone="resnet18"), imagenet_files["resnet50"][0])
    with pytest.raises(ValueError, match="width=0.0625; rebuild it with width=1.0"):
        segmodels.load_backbone_weights(
            segmodels.build_model("fcn8s", 21, width=1 / 16), imagenet_files["vgg16"][0]
        )
    with pytest.raises(ValueError, match="unet is trained from scratch"):
        segmodels.load_backbone_weights(on_meta("unet", width=1 / 16), imagenet_files["vgg16"][0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        segmodels.load_backbone_weights(on_meta("fcn8s"), tmp_path / "absent.safetensors")
    (tmp_path / "vgg16.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"must end in \.safetensors, \.pth or \.pt"):
        segmodels.load_backbone_weights(on_meta("fcn8s"), tmp_path / "vgg16.bin")
    torch.save({"epoch": 3, "state_dict": {}}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="not a plain state dict"):
        segmodels.load_backbone_weights(on_meta("fcn8s"), tmp_path / "checkpoint.pth")
