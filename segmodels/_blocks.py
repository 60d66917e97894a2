"""Shared parts of the model library: the base class, the VGG16 and dilated ResNet trunks, upsampling.

The trunks keep torchvision's module layout (`vgg16().features`, `vgg16_bn().features`, `resnetXX()`
minus `avgpool`/`fc`) so ImageNet state dicts load by key (see `segmodels.weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

# torchvision's VGG16 configuration "D": conv widths, "M" = max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def scaled(channels: int, width: float) -> int:
    """`channels * width`, rounded, at least 1: how `width` shrinks a layer for tiny CPU instances."""
    return max(1, round(channels * width))


class SegmentationModel(nn.Module):
    """Base of every model: input checks and the backbone/head parameter split.

    Subclasses set `arch` (registry name), `backbone_children` (names of the child modules initialised
    from ImageNet, trained at the base LR) and `imagenet_source` ("vgg16", "vgg16_bn", "resnet" or None
    for networks trained from scratch).
    """

    arch: str
    backbone_children: tuple[str, ...] = ()
    imagenet_source: str | None = None

    def __init__(self, num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"{self.arch}: num_classes must be >= 1, got {num_classes}")
        if width <= 0:
            raise ValueError(f"{self.arch}: width must be > 0 (1.0 = the paper's channels), got {width}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = width

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": ImageNet-initialised parameters, "head": new layers (higher LR in the papers)}."""
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for name, child in self.named_children():
            groups["backbone" if name in self.backbone_children else "head"].extend(child.parameters())
        return groups

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the expected layout unless `x` is N x in_channels x H x W."""
        if x.ndim != 4:
            raise ValueError(f"{self.arch} expects a 4-D input N,C,H,W; got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} was built with in_channels={self.in_channels} but got a {x.shape[1]}-channel "
                f"input of shape {tuple(x.shape)}; convert the images or rebuild with the right in_channels"
            )


class VGG16Features(nn.Sequential):
    """VGG16 convolutions in torchvision's `vgg16().features` (or `vgg16_bn().features`) key layout.

    `pools` replaces the five 2x2 max-pools (e.g. stride-1 pools for DeepLab, `nn.Identity` for the
    dilation front-end, `return_indices=True` for DeconvNet); `conv5_dilation` dilates conv5_x with
    matching padding; `first_padding` is conv1_1's padding (100 in the Caffe FCN); `valid` drops every
    conv's padding (the Dilation release's front end). Parameterless
    replacements keep the indices, so ImageNet weights still load by key. Simonyan & Zisserman, Table 1 D.
    """

    def __init__(
        self,
        width: float = 1.0,
        *,
        batch_norm: bool = False,
        pools: Sequence[nn.Module] | None = None,
        conv5_dilation: int = 1,
        first_padding: int = 1,
        valid: bool = False,
    ) -> None:
        pools = list(pools) if pools is not None else [nn.MaxPool2d(2, 2) for _ in range(5)]
        layers: list[nn.Module] = []
        pool_indices: list[int] = []
        in_ch, stage = 3, 0
        for item in VGG16_CFG:
            if item == "M":
                pool_indices.append(len(layers))
                layers.append(pools[stage])
                stage += 1
                continue
            dilation = conv5_dilation if stage == 4 else 1
            padding = 0 if valid else first_padding if not layers else dilation
            out_ch = scaled(item, width)
            layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=padding, dilation=dilation))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            in_ch = out_ch
        super().__init__(*layers)
        self.pool_indices = tuple(pool_indices)
        self.out_channels = in_ch

    def stages(self) -> list[nn.Sequential]:
        """The five conv blocks, each ending with its pool (so stage outputs are pool1..pool5)."""
        layers, ends = list(self), [i + 1 for i in self.pool_indices]
        return [nn.Sequential(*layers[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def pool_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """N,3,H,W -> [pool1, ..., pool5], the outputs of the five stages (for skip and side branches)."""
        outputs = []
        for stage in self.stages():
            x = stage(x)
            outputs.append(x)
        return outputs


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Mirror-extend N,C,H,W by any amount (repeated reflection without repeating the edge, as OpenCV's
    BORDER_REFLECT_101; unlike F.pad's pad < size limit). A side of length 1 has nothing to reflect
    (period 0), so it is repeated."""

    def indices(n: int, before: int, after: int) -> torch.Tensor:
        if n == 1:
            return torch.zeros(before + 1 + after, dtype=torch.long, device=x.device)
        period = 2 * (n - 1)
        idx = torch.arange(-before, n + after, device=x.device).remainder(period)
        return torch.where(idx >= n, period - idx, idx)

    h, w = x.shape[-2:]
    return x.index_select(-2, indices(h, top, bottom)).index_select(-1, indices(w, left, right))


def fc_block(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    padding: int = 0,
    dropout: bool = True,
    batch_norm: bool = False,
) -> nn.Sequential:
    """fc6/fc7 as a convolution (index 0, where ImageNet's classifier Linear weights are mapped) + ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    if dropout:
        layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers)


def bilinear_kernel(size: int) -> torch.Tensor:
    """2-D bilinear interpolation filter of side `size` (the FCN `upsample_filt`), shape size x size."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    return (filt[:, None] * filt[None, :]).float()


def bilinear_upsampling(channels: int, factor: int, *, trainable: bool = True) -> nn.ConvTranspose2d:
    """Channel-wise x`factor` transposed conv (kernel 2*factor, no padding) initialised to bilinear.

    Shapes: N,C,h,w -> N,C,(h-1)*factor+2*factor,(w-1)*factor+2*factor (crop afterwards). FCN section 3.3.
    """
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, bias=False)
    with torch.no_grad():
        up.weight.zero_()
        up.weight[range(channels), range(channels)] = bilinear_kernel(2 * factor).to(up.weight.device)
    up.weight.requires_grad_(trainable)
    return up


def resize_to(x: torch.Tensor, size: Sequence[int], *, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of N,C,h,w logits to N,C,*size (the papers' final x8 interpolation).

    `align_corners=True` is the corner-aligned variant some released PyTorch models (hszhao/semseg) use.
    """
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
# Deep stems (three 3x3 convs + BN + ReLU instead of the 7x7 conv): output widths of the three convs.
# "v1c": MMSegmentation's ResNetV1c (its R50/R101-D8 models); "deepbase": hszhao/semseg's PSPNet ResNet.
DEEP_STEMS = {"v1c": (32, 32, 64), "deepbase": (64, 64, 128)}
BACKBONES = RESNETS + tuple(f"{r}_v1c" for r in RESNETS) + ("resnet50_deepbase", "resnet101_deepbase")


def deep_stem(widths: tuple[int, int, int]) -> nn.Sequential:
    """conv3x3 stride 2 -> conv3x3 -> conv3x3, each + BN + ReLU (Bag of Tricks' ResNet-C): N,3,H,W -> H/2."""
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip((3, *widths[:-1]), widths, strict=True)):
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=2 if i == 0 else 1, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class DilatedResNet(nn.Module):
    """torchvision ResNet trunk with layer3/layer4 dilated (2, 4) instead of strided: output stride 8.

    Children keep torchvision's names (conv1, bn1, layer1..4), so an ImageNet state dict minus `fc.*`
    loads by key. Every stride-2 conv of layer3/4 gets stride 1 and every 3x3 conv there dilation 2/4,
    which works for BasicBlock (resnet18/34) and Bottleneck alike. forward: N,3,H,W -> (layer3, layer4)
    features, each N,C,H/8,W/8. PSPNet section 3.3 / DeepLab v2.

    `resnetXX_v1c`: MMSegmentation's ResNetV1c-D8, a deep `stem` (32, 32, 64) in place of conv1/bn1, the
    first block of layer3/layer4 dilated by half (1 / 2, its `contract_dilation`) and, as its BasicBlock
    does, only the first 3x3 conv of a block dilated.
    `resnet50_deepbase` / `resnet101_deepbase`: hszhao/semseg's trunk, stem (64, 64, 128), every block of
    layer3/4 dilated 2/4.
    """

    def __init__(self, name: str = "resnet50") -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
        base, _, stem = name.partition("_")
        resnet = getattr(torchvision.models, base)(weights=None)
        if stem:
            self.stem = deep_stem(DEEP_STEMS[stem])
            first, width = resnet.layer1[0], DEEP_STEMS[stem][-1]
            if width != first.conv1.in_channels:  # deepbase (Bottleneck only): 1x1 conv1 and downsample
                first.conv1 = nn.Conv2d(width, first.conv1.out_channels, 1, bias=False)
                first.downsample[0] = nn.Conv2d(width, first.downsample[0].out_channels, 1, bias=False)
            keys = ("relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        else:
            self.stem = None
            keys = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        for key in keys:
            setattr(self, key, getattr(resnet, key))
        for layer, dilation in ((self.layer3, 2), (self.layer4, 4)):
            for index, block in enumerate(layer):
                rate = dilation // 2 if stem == "v1c" and index == 0 else dilation
                convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
                for conv in convs:
                    if conv.stride == (2, 2):
                        conv.stride = (1, 1)
                for conv in [c for c in convs if c.kernel_size == (3, 3)][: 1 if stem == "v1c" else None]:
                    conv.dilation, conv.padding = (rate, rate), (rate, rate)
        self.out_channels = resnet.fc.in_features
        self.layer3_channels = self.out_channels // 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x) if self.stem is not None else self.relu(self.bn1(self.conv1(x)))
        c3 = self.layer3(self.layer2(self.layer1(self.maxpool(x))))
        return c3, self.layer4(c3)
