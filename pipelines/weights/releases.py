"""The released models' tensor names -> segpipe state-dict keys, model options and input conventions.

Each `map_*` takes the file's tensors (name -> tensor; Caffe blobs flattened to `layer.weight` /
`layer.bias`) and returns a `Converted`: the segpipe keys it fills, the file keys it used, the model
options the file implies and how the release expects its input. Checking that every key is accounted
for and every shape fits is the stage's job (`pipelines.weights.import_weights`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.errors import UserError
from segmodels._blocks import VGG16_CFG
from segmodels.artifact import InputConvention

# The Caffe VGG/FCN releases (and wkentaro/pytorch-fcn, which copies them): BGR, 0-255, minus the mean.
CAFFE_BGR = InputConvention(
    channel_order="bgr", scale=255, mean=(104.00698793, 116.66876762, 122.67891434), std=(1.0, 1.0, 1.0)
)
# DeepLab v1 releases (their test.prototxt mean_value): BGR, 0-255, minus the mean.
DEEPLAB_BGR = InputConvention(
    channel_order="bgr", scale=255, mean=(104.008, 116.669, 122.675), std=(1.0, 1.0, 1.0)
)
# fyu/dilation predict.py: cv2 BGR, 0-255, minus its mean_pixel.
DILATION_BGR = InputConvention(
    channel_order="bgr", scale=255, mean=(102.93, 111.36, 116.52), std=(1.0, 1.0, 1.0)
)
# fyu/dilation's Cityscapes dataset mean (its cityscapes config), BGR, for Dilation10.
DILATION_CITYSCAPES_BGR = InputConvention(
    channel_order="bgr", scale=255, mean=(72.39239876, 82.90891754, 73.15835921), std=(1.0, 1.0, 1.0)
)
# Dilation10 context layers (dilation10_cityscapes_deploy.prototxt), then its fixed ctx_upsample.
DILATION10_CONTEXT = (
    "ctx_conv1_1",
    "ctx_conv1_2",
    "ctx_conv2_1",
    "ctx_conv3_1",
    "ctx_conv4_1",
    "ctx_conv5_1",
    "ctx_conv6_1",
    "ctx_conv7_1",
    "ctx_fc1",
    "ctx_final",
)
# Dilation8 context layers (dilation8_pascal_voc_deploy.prototxt) in the order of segpipe's ContextModule.
DILATION_CONTEXT = (
    "ct_conv1_1",
    "ct_conv1_2",
    "ct_conv2_1",
    "ct_conv3_1",
    "ct_conv4_1",
    "ct_conv5_1",
    "ct_fc1",
    "ct_final",
)
# U-Net's release (u-net-release-2015-10-02, phseg_v5 with normImage = false, scaleImage = 1): the raw
# single-channel 0-255 values, nothing subtracted.
UNET_GRAY = InputConvention(channel_order="gray", scale=255, mean=(0.0,), std=(1.0,))
# hszhao/semseg and MMSegmentation: RGB, 0-255, ImageNet mean/std in 0-255 units.
IMAGENET_255 = InputConvention(
    channel_order="rgb", scale=255, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)
)
FCN_HEADS = (
    "score_fr",
    "score_pool4",
    "score_pool3",
    "upscore",
    "upscore2",
    "upscore_pool4",
    "upscore8",
    "upscore16",
)
AT_ONCE_SCALES = {"scale_pool4": 0.01, "scale_pool3": 1e-4}  # Scale layers of FCN-8s-at-once (lr 0)


@dataclass
class Converted:
    """Tensors mapped onto segpipe keys, the file keys used, and what the file says about the model."""

    arch: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    model_args: dict[str, Any] = field(default_factory=dict)
    convention: InputConvention = field(default_factory=InputConvention)

    def take(self, source: dict[str, torch.Tensor], src: str, dst: str) -> None:
        if src in source:
            self.state[dst] = source[src]
            self.used.add(src)


def vgg_conv_names(batch_norm: bool = False) -> list[tuple[str, int]]:
    """(release name conv1_1 .. conv5_3, index in segpipe's torchvision-layout `features`)."""
    names, index, stage, conv = [], 0, 1, 1
    for item in VGG16_CFG:
        if item == "M":
            index, stage, conv = index + 1, stage + 1, 1
            continue
        names.append((f"conv{stage}_{conv}", index))
        index, conv = index + (3 if batch_norm else 2), conv + 1  # conv (+ BN) + ReLU
    return names


def map_fcn(source: dict[str, torch.Tensor], arch: str) -> Converted:
    """Caffe FCN-32s/16s/8s(-at-once) or wkentaro/pytorch-fcn: conv1_1..conv5_3, fc6, fc7, score_*, upscore*."""
    stride = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8, "fcn8s_atonce": 8}[arch]
    out = Converted(arch=f"fcn{stride}s", convention=CAFFE_BGR)
    if stride != 32:
        out.model_args["fixed_upsampling"] = True
    _vgg_trunk(out, source)
    for key in source:
        if key.split(".")[0] in FCN_HEADS:
            out.take(source, key, key)
    at_once = arch == "fcn8s_atonce"
    for layer, value in AT_ONCE_SCALES.items():
        key = f"{layer}.weight"
        if key in source:
            if not torch.allclose(source[key], torch.full_like(source[key], value), rtol=1e-3, atol=0):
                raise UserError(f"{layer} should scale by {value} (FCN-8s-at-once) but holds other values")
            out.used.add(key)
            at_once = True
    if at_once:
        out.model_args["at_once"] = True
    return out


def _vgg_trunk(out: Converted, source: dict[str, torch.Tensor]) -> None:
    """conv1_1..conv5_3 -> features.*, fc6/fc7 -> fc6.0/fc7.0; `width` from conv1_1 if not the paper's."""
    for name, index in vgg_conv_names():
        for p in ("weight", "bias"):
            out.take(source, f"{name}.{p}", f"features.{index}.{p}")
    for name in ("fc6", "fc7"):
        for p in ("weight", "bias"):
            out.take(source, f"{name}.{p}", f"{name}.0.{p}")
    first = source.get("conv1_1.weight")
    if first is not None and first.shape[0] != 64:
        out.model_args["width"] = first.shape[0] / 64


def map_deeplab(source: dict[str, torch.Tensor], arch: str) -> Converted:
    """DeepLab-LargeFOV .caffemodel: conv1_1..conv5_3, fc6 (3x3, rate 12), fc7, fc8_<dataset> (fc8_voc12);
    DeepLab-MSc-LargeFOV when it also has the branches <source>_conv, <source>_fc, <source>_ms for the
    sources data, pool1..pool4. Run as its test.prototxt runs (`release`: the 513 x 513 mean-padded
    canvas, the Interp zooms)."""
    from segmodels.deeplab import MSC_SOURCES

    out = Converted(arch="deeplab_largefov", convention=DEEPLAB_BGR, model_args={"release": True})
    _vgg_trunk(out, source)
    fc8 = sorted({k.split(".")[0] for k in source if k.startswith("fc8")})
    if len(fc8) > 1:
        raise UserError(f"the file has several classifiers {fc8}; DeepLab-LargeFOV has one (fc8_voc12)")
    for layer in fc8:
        for p in ("weight", "bias"):
            out.take(source, f"{layer}.{p}", f"fc8.{p}")
    for name, *_ in MSC_SOURCES:
        for layer, dst in (("conv", "0.0"), ("fc", "1.0"), ("ms", "2")):
            for p in ("weight", "bias"):
                out.take(source, f"{name}_{layer}.{p}", f"multiscale.{name}.{dst}.{p}")
    if any(k.startswith("multiscale.") for k in out.state):
        out.model_args["msc"] = True
    return out


def map_dilation(source: dict[str, torch.Tensor], arch: str) -> Converted:
    """Dilation8 (fyu/dilation): unpadded front end conv1_1..fc7 + fc-final, context ct_conv1_1..ct_final;
    Dilation10 Cityscapes when the file has ctx_* layers."""
    if any(k.startswith("ctx_") for k in source):
        return map_dilation10(source)
    out = Converted(arch="dilation", convention=DILATION_BGR)
    _vgg_trunk(out, source)
    for p in ("weight", "bias"):
        out.take(source, f"fc-final.{p}", f"final.{p}")
        for index, layer in enumerate(DILATION_CONTEXT):
            out.take(source, f"{layer}.{p}", f"context.{2 * index}.{p}")
    first, final = source.get("ct_conv1_1.weight"), source.get("fc-final.weight")
    context = None
    if first is not None and final is not None:
        context = "large" if first.shape[0] == 2 * final.shape[0] else "basic"
    out.model_args.update({"padding": "valid", "context": context})
    return out


def map_dilation10(source: dict[str, torch.Tensor]) -> Converted:
    """Dilation10 (fyu/dilation, Cityscapes): the same unpadded front end (its classifier `final` or
    `fc-final`), basic context ctx_conv1_1..ctx_conv7_1, ctx_fc1, ctx_final, and `ctx_upsample`, a fixed
    bilinear deconvolution that segpipe rebuilds (the file's must be that kernel)."""
    from segmodels.dilation import bilinear_kernel

    out = Converted(arch="dilation", convention=DILATION_CITYSCAPES_BGR)
    _vgg_trunk(out, source)
    classifier = "final" if "final.weight" in source else "fc-final"
    for p in ("weight", "bias"):
        out.take(source, f"{classifier}.{p}", f"final.{p}")
        for index, layer in enumerate(DILATION10_CONTEXT):
            out.take(source, f"{layer}.{p}", f"context.{2 * index}.{p}")
    upsample = source.get("ctx_upsample.weight")
    if upsample is not None:
        expected = bilinear_kernel(8)
        if upsample.shape[-2:] != expected.shape or not torch.allclose(
            upsample.reshape(-1, *expected.shape).float(),
            expected.expand(upsample.shape[0], -1, -1),
            atol=1e-6,
        ):
            raise UserError(
                f"ctx_upsample {tuple(upsample.shape)} is not the release's fixed 16x16 bilinear kernel"
            )
        out.used.add("ctx_upsample.weight")
    out.model_args.update(
        {"padding": "valid", "context": "basic", "context_layers": 10, "release": "cityscapes"}
    )
    return out


def _folded_bn(out: Converted, source: dict[str, torch.Tensor], layer: str, dst: str) -> None:
    """DeconvNet's inference BN layer (blobs: scale, shift; y = scale * x + shift, statistics already
    folded in by its BN_make_INFERENCE script) as a BatchNorm2d with mean 0 and var 1 - eps."""
    if f"{layer}.weight" not in source or f"{layer}.bias" not in source:
        return
    scale, shift = source[f"{layer}.weight"].reshape(-1), source[f"{layer}.bias"].reshape(-1)
    out.state.update({f"{dst}.weight": scale, f"{dst}.bias": shift})
    out.state[f"{dst}.running_mean"] = torch.zeros_like(scale)
    out.state[f"{dst}.running_var"] = torch.full_like(scale, 1.0 - 1e-5)  # BatchNorm2d's eps
    out.used |= {f"{layer}.weight", f"{layer}.bias"}


def map_deconvnet(source: dict[str, torch.Tensor], arch: str) -> Converted:
    """DeconvNet_inference_deploy (legacy `layers`): conv*/bn*, fc6/bnfc6, fc7/bnfc7, fc6-deconv(-bn),
    deconv*/debn*, seg-score-<dataset>; BN layers in INFERENCE mode (scale, shift)."""
    out = Converted(arch="deconvnet", convention=CAFFE_BGR)
    for name, index in vgg_conv_names(batch_norm=True):
        for p in ("weight", "bias"):
            out.take(source, f"{name}.{p}", f"features.{index}.{p}")
        _folded_bn(out, source, "bn" + name.removeprefix("conv"), f"features.{index + 1}")
    pairs = [("fc6", "bnfc6", "fc6"), ("fc7", "bnfc7", "fc7"), ("fc6-deconv", "fc6-deconv-bn", "deconv_fc6")]
    for stage, count in ((5, 3), (4, 3), (3, 3), (2, 2), (1, 2)):
        pairs += [
            (f"deconv{stage}_{k}", f"debn{stage}_{k}", f"deconv{stage}.{k - 1}") for k in range(1, count + 1)
        ]
    for layer, bn, dst in pairs:
        for p in ("weight", "bias"):
            out.take(source, f"{layer}.{p}", f"{dst}.0.{p}")
        _folded_bn(out, source, bn, f"{dst}.1")
    scores = sorted({k.split(".")[0] for k in source if k.startswith("seg-score")})
    if len(scores) > 1:
        raise UserError(f"the file has several classifiers {scores}; DeconvNet has one (seg-score-voc)")
    for layer in scores:
        for p in ("weight", "bias"):
            out.take(source, f"{layer}.{p}", f"score.{p}")
    first = source.get("conv1_1.weight")
    if first is not None and first.shape[0] != 64:
        out.model_args["width"] = first.shape[0] / 64
    return out


def resnet_depth(source: dict[str, torch.Tensor], prefix: str) -> int:
    """18/34/50/101 from the number of layer3 blocks and whether they are bottlenecks (have conv3)."""
    blocks = {int(m.group(1)) for k in source if (m := re.match(rf"{re.escape(prefix)}layer3\.(\d+)\.", k))}
    bottleneck = any(k.startswith(f"{prefix}layer3.0.conv3.") for k in source)
    depth = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}.get((len(blocks), bottleneck))
    if depth is None:
        raise UserError(f"the file's ResNet has {len(blocks)} layer3 blocks: not ResNet-18/34/50/101")
    return depth


def _rename(out: Converted, source: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> None:
    """Map every file key matching a rule's regex (first match wins) to the rule's replacement."""
    for key in source:
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                out.take(source, key, re.sub(pattern, replacement, key))
                break


def map_semseg(source: dict[str, torch.Tensor], arch: str) -> Converted:
    """hszhao/semseg PSPNet (`module.` prefix): layer0 deep stem, layer1-4, ppm.features, cls, aux."""
    _require(arch, "pspnet", "semseg")
    prefix = "module." if any(k.startswith("module.") for k in source) else ""
    depth = resnet_depth(source, prefix)
    if depth not in (50, 101):
        raise UserError(f"hszhao/semseg PSPNet uses ResNet-50/101, the file has ResNet-{depth}")
    out = Converted(arch="pspnet", convention=IMAGENET_255)
    p = re.escape(prefix)
    _rename(
        out,
        source,
        [
            (rf"{p}layer0\.(\d+)\.(.+)", r"backbone.stem.\1.\2"),
            (rf"{p}(layer[1-4]\..+)", r"backbone.\1"),
            (rf"{p}ppm\.features\.(\d+)\.1\.(.+)", r"ppm.branches.\1.0.\2"),
            (rf"{p}ppm\.features\.(\d+)\.2\.(.+)", r"ppm.branches.\1.1.\2"),
            (rf"{p}cls\.([01])\.(.+)", r"classifier.0.\1.\2"),
            (rf"{p}cls\.4\.(.+)", r"classifier.2.\1"),
            (rf"{p}aux\.([01])\.(.+)", r"aux_classifier.0.\1.\2"),
            (rf"{p}aux\.4\.(.+)", r"aux_classifier.2.\1"),
        ],
    )
    aux = any(k.startswith(f"{prefix}aux.") for k in source)
    out.model_args = {"backbone": f"resnet{depth}_deepbase", "align_corners": True, "aux": aux}
    return out


def map_mmseg(source: dict[str, torch.Tensor], arch: str) -> Converted:
    """MMSegmentation PSPNet R18/R50/R101-D8: backbone.stem/layer*, decode_head.*, auxiliary_head.*."""
    _require(arch, "pspnet", "mmseg")
    out = Converted(arch="pspnet", convention=IMAGENET_255)
    _rename(
        out,
        source,
        [
            (r"backbone\.(stem\..+|layer[1-4]\..+)", r"backbone.\1"),
            (r"decode_head\.psp_modules\.(\d+)\.1\.conv\.(.+)", r"ppm.branches.\1.0.\2"),
            (r"decode_head\.psp_modules\.(\d+)\.1\.bn\.(.+)", r"ppm.branches.\1.1.\2"),
            (r"decode_head\.bottleneck\.conv\.(.+)", r"classifier.0.0.\1"),
            (r"decode_head\.bottleneck\.bn\.(.+)", r"classifier.0.1.\1"),
            (r"decode_head\.conv_seg\.(.+)", r"classifier.2.\1"),
            (r"auxiliary_head\.convs\.0\.conv\.(.+)", r"aux_classifier.0.0.\1"),
            (r"auxiliary_head\.convs\.0\.bn\.(.+)", r"aux_classifier.0.1.\1"),
            (r"auxiliary_head\.conv_seg\.(.+)", r"aux_classifier.2.\1"),
        ],
    )
    aux = any(k.startswith("auxiliary_head.") for k in source)
    out.model_args = {"backbone": f"resnet{resnet_depth(source, 'backbone.')}_v1c", "aux": aux}
    return out


def map_unet(source: dict[str, torch.Tensor], arch: str) -> Converted:
    """U-Net phseg_v5 (u-net-release): conv_d0a-b .. conv_d4b-c, upconv_d4c_u3a .. upconv_u1d_u0a,
    conv_u3b-c .. conv_u0c-d, conv_u0d-score; unpadded 3x3 convs, a ReLU after each up-convolution.

    The release concatenates [up-sampled, cropped skip] where segpipe reads [skip, up-sampled], so the
    first conv of each expanding level gets its input channels swapped back.
    """
    out = Converted(arch="unet", convention=UNET_GRAY)
    for level in range(5):
        for conv, name in enumerate((f"conv_d{level}a-b", f"conv_d{level}b-c")):
            for p in ("weight", "bias"):
                out.take(source, f"{name}.{p}", f"down.{level}.{2 * conv}.{p}")
    ups = ("upconv_d4c_u3a", "upconv_u3d_u2a", "upconv_u2d_u1a", "upconv_u1d_u0a")
    for index, (up, level) in enumerate(zip(ups, (3, 2, 1, 0), strict=True)):
        for p in ("weight", "bias"):
            out.take(source, f"{up}.{p}", f"up.{index}.{p}")
        for p in ("weight", "bias"):
            out.take(source, f"conv_u{level}c-d.{p}", f"up_convs.{index}.2.{p}")
        out.take(source, f"conv_u{level}b-c.bias", f"up_convs.{index}.0.bias")
        first, upconv = source.get(f"conv_u{level}b-c.weight"), source.get(f"{up}.weight")
        if first is not None and upconv is not None and first.ndim == 4 and upconv.ndim == 4:
            n_up = upconv.shape[1]  # ConvTranspose2d / Caffe Deconvolution blob: (in, out, kh, kw)
            out.state[f"up_convs.{index}.0.weight"] = torch.cat([first[:, n_up:], first[:, :n_up]], dim=1)
            out.used.add(f"conv_u{level}b-c.weight")
    for p in ("weight", "bias"):
        out.take(source, f"conv_u0d-score.{p}", f"final.{p}")
    first, last_up = source.get("conv_d0a-b.weight"), source.get("upconv_u1d_u0a.weight")
    out.model_args = {"padding": "valid", "upconv_relu": True}
    if first is not None and first.ndim == 4:
        out.model_args["in_channels"] = int(first.shape[1])
        if first.shape[0] != 64:
            out.model_args["width"] = first.shape[0] / 64
    if last_up is not None and last_up.ndim == 4:
        out.model_args["last_up_channels"] = int(last_up.shape[1])
    return out


def _require(arch: str, expected: str, fmt: str) -> None:
    if arch != expected:
        raise UserError(f"--format {fmt} holds a {expected} model, not {arch}: pass --arch {expected}")


# (format, arch) -> mapper; "caffe" and "torch" (the FCN port) share the FCN names.
MAPPERS = {
    **{
        (fmt, a): map_fcn for fmt in ("caffe", "torch") for a in ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")
    },
    ("caffe", "deeplab_largefov"): map_deeplab,
    ("caffe", "dilation"): map_dilation,
    ("caffe", "deconvnet"): map_deconvnet,
    ("caffe", "unet"): map_unet,
    ("semseg", "pspnet"): map_semseg,
    ("mmseg", "pspnet"): map_mmseg,
}
IMPORT_ARCHS = tuple(sorted({a for _, a in MAPPERS}))
