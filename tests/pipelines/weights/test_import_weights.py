"""`segpipe import-weights`: synthetic files in each release's exact layout (names and shapes from the
release's definition, random weights) import into segpipe models whose predictions equal an independent
reference forward written here from that definition (Caffe padding/crop/ceil rules, ResNet variants)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.errors import UserError
from pipelines.model_uri import fetched_model
from pipelines.weights.caffe import net_parameter
from pipelines.weights.import_weights import ImportConfig, import_weights
from segmodels.artifact import load_model_dir

BGR_MEAN = torch.tensor([104.00698793, 116.66876762, 122.67891434])
RGB_MEAN, RGB_STD = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
# VGG16 as in the FCN prototxt: (name, in, out) per conv, a pool after each stage.
VGG_STAGES = [
    [("conv1_1", 3, 64), ("conv1_2", 64, 64)],
    [("conv2_1", 64, 128), ("conv2_2", 128, 128)],
    [("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256)],
    [("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512)],
    [("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)],
]
W = 16  # channel divisor: the release's names at 1/16 of its widths (segpipe width=1/16)
C = 21


def rand(*shape: int, gen: torch.Generator) -> torch.Tensor:
    fan_in = math.prod(shape[1:]) or 1
    return torch.randn(*shape, generator=gen) * math.sqrt(2.0 / fan_in)


def vgg_blobs(gen: torch.Generator, fc: int = 4096) -> dict[str, list[torch.Tensor]]:
    """conv1_1 .. conv5_3 (3x3) and, unless fc=0, fc6 (7x7) and fc7 (1x1) of `fc` channels, at 1/W width."""
    blobs = {}
    for stage in VGG_STAGES:
        for name, c_in, c_out in stage:
            c_in = c_in if c_in == 3 else c_in // W
            blobs[name] = [
                rand(c_out // W, c_in, 3, 3, gen=gen),
                torch.randn(c_out // W, generator=gen) * 0.1,
            ]
    if fc:
        blobs["fc6"] = [rand(fc // W, 512 // W, 7, 7, gen=gen), torch.randn(fc // W, generator=gen) * 0.1]
        blobs["fc7"] = [rand(fc // W, fc // W, 1, 1, gen=gen), torch.randn(fc // W, generator=gen) * 0.1]
    return blobs


# ---------------------------------------------------------------------------------------------- FCN (Caffe)
def fcn_blobs(stride: int, at_once: bool) -> dict[str, list[torch.Tensor]]:
    """The weighted layers of voc-fcn{32,16,8}s / voc-fcn8s-atonce net.py, at 1/W width."""
    gen = torch.Generator().manual_seed(stride)
    blobs = vgg_blobs(gen)
    fc = 4096 // W
    blobs["score_fr"] = [rand(C, fc, 1, 1, gen=gen), torch.randn(C, generator=gen)]
    deconv = {32: [("upscore", 64)], 16: [("upscore2", 4), ("upscore16", 32)]}
    deconv[8] = [("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)]
    for name, kernel in deconv[stride]:  # bias_term: false
        blobs[name] = [torch.rand(C, C, kernel, kernel, generator=gen) / kernel]
    skips = {"pool4": 512 // W, "pool3": 256 // W}
    for pool in ("pool4", "pool3")[: {32: 0, 16: 1, 8: 2}[stride]]:
        # at once: scores as large as the 0.01 / 1e-4 input scaling is small, so the skips still count
        gain = (100.0 if pool == "pool4" else 1e4) if at_once else 1.0
        blobs[f"score_{pool}"] = [rand(C, skips[pool], 1, 1, gen=gen) * gain, torch.randn(C, generator=gen)]
        if at_once:
            blobs[f"scale_{pool}"] = [torch.full((skips[pool],), 0.01 if pool == "pool4" else 1e-4)]
    return blobs


def caffe_max_pool(x: torch.Tensor, kernel: int = 2, stride: int = 2, pad: int = 0) -> torch.Tensor:
    """Caffe's PoolingLayer: output ceil((H + 2 pad - k) / s) + 1, minus one if the last window would start
    in the bottom padding; windows clipped at the border (so -inf padding)."""
    h, w = x.shape[-2:]
    sizes = []
    for n in (h, w):
        out = math.ceil((n + 2 * pad - kernel) / stride) + 1
        sizes.append(out - 1 if (out - 1) * stride >= n + pad else out)
    need_h, need_w = ((o - 1) * stride + kernel for o in sizes)
    x = F.pad(x, (pad, need_w - w - pad, pad, need_h - h - pad), value=-math.inf)
    return F.max_pool2d(x, kernel, stride)


def caffe_crop(x: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    return x[..., offset : offset + like.shape[-2], offset : offset + like.shape[-1]]


def reference_fcn(blobs: dict, x: torch.Tensor, stride: int, at_once: bool) -> torch.Tensor:
    """The FCN prototxt: conv1_1 pad 100, ceil pools, valid fc6, deconvs, Crop offsets 5 / 9 / 19, 27, 31."""
    h, pools = x, []
    for stage in VGG_STAGES:
        for name, *_ in stage:
            h = F.relu(F.conv2d(h, *blobs[name], padding=100 if name == "conv1_1" else 1))
        h = caffe_max_pool(h)
        pools.append(h)
    h = F.relu(F.conv2d(F.relu(F.conv2d(h, *blobs["fc6"])), *blobs["fc7"]))
    score = F.conv2d(h, *blobs["score_fr"])
    if stride == 32:
        return caffe_crop(F.conv_transpose2d(score, blobs["upscore"][0], stride=32), 19, x)
    up = F.conv_transpose2d(score, blobs["upscore2"][0], stride=2)
    pool4 = pools[3] * 0.01 if at_once else pools[3]
    fuse = up + caffe_crop(F.conv2d(pool4, *blobs["score_pool4"]), 5, up)
    if stride == 16:
        return caffe_crop(F.conv_transpose2d(fuse, blobs["upscore16"][0], stride=16), 27, x)
    up = F.conv_transpose2d(fuse, blobs["upscore_pool4"][0], stride=2)
    pool3 = pools[2] * 1e-4 if at_once else pools[2]
    fuse = up + caffe_crop(F.conv2d(pool3, *blobs["score_pool3"]), 9, up)
    return caffe_crop(F.conv_transpose2d(fuse, blobs["upscore8"][0], stride=8), 31, x)


def write_caffemodel(path, blobs: dict, legacy: bool) -> None:
    """NetParameter with `layer` (blob `shape`) or the legacy `layers` (num/channels/height/width)."""
    net = net_parameter()
    net.layer.add(name="data", type="Input")  # layers without weights are stored too
    for name, tensors in blobs.items():
        layer = net.layers.add(name=name) if legacy else net.layer.add(name=name, type="Convolution")
        for t in tensors:
            blob = layer.blobs.add()
            if legacy:
                dims = (*[1] * (4 - t.ndim), *t.shape)
                blob.num, blob.channels, blob.height, blob.width = dims
            else:
                blob.shape.dim.extend(t.shape)
            blob.data.extend(t.flatten().tolist())
    path.write_bytes(net.SerializeToString())


def assert_same_prediction(model_dir, images: np.ndarray, reference_logits: torch.Tensor, net_input) -> None:
    """Logits of the bare network on the release's input within 1e-4 (relative to their range), and the
    full serving path (uint8 -> normalize -> ensemble) predicting the same class on >= 99.9% of pixels."""
    model = load_model_dir(model_dir)
    member = model.ensemble.members[0]
    network = getattr(member, "network", member)
    with torch.no_grad():
        logits = network(net_input)
        probs = model.ensemble(model.normalize(torch.from_numpy(images)))
    scale = reference_logits.abs().max()
    assert (logits - reference_logits).abs().max() <= 1e-4 * scale
    agree = (probs.argmax(1) == reference_logits.argmax(1)).float().mean()
    assert agree >= 0.999


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 37, 45, 3), dtype=np.uint8)


def bgr_input(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images[..., ::-1].copy()).float() - BGR_MEAN).permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("arch", "stride", "container"),
    [
        ("fcn8s_atonce", 8, "caffe"),
        ("fcn32s", 32, "caffe-legacy"),
        ("fcn16s", 16, "torch"),
        ("fcn8s", 8, "torch"),
    ],
)
def test_fcn_release_imports_and_matches_the_caffe_forward(tmp_path, images, arch, stride, container) -> None:
    at_once = arch.endswith("atonce")
    blobs = fcn_blobs(stride, at_once)
    if container == "torch":  # wkentaro/pytorch-fcn: the same names as attributes
        path = tmp_path / f"{arch}.pth"
        torch.save(
            {f"{n}.{p}": t for n, ts in blobs.items() for p, t in zip(("weight", "bias"), ts, strict=False)},
            path,
        )
    else:
        path = tmp_path / f"{arch}.caffemodel"
        write_caffemodel(path, blobs, legacy=container == "caffe-legacy")
    summary = import_weights(ImportConfig(arch=arch, source=str(path), out=str(tmp_path / "model")))
    assert summary["format"] == ("torch" if container == "torch" else "caffe")
    assert summary["model_args"].get("at_once", False) == at_once
    spec = json.loads((tmp_path / "model" / "model.json").read_text())
    assert spec["members"][0]["input"]["channel_order"] == "bgr" and spec["classes"][0] == "background"
    x = bgr_input(images)
    with torch.no_grad():
        reference = reference_fcn(blobs, x, stride, at_once)
    assert reference.shape == (2, C, 37, 45)
    assert_same_prediction(tmp_path / "model", images, reference, x)


def caffe_ave_pool(x: torch.Tensor, kernel: int, stride: int, pad: int) -> torch.Tensor:
    """Caffe's AVE pooling as its loop reads: the window sum over the image, divided by the window's size
    clipped to the padded bounds (H + pad), padding included; output size as in `caffe_max_pool`."""
    h, w = x.shape[-2:]
    sizes = []
    for n in (h, w):
        out = math.ceil((n + 2 * pad - kernel) / stride) + 1
        sizes.append(out - 1 if pad and (out - 1) * stride >= n + pad else out)
    out = x.new_zeros(*x.shape[:-2], *sizes)
    for ph in range(sizes[0]):
        for pw in range(sizes[1]):
            h0, w0 = ph * stride - pad, pw * stride - pad
            h1, w1 = min(h0 + kernel, h + pad), min(w0 + kernel, w + pad)
            window = x[..., max(h0, 0) : min(h1, h), max(w0, 0) : min(w1, w)]
            out[..., ph, pw] = window.sum((-2, -1)) / ((h1 - h0) * (w1 - w0))
    return out


def caffe_interp_zoom(x: torch.Tensor, zoom: int, size: tuple[int, int]) -> torch.Tensor:
    """DeepLab's Interp layer with `zoom_factor` (caffe_cpu_interp2): n -> n + (n - 1)(zoom - 1) samples,
    output row r reading input row r (n - 1) / (out - 1) (float32), bilinearly, the last row clamped.
    Only the top-left `size` of the output is computed (the part the image occupies)."""

    def taps(n: int, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = n + (n - 1) * (zoom - 1)
        pos = (torch.tensor((n - 1) / (out - 1), dtype=torch.float32) * torch.arange(out))[:keep]
        low = pos.long()
        return low, torch.where(low < n - 1, low + 1, low), (pos - low).to(x.dtype)

    (r0, r1, a), (c0, c1, b) = (taps(n, keep) for n, keep in zip(x.shape[-2:], size, strict=True))
    rows = x[..., r0, :] * (1 - a)[:, None] + x[..., r1, :] * a[:, None]
    return rows[..., c0] * (1 - b) + rows[..., c1] * b


# DeepLab-MSc-LargeFOV's branches: (source, its channels at 1/W, Interp zoom_factor onto the canvas).
MSC_BRANCHES = [("data", 3, 1), ("pool1", 64 // W, 2), ("pool2", 128 // W, 4)]
MSC_BRANCHES += [("pool3", 256 // W, 8), ("pool4", 512 // W, 8)]


@pytest.mark.parametrize("msc", [False, True], ids=["largefov", "msc_largefov"])
def test_deeplab_release_imports_and_matches(tmp_path, images, msc) -> None:
    """DeepLab-(MSc-)LargeFOV test.prototxt (legacy `layers` file): the image data layer pads the image at
    the bottom/right with the mean to crop_size 513; pools 3x3 s2 p1 x3, s1 p1 x2, conv5 hole 2, pool5a
    (AVE 3x3 s1 p1), fc6 3x3 hole 12 (1024), fc7, fc8_voc12 (65 x 65 scores), fc8_interp (Interp,
    zoom_factor 8: 513 x 513), cropped to the image. MSc: data and pool1..pool4 each through
    <source>_conv (3x3 pad 1, stride 1 in test.prototxt) + ReLU, <source>_fc (1x1) + ReLU, <source>_ms
    (1x1 to C), zoomed x1/x2/x4/x8/x8 and summed with fc8_interp (fc_fusion). Compared blob by blob too;
    one image, as every image costs a 513 x 513 forward."""
    images = images[:1]
    gen = torch.Generator().manual_seed(3)
    blobs = vgg_blobs(gen, fc=0)
    blobs["fc6"] = [rand(1024 // W, 512 // W, 3, 3, gen=gen), torch.randn(1024 // W, generator=gen) * 0.1]
    blobs["fc7"] = [rand(1024 // W, 1024 // W, 1, 1, gen=gen), torch.randn(1024 // W, generator=gen) * 0.1]
    blobs["fc8_voc12"] = [rand(C, 1024 // W, 1, 1, gen=gen), torch.randn(C, generator=gen)]
    hidden = 128 // W
    for name, channels, _ in MSC_BRANCHES if msc else []:
        blobs[f"{name}_conv"] = [
            rand(hidden, channels, 3, 3, gen=gen),
            torch.randn(hidden, generator=gen) * 0.1,
        ]
        blobs[f"{name}_fc"] = [rand(hidden, hidden, 1, 1, gen=gen), torch.randn(hidden, generator=gen) * 0.1]
        blobs[f"{name}_ms"] = [rand(C, hidden, 1, 1, gen=gen), torch.randn(C, generator=gen)]
    path = tmp_path / "train2_iter_8000.caffemodel"
    write_caffemodel(path, blobs, legacy=True)
    summary = import_weights(
        ImportConfig(arch="deeplab_largefov", source=str(path), out=str(tmp_path / "model"))
    )
    assert summary["model_args"] == {"release": True, "width": 1 / W, **({"msc": True} if msc else {})}
    x = (
        torch.from_numpy(images[..., ::-1].copy()).float() - torch.tensor([104.008, 116.669, 122.675])
    ).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    reference = {}
    with torch.no_grad():
        y = F.pad(x, (0, 513 - w, 0, 513 - h))  # the mean value, 0 once subtracted
        sources = {"data": y}
        for index, stage in enumerate(VGG_STAGES):
            for name, *_ in stage:
                rate = 2 if index == 4 else 1
                y = F.relu(F.conv2d(y, *blobs[name], padding=rate, dilation=rate))
            y = sources[f"pool{index + 1}"] = caffe_max_pool(y, 3, 2 if index < 3 else 1, 1)
        reference["pool5"] = y
        y = reference["pool5a"] = caffe_ave_pool(y, 3, 1, 1)
        y = F.relu(F.conv2d(y, *blobs["fc6"], padding=12, dilation=12))
        y = reference["fc8"] = F.conv2d(F.relu(F.conv2d(y, *blobs["fc7"])), *blobs["fc8_voc12"])
        assert y.shape[-2:] == (65, 65)  # 513 -> 257 -> 129 -> 65, zoomed x8 to 65 + 64 * 7 = 513
        logits = caffe_interp_zoom(y, 8, (h, w))
        for name, _, zoom in MSC_BRANCHES if msc else []:
            b = F.relu(F.conv2d(sources[name], *blobs[f"{name}_conv"], padding=1))
            b = reference[f"{name}_ms"] = F.conv2d(
                F.relu(F.conv2d(b, *blobs[f"{name}_fc"])), *blobs[f"{name}_ms"]
            )
            assert b.shape[-1] + (b.shape[-1] - 1) * (zoom - 1) == 513
            logits = logits + caffe_interp_zoom(b, zoom, (h, w))

    network = load_model_dir(tmp_path / "model").ensemble.members[0].network
    blob_of = {
        "pool5": network.features[network.features.pool_indices[-1]],
        "pool5a": network.pool5a,
        "fc8": network.fc8,
        **({f"{name}_ms": network.multiscale[name][-1] for name, *_ in MSC_BRANCHES} if msc else {}),
    }
    seen = {}
    hooks = [
        m.register_forward_hook(lambda _, __, out, k=k: seen.setdefault(k, out)) for k, m in blob_of.items()
    ]
    with torch.no_grad():
        network(x)
    for hook in hooks:
        hook.remove()
    for name, blob in reference.items():
        assert (seen[name] - blob).abs().max() <= 1e-4 * blob.abs().max(), name
    assert_same_prediction(tmp_path / "model", images, logits, x)


def test_dilation8_release_imports_and_matches(tmp_path, images) -> None:
    """dilation8_pascal_voc_deploy.prototxt: 900x900 input, unpadded front end (fc-final), large context
    ct_conv1_1 (pad 33) .. ct_final unpadded; predict.py: BGR minus its mean, REFLECT_101 margin 186,
    probabilities zoomed x8 by interp_map."""
    gen = torch.Generator().manual_seed(4)
    blobs = vgg_blobs(gen)
    fc = 4096 // W
    blobs["fc-final"] = [rand(C, fc, 1, 1, gen=gen), torch.randn(C, generator=gen)]
    context = [("ct_conv1_1", 42, 1), ("ct_conv1_2", 42, 1), ("ct_conv2_1", 84, 2), ("ct_conv3_1", 168, 4)]
    context += [("ct_conv4_1", 336, 8), ("ct_conv5_1", 672, 16), ("ct_fc1", 672, 1)]
    c_in = C
    for name, c_out, _ in context:
        blobs[name] = [rand(c_out, c_in, 3, 3, gen=gen), torch.randn(c_out, generator=gen) * 0.1]
        c_in = c_out
    blobs["ct_final"] = [rand(C, c_in, 1, 1, gen=gen), torch.randn(C, generator=gen)]
    path = tmp_path / "dilation8_pascal_voc.caffemodel"
    write_caffemodel(path, blobs, legacy=False)
    summary = import_weights(ImportConfig(arch="dilation", source=str(path), out=str(tmp_path / "model")))
    assert summary["model_args"] == {"width": 1 / W, "padding": "valid", "context": "large"}

    h, w = images.shape[1:3]
    bgr = images[..., ::-1].astype(np.float32) - np.array([102.93, 111.36, 116.52], dtype=np.float32)
    canvas = np.pad(bgr, ((0, 0), (186, 900 - h - 186), (186, 900 - w - 186), (0, 0)), mode="reflect")
    x = torch.from_numpy(canvas).permute(0, 3, 1, 2)
    with torch.no_grad():
        for index, stage in enumerate(VGG_STAGES):
            for name, *_ in stage:
                x = F.relu(F.conv2d(x, *blobs[name], dilation=2 if index == 4 else 1))
            x = caffe_max_pool(x) if index < 3 else x
        x = F.relu(F.conv2d(x, *blobs["fc6"], dilation=4))
        x = F.conv2d(F.relu(F.conv2d(x, *blobs["fc7"])), *blobs["fc-final"])
        for index, (name, _, rate) in enumerate(context):
            x = F.relu(F.conv2d(x, *blobs[name], padding=33 if index == 0 else 0, dilation=rate))
        scores = F.conv2d(x, *blobs["ct_final"])
        assert scores.shape[-2:] == (66, 66)
        # interp_map: output pixel (r, c) reads the score map at (r / 8, c / 8), bilinearly.
        zoom = F.interpolate(scores, size=(521, 521), mode="bilinear", align_corners=True)[..., :h, :w]
        release_probs = F.interpolate(scores.softmax(1), size=(521, 521), mode="bilinear", align_corners=True)
    model = load_model_dir(tmp_path / "model")
    network = model.ensemble.members[0].network
    with torch.no_grad():
        logits = network(torch.from_numpy(bgr.copy()).permute(0, 3, 1, 2))
        probs = model.ensemble(model.normalize(torch.from_numpy(images)))
    assert (logits - zoom).abs().max() <= 1e-4 * zoom.abs().max()
    agree = (probs.argmax(1) == release_probs[..., :h, :w].argmax(1)).float().mean()
    assert agree >= 0.999, f"{agree:.4%} of pixels agree with the release's probability zoom"


def test_dilation10_cityscapes_release_imports_and_matches(tmp_path, images) -> None:
    """dilation10_cityscapes_deploy.prototxt: 1396x1396 tile, the unpadded front end (classifier `final`),
    basic context ctx_conv1_1 .. ctx_conv7_1 (dilations 1, 1, 2, ..., 64), ctx_fc1, each zero-padded by its
    dilation, ctx_final, then ctx_upsample: a 16x16 stride-8 pad-4 bilinear Deconvolution, one group per
    class; input BGR minus the Cityscapes mean, REFLECT_101 margin 186."""
    gen = torch.Generator().manual_seed(7)
    classes = 19
    blobs = vgg_blobs(gen)
    fc = 4096 // W
    blobs["final"] = [rand(classes, fc, 1, 1, gen=gen), torch.randn(classes, generator=gen)]
    context = [("ctx_conv1_1", 1), ("ctx_conv1_2", 1)]
    context += [(f"ctx_conv{k}_1", 2 ** (k - 1)) for k in range(2, 8)] + [("ctx_fc1", 1)]
    for name, _ in context:
        blobs[name] = [rand(classes, classes, 3, 3, gen=gen), torch.randn(classes, generator=gen) * 0.1]
    blobs["ctx_final"] = [rand(classes, classes, 1, 1, gen=gen), torch.randn(classes, generator=gen)]
    # Caffe's bilinear filler, written out: f = 8, c = 15 / 16, w(x, y) = (1 - |x / f - c|)(1 - |y / f - c|).
    ramp = 1 - (torch.arange(16) / 8 - 15 / 16).abs()
    blobs["ctx_upsample"] = [(ramp[:, None] * ramp[None, :]).expand(classes, 1, 16, 16).contiguous()]
    path = tmp_path / "dilation10_cityscapes.caffemodel"
    write_caffemodel(path, blobs, legacy=False)
    summary = import_weights(ImportConfig(arch="dilation", source=str(path), out=str(tmp_path / "model")))
    assert summary["model_args"] == {
        "width": 1 / W,
        "padding": "valid",
        "context": "basic",
        "context_layers": 10,
        "release": "cityscapes",
    }
    assert summary["num_classes"] == classes

    h, w = images.shape[1:3]
    mean = np.array([72.39239876, 82.90891754, 73.15835921], dtype=np.float32)
    bgr = images[..., ::-1].astype(np.float32) - mean
    canvas = np.pad(bgr, ((0, 0), (186, 1396 - h - 186), (186, 1396 - w - 186), (0, 0)), mode="reflect")
    x = torch.from_numpy(canvas).permute(0, 3, 1, 2)
    with torch.no_grad():
        for index, stage in enumerate(VGG_STAGES):
            for name, *_ in stage:
                x = F.relu(F.conv2d(x, *blobs[name], dilation=2 if index == 4 else 1))
            x = caffe_max_pool(x) if index < 3 else x
        x = F.relu(F.conv2d(x, *blobs["fc6"], dilation=4))
        x = F.conv2d(F.relu(F.conv2d(x, *blobs["fc7"])), *blobs["final"])
        for name, rate in context:
            x = F.relu(F.conv2d(x, *blobs[name], padding=rate, dilation=rate))
        scores = F.conv2d(x, *blobs["ctx_final"])
        assert scores.shape[-2:] == (128, 128)
        up = F.conv_transpose2d(scores, blobs["ctx_upsample"][0], stride=8, padding=4, groups=classes)
        assert up.shape[-2:] == (1024, 1024)
        reference = up[..., :h, :w]
    assert_same_prediction(
        tmp_path / "model", images, reference, torch.from_numpy(bgr.copy()).permute(0, 3, 1, 2)
    )

    # A file whose ctx_upsample is not the fixed bilinear kernel is refused, nothing written.
    blobs["ctx_upsample"] = [torch.rand(classes, 1, 16, 16, generator=gen)]
    write_caffemodel(path, blobs, legacy=False)
    with pytest.raises(UserError, match="ctx_upsample"):
        import_weights(ImportConfig(arch="dilation", source=str(path), out=str(tmp_path / "other")))
    assert not (tmp_path / "other").exists()


def test_deconvnet_release_imports_and_matches(tmp_path, images) -> None:
    """DeconvNet_inference_deploy.prototxt (legacy `layers`): conv + BN(INFERENCE: scale, shift) + ReLU,
    pools with masks, fc6 7x7 / fc7 + BN, fc6-deconv 7x7, unpool + deconv + BN mirror, seg-score-voc;
    preprocess_image.m: BGR minus the mean, zero-padded after the image to 224."""
    gen = torch.Generator().manual_seed(5)
    blobs: dict[str, list[torch.Tensor]] = {}

    def conv_bn(name: str, bn: str, c_out: int, c_in: int, k: int, transposed: bool = False) -> None:
        shape = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
        blobs[name] = [rand(*shape, gen=gen), torch.randn(c_out, generator=gen) * 0.1]
        scale = (1 + 0.1 * torch.randn(c_out, generator=gen)).view(1, c_out, 1, 1)
        blobs[bn] = [scale, (0.1 * torch.randn(c_out, generator=gen)).view(1, c_out, 1, 1)]

    for stage in VGG_STAGES:
        for name, c_in, c_out in stage:
            conv_bn(name, "bn" + name[4:], c_out // W, c_in if c_in == 3 else c_in // W, 3)
    fc = 4096 // W
    conv_bn("fc6", "bnfc6", fc, 512 // W, 7)
    conv_bn("fc7", "bnfc7", fc, fc, 1)
    conv_bn("fc6-deconv", "fc6-deconv-bn", 512 // W, fc, 7, transposed=True)
    decoder = {5: (512, 512, 512), 4: (512, 512, 256), 3: (256, 256, 128), 2: (128, 64), 1: (64, 64)}
    c_in = 512 // W
    for stage, widths in decoder.items():
        for k, c_out in enumerate(widths, start=1):
            conv_bn(f"deconv{stage}_{k}", f"debn{stage}_{k}", c_out // W, c_in, 3, transposed=True)
            c_in = c_out // W
    blobs["seg-score-voc"] = [rand(C, c_in, 1, 1, gen=gen), torch.randn(C, generator=gen)]
    path = tmp_path / "DeconvNet_trainval_inference.caffemodel"
    write_caffemodel(path, blobs, legacy=True)
    summary = import_weights(ImportConfig(arch="deconvnet", source=str(path), out=str(tmp_path / "model")))
    assert summary["model_args"] == {"width": 1 / W}

    def layer(x, name, bn, transposed=False, pad=1):
        op = F.conv_transpose2d if transposed else F.conv2d
        x = op(x, *blobs[name], padding=pad)
        return F.relu(x * blobs[bn][0] + blobs[bn][1])

    x = bgr_input(images)
    h, w = x.shape[-2:]
    with torch.no_grad():
        y, masks = F.pad(x, (0, 224 - w, 0, 224 - h)), []
        for stage in VGG_STAGES:
            for name, *_ in stage:
                y = layer(y, name, "bn" + name[4:])
            y, mask = F.max_pool2d(y, 2, 2, return_indices=True)
            masks.append(mask)
        y = layer(layer(y, "fc6", "bnfc6", pad=0), "fc7", "bnfc7", pad=0)
        y = layer(y, "fc6-deconv", "fc6-deconv-bn", transposed=True, pad=0)
        for (stage, widths), mask in zip(decoder.items(), reversed(masks), strict=True):
            y = F.max_unpool2d(y, mask, 2, 2)
            for k in range(1, len(widths) + 1):
                y = layer(y, f"deconv{stage}_{k}", f"debn{stage}_{k}", transposed=True)
        reference = F.conv2d(y, *blobs["seg-score-voc"])[..., :h, :w]
    assert_same_prediction(tmp_path / "model", images, reference, x)


# ---------------------------------------------------------------------------------------------- U-Net
def test_unet_phseg_release_imports_and_matches(tmp_path) -> None:
    """phseg_v5-train.prototxt (u-net-release-2015-10-02): one gray input channel, unpadded 3x3 conv + ReLU
    pairs conv_d0a-b .. conv_d4b-c with 2x2 max pools, dropout after d3c and d4c (identity at test time),
    each upconv_* a 2x2 stride-2 Deconvolution followed by a ReLU, the skip centre-cropped and concatenated
    after the up-sampled map ([u, dcc]), the last up-convolution 128 wide, conv_u0d-score 1x1 to 2 classes.
    The tile: raw 0-255 values mirrored around the image, as the release's overlap-tile script."""
    gen = torch.Generator().manual_seed(6)
    ch = [64 // W, 128 // W, 256 // W, 512 // W, 1024 // W]
    blobs: dict[str, list[torch.Tensor]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int = 3) -> None:
        blobs[name] = [rand(c_out, c_in, k, k, gen=gen), torch.randn(c_out, generator=gen) * 0.1]

    c_in = 1
    for level, c in enumerate(ch):
        conv(f"conv_d{level}a-b", c, c_in)
        conv(f"conv_d{level}b-c", c, c)
        c_in = c
    ups = [("upconv_d4c_u3a", 3), ("upconv_u3d_u2a", 2), ("upconv_u2d_u1a", 1), ("upconv_u1d_u0a", 0)]
    for name, level in ups:
        c_up = 128 // W if level == 0 else ch[level]
        blobs[name] = [rand(c_in, c_up, 2, 2, gen=gen), torch.randn(c_up, generator=gen) * 0.1]
        conv(f"conv_u{level}b-c", ch[level], c_up + ch[level])
        conv(f"conv_u{level}c-d", ch[level], ch[level])
        c_in = ch[level]
    conv("conv_u0d-score", 2, ch[0], 1)
    path = tmp_path / "phseg_v5.caffemodel"
    write_caffemodel(path, blobs, legacy=False)
    summary = import_weights(ImportConfig(arch="unet", source=str(path), out=str(tmp_path / "model")))
    assert summary["model_args"] == {
        "padding": "valid",
        "upconv_relu": True,
        "in_channels": 1,
        "width": 1 / W,
        "last_up_channels": 128 // W,
    }
    assert summary["input"]["channel_order"] == "gray" and summary["num_classes"] == 2

    gray = np.random.default_rng(1).integers(0, 256, (2, 41, 53), dtype=np.uint8)
    h, w = gray.shape[1:]
    # The tile: the image at offset 96 (the pooling phase), mirrored to the next valid size 16k + 124.
    tile_h, tile_w = (16 * math.ceil((n + 4 + 60) / 16) + 124 for n in (h, w))
    tile = np.pad(
        gray.astype(np.float32), ((0, 0), (96, tile_h - h - 96), (96, tile_w - w - 96)), mode="reflect"
    )
    x = torch.from_numpy(tile)[:, None]

    def centre(skip: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        top, left = ((a - b) // 2 for a, b in zip(skip.shape[-2:], like.shape[-2:], strict=True))
        return skip[..., top : top + like.shape[-2], left : left + like.shape[-1]]

    with torch.no_grad():
        skips = []
        for level in range(5):
            x = F.relu(
                F.conv2d(F.relu(F.conv2d(x, *blobs[f"conv_d{level}a-b"])), *blobs[f"conv_d{level}b-c"])
            )
            if level < 4:
                skips.append(x)
                x = F.max_pool2d(x, 2, 2)
        for (name, level), skip in zip(ups, reversed(skips), strict=True):
            u = F.relu(F.conv_transpose2d(x, *blobs[name], stride=2))
            x = torch.cat([u, centre(skip, u)], dim=1)
            x = F.relu(
                F.conv2d(F.relu(F.conv2d(x, *blobs[f"conv_u{level}b-c"])), *blobs[f"conv_u{level}c-d"])
            )
        scores = F.conv2d(x, *blobs["conv_u0d-score"])
        assert scores.shape[-2:] == (tile_h - 184, tile_w - 184)
        reference = scores[..., 4 : 4 + h, 4 : 4 + w]  # 96 - 92: where the image starts in the output
    rgb = np.repeat(gray[..., None], 3, axis=-1)  # a gray image as RGB: luma gives the values back
    assert_same_prediction(
        tmp_path / "model", rgb, reference, torch.from_numpy(gray.astype(np.float32))[:, None]
    )


# ---------------------------------------------------------------------------------------------- PSPNet
def bn_entries(state: dict, prefix: str, channels: int, gen: torch.Generator) -> None:
    state[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(channels, generator=gen)
    state[f"{prefix}.bias"] = 0.1 * torch.randn(channels, generator=gen)
    state[f"{prefix}.running_mean"] = 0.1 * torch.randn(channels, generator=gen)
    state[f"{prefix}.running_var"] = 0.5 + torch.rand(channels, generator=gen)
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)


def resnet_state(stem: list[tuple[str, str, int, int]], blocks: list[int], bottleneck: bool, gen) -> dict:
    """A ResNet trunk: `stem` = (conv key, bn key, in, out) in order, then layer1-4 in torchvision naming."""
    state = {}
    for conv, bn, c_in, c_out in stem:
        state[conv] = rand(c_out, c_in, 3, 3, gen=gen)
        bn_entries(state, bn, c_out, gen)
    inplanes = stem[-1][3]
    for layer, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        out = planes * (4 if bottleneck else 1)
        for b in range(count):
            p = f"layer{layer}.{b}"
            c_in = inplanes if b == 0 else out
            shapes = (
                [(planes, c_in, 1), (planes, planes, 3), (out, planes, 1)]
                if bottleneck
                else [(planes, c_in, 3), (planes, planes, 3)]
            )
            for i, (o, c, k) in enumerate(shapes, start=1):
                state[f"{p}.conv{i}.weight"] = rand(o, c, k, k, gen=gen)
                bn_entries(state, f"{p}.bn{i}", o, gen)
            if b == 0 and (c_in != out or layer > 1):
                state[f"{p}.downsample.0.weight"] = rand(out, c_in, 1, 1, gen=gen)
                bn_entries(state, f"{p}.downsample.1", out, gen)
        inplanes = out
    return state


def bn(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    return F.batch_norm(
        x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"], False, 0.0, 1e-5
    )


def reference_resnet(s: dict, x: torch.Tensor, stem: list[str], bottleneck: bool, contract: bool, pre: str):
    """Dilated ResNet-D8 forward: deep stem, max-pool, layer1-4 (layer3/4 stride 1, dilation 2/4).

    MMSegmentation (contract=True): the first block of layer3/4 dilated by half, and only the block's
    first 3x3 conv dilated (conv1 of BasicBlock, conv2 of Bottleneck); semseg: conv2 of every block."""
    for i, p in enumerate(stem):
        x = F.relu(
            bn(
                F.conv2d(x, s[f"{pre}{p}.weight"], stride=2 if i == 0 else 1, padding=1),
                s,
                f"{pre}{p[:-1]}{int(p[-1]) + 1}",
            )
        )
    x = F.max_pool2d(x, 3, 2, 1)
    c3 = None
    for layer, (stride, dilation) in enumerate([(1, 1), (2, 1), (1, 2), (1, 4)], start=1):
        b = 0
        while f"{pre}layer{layer}.{b}.conv1.weight" in s:
            p = f"{pre}layer{layer}.{b}"
            d = dilation // 2 if contract and b == 0 and dilation > 1 else dilation
            st = stride if b == 0 else 1
            if bottleneck:
                out = F.relu(bn(F.conv2d(x, s[f"{p}.conv1.weight"]), s, f"{p}.bn1"))
                out = F.relu(
                    bn(F.conv2d(out, s[f"{p}.conv2.weight"], stride=st, padding=d, dilation=d), s, f"{p}.bn2")
                )
                out = bn(F.conv2d(out, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
            else:
                out = F.relu(
                    bn(F.conv2d(x, s[f"{p}.conv1.weight"], stride=st, padding=d, dilation=d), s, f"{p}.bn1")
                )
                out = bn(F.conv2d(out, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in s:
                x = bn(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=st), s, f"{p}.downsample.1")
            x = F.relu(out + x)
            b += 1
        if layer == 3:
            c3 = x
    return c3, x


def reference_psp_head(s, x, branches, conv_bn, seg, size, align_corners):
    """PPM (bins 1, 2, 3, 6: pool, 1x1 conv + BN + ReLU, bilinear back), concat, 3x3 conv + BN + ReLU, 1x1."""
    outs = [x]
    for i, bins in enumerate((1, 2, 3, 6)):
        conv, norm = branches(i)
        y = F.relu(bn(F.conv2d(F.adaptive_avg_pool2d(x, bins), s[conv]), s, norm))
        outs.append(F.interpolate(y, x.shape[-2:], mode="bilinear", align_corners=align_corners))
    conv, norm = conv_bn
    y = F.relu(bn(F.conv2d(torch.cat(outs, 1), s[conv], padding=1), s, norm))
    y = F.conv2d(y, s[f"{seg}.weight"], s[f"{seg}.bias"])
    return F.interpolate(y, size, mode="bilinear", align_corners=align_corners)


def rgb_input(images: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(images).float() - RGB_MEAN) / RGB_STD).permute(0, 3, 1, 2)


def test_mmseg_pspnet_r18_d8_imports_and_matches(tmp_path, images) -> None:
    """pspnet_r18-d8 layout: ResNetV1c-18 (stem 32-32-64), decode_head 128 channels, auxiliary_head 64."""
    gen, classes = torch.Generator().manual_seed(1), 19
    stem = [
        ("stem.0.weight", "stem.1", 3, 32),
        ("stem.3.weight", "stem.4", 32, 32),
        ("stem.6.weight", "stem.7", 32, 64),
    ]
    state = {f"backbone.{k}": v for k, v in resnet_state(stem, [2, 2, 2, 2], False, gen).items()}
    for i in range(4):
        state[f"decode_head.psp_modules.{i}.1.conv.weight"] = rand(128, 512, 1, 1, gen=gen)
        bn_entries(state, f"decode_head.psp_modules.{i}.1.bn", 128, gen)
    state["decode_head.bottleneck.conv.weight"] = rand(128, 1024, 3, 3, gen=gen)
    bn_entries(state, "decode_head.bottleneck.bn", 128, gen)
    state["decode_head.conv_seg.weight"], state["decode_head.conv_seg.bias"] = (
        rand(classes, 128, 1, 1, gen=gen),
        torch.zeros(classes),
    )
    state["auxiliary_head.convs.0.conv.weight"] = rand(64, 256, 3, 3, gen=gen)
    bn_entries(state, "auxiliary_head.convs.0.bn", 64, gen)
    state["auxiliary_head.conv_seg.weight"], state["auxiliary_head.conv_seg.bias"] = (
        rand(classes, 64, 1, 1, gen=gen),
        torch.zeros(classes),
    )
    path = tmp_path / "pspnet_r18-d8_512x1024_80k_cityscapes.pth"
    torch.save({"meta": {"mmseg_version": "0.x", "CLASSES": ("road",) * classes}, "state_dict": state}, path)

    summary = import_weights(ImportConfig(arch="pspnet", source=str(path), out=str(tmp_path / "model")))
    assert summary["format"] == "mmseg" and summary["model_args"]["backbone"] == "resnet18_v1c"
    assert json.loads((tmp_path / "model" / "model.json").read_text())["classes"][0] == "road"
    x = rgb_input(images)
    with torch.no_grad():
        c3, c4 = reference_resnet(state, x, ["stem.0", "stem.3", "stem.6"], False, True, "backbone.")
        reference = reference_psp_head(
            state,
            c4,
            lambda i: (f"decode_head.psp_modules.{i}.1.conv.weight", f"decode_head.psp_modules.{i}.1.bn"),
            ("decode_head.bottleneck.conv.weight", "decode_head.bottleneck.bn"),
            "decode_head.conv_seg",
            x.shape[-2:],
            False,
        )
    assert_same_prediction(tmp_path / "model", images, reference, x)


def test_semseg_pspnet50_imports_and_matches(tmp_path, images) -> None:
    """hszhao/semseg train_epoch_*.pth: `module.` prefix, layer0 deep stem 64-64-128, ppm.features, cls, aux."""
    gen, classes = torch.Generator().manual_seed(2), 21
    stem = [("conv1.weight", "bn1", 3, 64), ("conv2.weight", "bn2", 64, 64), ("conv3.weight", "bn3", 64, 128)]
    trunk = resnet_state(stem, [3, 4, 6, 3], True, gen)
    layer0 = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7"}
    state = {}
    for key, value in trunk.items():
        head, _, rest = key.partition(".")
        state[f"module.layer0.{layer0[head]}.{rest}" if head in layer0 else f"module.{key}"] = value
    for i in range(4):
        state[f"module.ppm.features.{i}.1.weight"] = rand(512, 2048, 1, 1, gen=gen)
        bn_entries(state, f"module.ppm.features.{i}.2", 512, gen)
    state["module.cls.0.weight"] = rand(512, 4096, 3, 3, gen=gen)
    bn_entries(state, "module.cls.1", 512, gen)
    state["module.cls.4.weight"], state["module.cls.4.bias"] = (
        rand(classes, 512, 1, 1, gen=gen),
        torch.zeros(classes),
    )
    state["module.aux.0.weight"] = rand(256, 1024, 3, 3, gen=gen)
    bn_entries(state, "module.aux.1", 256, gen)
    state["module.aux.4.weight"], state["module.aux.4.bias"] = (
        rand(classes, 256, 1, 1, gen=gen),
        torch.zeros(classes),
    )
    path = tmp_path / "train_epoch_50.pth"
    torch.save({"epoch": 50, "state_dict": state}, path)

    summary = import_weights(ImportConfig(arch="pspnet", source=str(path), out=str(tmp_path / "model")))
    assert summary["format"] == "semseg"
    assert summary["model_args"] == {"backbone": "resnet50_deepbase", "align_corners": True, "aux": True}
    plain = {k.removeprefix("module."): v for k, v in state.items()}
    x = rgb_input(images)
    with torch.no_grad():
        _, c4 = reference_resnet(plain, x, ["layer0.0", "layer0.3", "layer0.6"], True, False, "")
        reference = reference_psp_head(
            plain,
            c4,
            lambda i: (f"ppm.features.{i}.1.weight", f"ppm.features.{i}.2"),
            ("cls.0.weight", "cls.1"),
            "cls.4",
            x.shape[-2:],
            True,
        )
    assert_same_prediction(tmp_path / "model", images, reference, x)


@pytest.mark.slow
def test_wrong_file_exits_2_with_the_list_and_writes_nothing(tmp_path) -> None:
    """FCN-8s weights with a mis-shaped score_pool3, through the CLI: exit 2, the names listed, no folder."""
    blobs = fcn_blobs(8, at_once=False)
    blobs["score_pool3"][0] = blobs["score_pool3"][0][:, :5]
    path = tmp_path / "fcn8s-heavy-pascal.caffemodel"
    write_caffemodel(path, blobs, legacy=False)
    out = tmp_path / "out"
    command = ["import-weights", "--arch", "fcn8s", "--from", str(path), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *command], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert "score_pool3.weight (21, 5, 1, 1) vs (21, 16, 1, 1)" in proc.stderr
    assert "nothing written" in proc.stderr and not out.exists()


def test_weights_of_another_architecture_are_listed(tmp_path) -> None:
    path = tmp_path / "fcn8s-heavy-pascal.caffemodel"
    write_caffemodel(path, fcn_blobs(8, at_once=False), legacy=False)
    with pytest.raises(UserError, match="tensors fcn32s lacks: .*score_pool3.weight") as err:
        import_weights(ImportConfig(arch="fcn32s", source=str(path), out=str(tmp_path / "out")))
    assert "does not provide: upscore.weight" in str(err.value) and not (tmp_path / "out").exists()


def test_other_mistakes_are_user_errors(tmp_path) -> None:
    path = tmp_path / "fcn32s.caffemodel"
    write_caffemodel(path, fcn_blobs(32, at_once=False), legacy=False)
    with pytest.raises(UserError, match="predicts 21 classes"):
        import_weights(ImportConfig(arch="fcn32s", source=str(path), out=str(tmp_path / "a"), num_classes=19))
    with pytest.raises(UserError, match="has 19 classes"):
        import_weights(
            ImportConfig(arch="fcn32s", source=str(path), out=str(tmp_path / "b"), classes="cityscapes")
        )
    with pytest.raises(UserError, match="no caffe release of pspnet"):
        import_weights(ImportConfig(arch="pspnet", source=str(path), out=str(tmp_path / "c")))
    (tmp_path / "junk.caffemodel").write_bytes(b"\xff\xff\xff not a protobuf")
    with pytest.raises(UserError, match="caffemodel"):
        import_weights(
            ImportConfig(arch="fcn8s", source=str(tmp_path / "junk.caffemodel"), out=str(tmp_path / "d"))
        )
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.slow
def test_imported_model_registers(tmp_path, mlflow_uri) -> None:

    path = tmp_path / "fcn32s.caffemodel"
    write_caffemodel(path, fcn_blobs(32, at_once=False), legacy=False)
    summary = import_weights(
        ImportConfig(
            arch="fcn32s",
            source=str(path),
            out=str(tmp_path / "m"),
            register_as="fcn32s-voc",
            tracking_uri=mlflow_uri,
        )
    )
    assert summary["model_uri"] == "models:/fcn32s-voc/1"
    with fetched_model(summary["model_uri"], mlflow_uri) as folder:
        assert load_model_dir(folder).spec.members[0].input.channel_order == "bgr"


def test_imported_model_predicts_through_the_evaluate_path(tmp_path, images) -> None:
    """evaluate / serve's `predict_batch` (uint8 in, probabilities out) applies the release's convention."""
    from pipelines.inference.core import InferenceSettings, predict_batch

    blobs = fcn_blobs(32, at_once=False)
    path = tmp_path / "fcn32s-heavy-pascal.caffemodel"
    write_caffemodel(path, blobs, legacy=False)
    import_weights(ImportConfig(arch="fcn32s", source=str(path), out=str(tmp_path / "model")))
    probs = predict_batch(load_model_dir(tmp_path / "model"), images, InferenceSettings())
    with torch.no_grad():
        reference = reference_fcn(blobs, bgr_input(images), 32, False).softmax(1)
    assert (probs.argmax(1) == reference.argmax(1)).float().mean() >= 0.999
    torch.testing.assert_close(probs, reference, atol=1e-3, rtol=0)


def test_caffe_vgg16_as_pretrained_keeps_bgr_and_the_model_is_fed_caffe_input(tmp_path) -> None:
    """`--pretrained VGG_ILSVRC_16_layers.caffemodel` (fc6/fc7 fully connected, legacy blobs) fills the
    FCN trunk blob for blob with conv1_1's BGR input order kept; training feeds BGR 0-255 minus the mean
    (input_convention caffe_bgr), and the saved model's spec makes evaluate feed the same."""
    from pipelines.config import TrainConfig
    from pipelines.train.init_from import check_pretrained, load_pretrained
    from pipelines.train.loop import to_input
    from pipelines.train.trainer import model_spec_from_state
    from segmodels import build_model
    from segmodels.artifact import save_model_dir

    blobs = vgg_blobs(torch.Generator().manual_seed(7))
    blobs["fc6"][0], blobs["fc7"][0] = blobs["fc6"][0].flatten(1), blobs["fc7"][0].flatten(1)  # InnerProduct
    blobs["fc8"] = [torch.randn(1000, 4096 // W), torch.randn(1000)]
    path = tmp_path / "VGG_ILSVRC_16_layers.caffemodel"
    write_caffemodel(path, blobs, legacy=True)
    cfg = TrainConfig(model="fcn8s", pretrained=str(path), input_convention="caffe_bgr")
    check_pretrained(cfg)
    with pytest.raises(UserError, match="set input_convention: caffe_bgr"):
        check_pretrained(TrainConfig(model="fcn8s", pretrained=str(path)))
    with pytest.raises(UserError, match="torchvision's weights take ImageNet-normalised RGB"):
        check_pretrained(TrainConfig(model="fcn8s", pretrained="vgg16.pth", input_convention="caffe_bgr"))

    model = build_model("fcn8s", C, width=1 / W)
    missing, unused = load_pretrained(model, str(path))
    assert torch.equal(model.features[0].weight, blobs["conv1_1"][0])  # input channels B, G, R as stored
    assert torch.equal(model.features[28].weight, blobs["conv5_3"][0])
    assert torch.equal(model.fc6[0].weight, blobs["fc6"][0].view(4096 // W, 512 // W, 7, 7))
    assert torch.equal(model.fc7[0].bias, blobs["fc7"][1])
    assert {k.split(".")[0] for k in missing} == {"score_fr", "score_pool4", "score_pool3", "upscore2",
                                                  "upscore_pool4", "upscore8"}  # fmt: skip
    assert sorted(unused) == ["fc8.bias", "fc8.weight"]
    deconvnet = build_model("deconvnet", C, width=1 / W)  # BN trunk: conv i at features.3i, BN kept
    load_pretrained(deconvnet, str(path))
    assert torch.equal(deconvnet.features[3].weight, blobs["conv1_2"][0])

    pixel = torch.tensor([[[[10, 120, 250]]]], dtype=torch.uint8)  # one RGB pixel
    x = to_input(pixel, torch.device("cpu"), cfg)
    assert torch.allclose(x.flatten(), torch.tensor([250.0, 120.0, 10.0]) - BGR_MEAN)

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, 40, 48, 3), dtype=torch.uint8, generator=gen)
    state = {
        "config": cfg.to_dict() | {"model_args": {"width": 1 / W}},
        "classes": [f"c{i}" for i in range(C)],
        "palette": [[i, i, i] for i in range(C)],
        "metrics": {"val_miou": 0.5},
        "fingerprint": "f",
    }
    spec = model_spec_from_state(state, "fcn8s-caffe", source="test")
    assert spec.members[0].input.channel_order == "bgr" and spec.members[0].input.scale == 255
    folder = save_model_dir(tmp_path / "model", spec, [model.state_dict()])
    loaded = load_model_dir(folder)  # what evaluate / predict / serve load
    model.eval()
    with torch.no_grad():
        trained_view = torch.softmax(model(to_input(images, torch.device("cpu"), cfg)), 1)
        served = loaded.ensemble(loaded.normalize(images))
    assert torch.allclose(served, trained_view, atol=1e-5)
