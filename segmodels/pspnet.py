"""PSPNet: Zhao, Shi, Qi, Wang & Jia, "Pyramid Scene Parsing Network", CVPR 2017 (arXiv:1612.01105).

Dilated ResNet (output stride 8) -> pyramid pooling module (bins 1, 2, 3, 6) -> 3x3 conv -> 1x1 classifier,
plus the auxiliary head on layer3 used only in training (deep supervision, section 3.4). Branch widths are
the paper's for ResNet-50/101 (2048/4 = 512 per bin, 512 after fusion, 256 in the aux head) and scale
with the trunk for resnet18/34 (as MMSegmentation's R18 configs do), which are for tiny CPU runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import DilatedResNet, SegmentationModel, resize_to
from .registry import register_model

BINS = (1, 2, 3, 6)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """Average-pool to b x b for b in `bins`, 1x1 conv to in/4 + BN + ReLU, upsample, concat with the input.

    N,in,h,w -> N,2*in,h,w. Paper section 3.3, Fig. 3.
    """

    def __init__(self, in_ch: int, bins: tuple[int, ...] = BINS, *, align_corners: bool = False) -> None:
        super().__init__()
        self.bins = bins
        self.align_corners = align_corners
        self.branches = nn.ModuleList(conv_bn_relu(in_ch, in_ch // len(bins), 1) for _ in bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [
            resize_to(branch(F.adaptive_avg_pool2d(x, b)), x.shape[-2:], align_corners=self.align_corners)
            for b, branch in zip(self.bins, self.branches, strict=True)
        ]
        return torch.cat([x, *pooled], dim=1)


def classifier(in_ch: int, mid_ch: int, num_classes: int) -> nn.Sequential:
    """3x3 conv + BN + ReLU + dropout 0.1 + 1x1 to classes (the PSPNet main and auxiliary heads)."""
    return nn.Sequential(conv_bn_relu(in_ch, mid_ch, 3), nn.Dropout2d(0.1), nn.Conv2d(mid_ch, num_classes, 1))


class PSPNet(SegmentationModel):
    """N,3,H,W -> N,C,H,W logits in eval; {"out", "aux"} (both N,C,H,W) in training when `aux`.

    `count_params(model)` leaves out `aux_classifier`, which only exists for the training loss.
    `align_corners=True` resizes as hszhao/semseg's released models do (MMSegmentation's do not).
    """

    arch = "pspnet"
    backbone_children = ("backbone",)
    imagenet_source = "resnet"

    def __init__(
        self, num_classes: int, *, backbone: str = "resnet50", aux: bool = True, align_corners: bool = False
    ) -> None:
        super().__init__(num_classes)
        self.backbone_name = backbone
        self.align_corners = align_corners
        self.backbone = DilatedResNet(backbone)
        feat = self.backbone.out_channels
        self.ppm = PyramidPooling(feat, align_corners=align_corners)
        self.classifier = classifier(2 * feat, feat // 4, num_classes)
        layer3 = self.backbone.layer3_channels
        self.aux_classifier = classifier(layer3, layer3 // 4, num_classes) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        self.check_input(x)
        size = x.shape[-2:]
        c3, c4 = self.backbone(x)
        out = resize_to(self.classifier(self.ppm(c4)), size, align_corners=self.align_corners)
        if self.training and self.aux_classifier is not None:
            aux = resize_to(self.aux_classifier(c3), size, align_corners=self.align_corners)
            return {"out": out, "aux": aux}
        return out


@register_model
def pspnet(
    *, num_classes: int, backbone: str = "resnet50", aux: bool = True, align_corners: bool = False
) -> PSPNet:
    """PSPNet (arXiv:1612.01105) on a dilated ResNet: resnet50 (paper), resnet101, resnet18/34 (tiny runs),
    or the deep-stem trunks of the released models: resnet18/34/50/101_v1c (MMSegmentation),
    resnet50_deepbase / resnet101_deepbase (hszhao/semseg)."""
    return PSPNet(num_classes, backbone=backbone, aux=aux, align_corners=align_corners)
