"""The eight registered models: I/O contract, paper parameter counts and costs, registry, paper-specific parts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segmodels
from segmodels._blocks import bilinear_upsampling
from segmodels.complexity import count_gmacs, count_params
from segmodels.dilation import ContextModule
from segmodels.unet import VALID_MARGIN, mirror_pad, valid_input

# Tiny instances of the same architectures for CPU tests.
TINY = {name: {"width": 1 / 16} for name in segmodels.MODELS} | {"pspnet": {"backbone": "resnet18"}}
NUM_CLASSES = 5


def build_tiny(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return segmodels.build_model(name, NUM_CLASSES, **(TINY[name] | kw))


def build_meta(name: str, num_classes: int = 21, **kw) -> nn.Module:
    with torch.device("meta"):
        return segmodels.build_model(name, num_classes, **kw)


@pytest.mark.parametrize("size", [(97, 131), (64, 64)])
@pytest.mark.parametrize("name", segmodels.MODELS)
def test_contract(name: str, size: tuple[int, int]) -> None:
    model = build_tiny(name)
    assert model.arch == name and model.num_classes == NUM_CLASSES
    x = torch.randn(2, 3, *size)

    model.train()
    output = model(x)
    if name == "pspnet":
        assert set(output) == {"out", "aux"}
        assert output["aux"].shape == (2, NUM_CLASSES, *size)
        loss = output["out"].square().mean() + output["aux"].square().mean()
        output = output["out"]
    else:
        loss = output.square().mean() + output.mean()
    assert output.shape == (2, NUM_CLASSES, *size) and output.dtype == torch.float32
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)

    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert isinstance(first, torch.Tensor) and first.shape == (2, NUM_CLASSES, *size)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", segmodels.MODELS)
def test_param_groups_cover_every_parameter_once(name: str) -> None:
    model = build_meta(name)
    groups = model.param_groups()
    assert set(groups) == {"backbone", "head"} and groups["backbone"] and groups["head"]
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("name", "head_params"),
    [
        ("deeplab_largefov", {"fc8.weight", "fc8.bias"}),
        ("unet", {"final.weight", "final.bias"}),
        ("fcn32s", {"score_fr.weight", "score_fr.bias", "upscore.weight"}),
    ],
)
def test_head_is_the_new_layers(name: str, head_params: set[str]) -> None:
    model = build_meta(name)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in model.param_groups()["head"]} == head_params


@pytest.mark.parametrize(
    ("name", "num_classes", "kwargs", "paper"),
    [
        ("fcn8s", 21, {}, 134.5e6),
        ("deconvnet", 21, {}, 251.8e6),
        ("deeplab_largefov", 21, {}, 20.5e6),
        ("unet", 2, {"in_channels": 1}, 31.03e6),
        ("pspnet", 21, {}, 46.6e6),
        ("pspnet", 21, {"backbone": "resnet101"}, 65.6e6),
    ],
)
def test_paper_parameter_counts(name: str, num_classes: int, kwargs: dict, paper: float) -> None:
    model = build_meta(name, num_classes, **kwargs)
    assert count_params(model) == pytest.approx(paper, rel=0.005)


@pytest.mark.parametrize(("kind", "paper"), [("basic", 28.4e3), ("large", 6.8e6)])
def test_context_module_parameter_counts(kind: str, paper: float) -> None:
    model = build_meta("dilation", context=kind)
    assert isinstance(model.context, ContextModule) and model.context.kind == kind
    assert count_params(model.context) == pytest.approx(paper, rel=0.005)
    assert count_params(model) - count_params(build_meta("dilation", context=None)) == count_params(
        model.context
    )


def test_pspnet_aux_head_only_counted_on_request() -> None:
    model = build_meta("pspnet")
    aux = sum(p.numel() for p in model.aux_classifier.parameters())
    assert aux > 0 and count_params(model, exclude_aux=False) == count_params(model) + aux
    assert count_params(build_meta("pspnet", aux=False)) == count_params(model)


def test_fcn8s_cost_matches_caffe_pad100_figure() -> None:
    # PAPERS.md: ~182 GMAC at 500x500 with conv1_1 padded by 100 (~108 without).
    assert count_gmacs(build_meta("fcn8s"), (500, 500)) == pytest.approx(182, rel=0.01)


@pytest.mark.parametrize("kind", ["basic", "large"])
def test_context_receptive_field_is_67(kind: str) -> None:
    # Positive weights and inputs keep every ReLU open, so no gradient inside the field is zero by chance.
    torch.manual_seed(0)
    context = ContextModule(21 if kind == "basic" else 2, kind).double()
    with torch.no_grad():
        for p in context.parameters():
            p.uniform_(0.01, 0.1)
    x = torch.rand(1, context[0].in_channels, 81, 81, dtype=torch.float64, requires_grad=True)
    context(x)[0, :, 40, 40].sum().backward()
    rows, cols = x.grad[0].abs().sum(0).nonzero(as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (40 - 33, 40 + 33)
    assert (cols.min().item(), cols.max().item()) == (40 - 33, 40 + 33)
    assert len(rows) == 67 * 67


@pytest.mark.parametrize(("kind", "noise_std"), [("basic", None), ("large", 0.0)])
def test_context_identity_init_is_exact(kind: str, noise_std: float | None) -> None:
    context = ContextModule(21, kind, noise_std=noise_std)
    x = torch.rand(2, 21, 16, 16)
    with torch.no_grad():
        assert torch.allclose(context(x), x, rtol=0, atol=1e-6)


def test_large_context_default_init_is_identity_plus_small_noise() -> None:
    torch.manual_seed(0)
    context = ContextModule(21, "large")
    x = torch.rand(2, 21, 16, 16)
    with torch.no_grad():
        error = (context(x) - x).abs().max().item()
    assert 0 < error < 0.1


def test_dilation_without_context() -> None:
    model = build_tiny("dilation", context=None)
    assert model.context is None
    assert model(torch.randn(1, 3, 40, 48)).shape == (1, NUM_CLASSES, 40, 48)
    with pytest.raises(ValueError, match="'basic', 'large' or None"):
        build_tiny("dilation", context="huge")


def test_fcn_skips_start_at_zero_and_upsampling_is_bilinear() -> None:
    model = build_tiny("fcn8s")
    for score in (model.score_fr, model.score_pool4, model.score_pool3):
        assert not score.weight.any() and not score.bias.any()
    assert model.upscore2.weight.requires_grad and not model.upscore8.weight.requires_grad
    # A bilinear x4 transposed conv maps a linear ramp to a linear ramp with a quarter of the slope.
    up = bilinear_upsampling(1, 4)
    ramp = torch.arange(10.0).repeat(10, 1)[None, None]
    with torch.no_grad():
        row = up(ramp)[0, 0, 20, 8:32]
    assert torch.allclose(row.diff(), torch.full_like(row.diff(), 0.25))


def test_fcn_release_options_fix_upsampling_and_scale_skips() -> None:
    plain, release = build_tiny("fcn8s"), build_tiny("fcn8s", fixed_upsampling=True, at_once=True)
    assert plain.upscore2.weight.requires_grad and not release.upscore2.weight.requires_grad
    assert not release.upscore_pool4.weight.requires_grad and not release.upscore8.weight.requires_grad
    release.load_state_dict(plain.state_dict())  # same parameters: the options change behaviour only
    seen: dict[tuple[str, str], torch.Tensor] = {}
    x = torch.randn(1, 3, 40, 40)
    for tag, model in (("plain", plain), ("release", release)):
        for skip in ("score_pool4", "score_pool3"):
            getattr(model, skip).register_forward_hook(
                lambda m, i, o, key=(tag, skip): seen.update({key: i[0]})
            )
        model.eval()(x)
    torch.testing.assert_close(seen[("release", "score_pool4")] * 100, seen[("plain", "score_pool4")])
    torch.testing.assert_close(seen[("release", "score_pool3")] * 1e4, seen[("plain", "score_pool3")])


def test_deconvnet_at_224_has_the_papers_1x1_fc_bottleneck() -> None:
    model = build_tiny("deconvnet").eval()
    seen = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            seen[name] = output.shape

        return hook

    model.fc7.register_forward_hook(record("fc7"))
    model.deconv_fc6.register_forward_hook(record("deconv_fc6"))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert seen["fc7"][-2:] == (1, 1) and seen["deconv_fc6"][-2:] == (7, 7)


def test_unet_valid_tiles_follow_the_paper() -> None:
    assert valid_input(388) == 572  # the paper's 572 -> 388 tile
    model = build_tiny("unet", in_channels=1, padding="same")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 1, 50, 70)).shape == (2, NUM_CLASSES, 50, 70)


def test_mirror_pad_extends_beyond_the_image_size() -> None:
    x = torch.arange(2 * 5 * 6.0).view(1, 2, 5, 6)
    assert torch.equal(mirror_pad(x, 3, 4, 2, 5), torch.nn.functional.pad(x, (2, 5, 3, 4), mode="reflect"))
    rows = mirror_pad(torch.arange(4.0).view(1, 1, 4, 1).repeat(1, 1, 1, 2), 7, 7, 0, 0)[0, 0, :, 0].tolist()
    assert rows == [1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2]


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_unet_takes_a_one_pixel_side(padding: str) -> None:
    model = build_tiny("unet", in_channels=1, padding=padding).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 1, 9)).shape == (1, NUM_CLASSES, 1, 9)
        assert model(torch.randn(1, 1, 7, 1)).shape == (1, NUM_CLASSES, 7, 1)
    assert torch.equal(mirror_pad(torch.tensor([[[[4.0]]]]), 2, 1, 0, 3), torch.full((1, 1, 4, 4), 4.0))


def test_unet_valid_centre_sees_only_the_crop() -> None:
    """On a valid tile (16k + 124) the centre the overlap-tile loss keeps never sees the mirrored border."""
    model = build_tiny("unet", in_channels=1).eval().double()
    image = torch.randn(1, 1, 240, 236, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    side = valid_input(20)  # 204 -> a 20 x 20 valid centre
    crop = image[..., 32 : 32 + side, 16 : 16 + side]  # offsets multiple of 16: the same pooling phase
    with torch.no_grad():
        whole, cropped = model(image), model(crop)
    m = VALID_MARGIN
    centre = whole[..., 32 + m : 32 + side - m, 16 + m : 16 + side - m]
    assert torch.allclose(cropped[..., m:-m, m:-m], centre, rtol=0, atol=1e-9)
    assert not torch.allclose(cropped[..., :m, :m], whole[..., 32 : 32 + m, 16 : 16 + m], atol=1e-3)


def test_deeplab_msc_parameters_follow_the_layer_definitions() -> None:
    """Five branches (input, pool1..pool4): 3x3 conv to 128, 1x1 to 128, 1x1 to C, each with biases."""
    classes, hidden = 21, 128
    per_branch = [
        c * 9 * hidden + hidden + hidden * hidden + hidden + hidden * classes + classes
        for c in (3, 64, 128, 256, 512)
    ]
    plain, msc = build_meta("deeplab_largefov", classes), build_meta("deeplab_largefov", classes, msc=True)
    assert count_params(msc) - count_params(plain) == sum(per_branch)


def test_deeplab_msc_shape_backward_and_sum_with_fc8() -> None:
    model = build_tiny("deeplab_largefov", msc=True)
    assert list(model.multiscale) == ["data", "pool1", "pool2", "pool3", "pool4"]
    x = torch.randn(2, 3, 97, 131)
    out = model.train()(x)
    assert out.shape == (2, NUM_CLASSES, 97, 131)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.multiscale.parameters())
    assert set(model.multiscale.parameters()) <= set(model.param_groups()["head"])

    plain = build_tiny("deeplab_largefov").eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("multiscale.")})
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(model(x), plain(x))
        for branch in model.multiscale.values():
            branch[-1].weight.zero_()
            branch[-1].bias.zero_()
        assert torch.equal(model(x), plain(x))  # the branches only add to fc8's scores
    with pytest.raises(ValueError, match="msc=True needs ceil_mode=False"):
        build_meta("deeplab_largefov", msc=True, ceil_mode=True)


def test_deeplab_pool5a_divides_by_the_padded_window() -> None:
    """pool5a is Caffe's AVE pooling, 3x3 / stride 1 / pad 1: every window divides by 9, padding included."""
    out = build_tiny("deeplab_largefov").pool5a(torch.ones(1, 1, 4, 5))
    assert out.shape == (1, 1, 4, 5)
    assert out[0, 0, 0, 0] == pytest.approx(4 / 9) and out[0, 0, 0, 2] == pytest.approx(6 / 9)
    assert out[0, 0, 1, 1] == 1


@pytest.mark.parametrize("name", ["deeplab_largefov", "dilation"])
def test_output_stride_is_8(name: str) -> None:
    model = build_tiny(name)
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 64, 96)).shape[-2:] == (8, 12)


def test_width_scales_the_vgg_family() -> None:
    model = build_tiny("fcn8s")
    convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs == [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]
    assert model.fc6[0].out_channels == model.fc7[0].out_channels == 256


def test_wrong_channel_count_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unet was built with in_channels=1 but got a 3-channel input"):
        build_tiny("unet", in_channels=1)(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="fcn8s was built with in_channels=3 but got a 1-channel input"):
        build_tiny("fcn8s")(torch.randn(1, 1, 64, 64))


def test_registry_lists_valid_names_and_options() -> None:
    assert segmodels.MODELS == (
        "fcn32s", "fcn16s", "fcn8s", "deconvnet", "deeplab_largefov", "dilation", "unet", "pspnet",
    )  # fmt: skip
    assert set(segmodels.MODEL_REGISTRY) >= set(segmodels.MODELS)
    with pytest.raises(
        ValueError, match="unknown model 'fcn4s'; valid names: fcn32s, fcn16s, fcn8s, deconvnet"
    ):
        segmodels.build_model("fcn4s", 21)
    with pytest.raises(
        TypeError, match="pspnet got unknown option.*width.*valid options: backbone='resnet50', aux"
    ):
        segmodels.build_model("pspnet", 21, width=0.5)
    with pytest.raises(ValueError, match="valid backbones: resnet18, resnet34, resnet50, resnet101"):
        segmodels.build_model("pspnet", 21, backbone="resnet152")


def test_register_model_adds_a_builder() -> None:
    @segmodels.register_model
    def _test_tiny_fcn(*, num_classes: int, width: float = 1 / 16) -> nn.Module:
        return segmodels.build_model("fcn32s", num_classes, width=width)

    try:
        assert segmodels.build_model("_test_tiny_fcn", 3).num_classes == 3
        with pytest.raises(ValueError, match="already registered"):
            segmodels.register_model(_test_tiny_fcn)
    finally:
        del segmodels.MODEL_REGISTRY["_test_tiny_fcn"]
