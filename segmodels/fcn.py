"""FCN-32s / FCN-16s / FCN-8s: Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015 (arXiv:1411.4038; PAMI 2016).

Arbitrary input sizes follow the Caffe reference exactly: conv1_1 is padded by 100, the pools round up
(Caffe's ceil mode), fc6 is a valid 7x7 convolution, and the skip maps and the final upsampled scores are
cropped at the reference offsets (5 for pool4, 9 for pool3; 19 / 27 / 31 for the x32 / x16 / x8
output). The logits are exactly input-sized for every H, W.
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import SegmentationModel, VGG16Features, bilinear_upsampling, fc_block, scaled
from .registry import register_model


def crop(x: torch.Tensor, offset: int, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Caffe `Crop` layer: x[..., offset:offset+h, offset:offset+w] for (h, w) = size."""
    return x[..., offset : offset + size[0], offset : offset + size[1]]


class FCN(SegmentationModel):
    """VGG16 FCN with skips down to `stride` (32, 16 or 8). N,3,H,W -> N,C,H,W logits. Paper section 4.

    score_fr, score_pool4 and score_pool3 start at zero (section 4.3); the x2 upsamplings start as
    bilinear interpolation and are learned; the final one stays fixed bilinear. `fixed_upsampling` keeps
    the x2 layers fixed too, and `at_once` scales pool4 by 0.01 and pool3 by 1e-4 before their score
    layers: both as in the released PAMI reference nets (FCN-8s-at-once, PAMI section 4.2).
    """

    backbone_children = ("features", "fc6", "fc7")
    imagenet_source = "vgg16"
    # conv1_1's padding on each side, so every input size works; inference counts it in its pixel budget.
    input_padding = 100

    def __init__(
        self,
        num_classes: int,
        *,
        stride: int,
        width: float = 1.0,
        fixed_upsampling: bool = False,
        at_once: bool = False,
    ) -> None:
        self.arch = f"fcn{stride}s"
        super().__init__(num_classes, width=width)
        learn = not fixed_upsampling
        self.fixed_upsampling, self.at_once = fixed_upsampling, at_once
        self.pool4_scale, self.pool3_scale = (0.01, 1e-4) if at_once else (1.0, 1.0)
        ceil_pools = [nn.MaxPool2d(2, 2, ceil_mode=True) for _ in range(5)]
        self.features = VGG16Features(width, pools=ceil_pools, first_padding=self.input_padding)
        fc = scaled(4096, width)
        self.fc6 = fc_block(self.features.out_channels, fc, 7)
        self.fc7 = fc_block(fc, fc, 1)
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        self.stride = stride
        if stride == 32:
            self.upscore = bilinear_upsampling(num_classes, 32, trainable=False)
        else:
            self.upscore2 = bilinear_upsampling(num_classes, 2, trainable=learn)
            self.score_pool4 = nn.Conv2d(scaled(512, width), num_classes, 1)
        if stride == 16:
            self.upscore16 = bilinear_upsampling(num_classes, 16, trainable=False)
        if stride == 8:
            self.score_pool3 = nn.Conv2d(scaled(256, width), num_classes, 1)
            self.upscore_pool4 = bilinear_upsampling(num_classes, 2, trainable=learn)
            self.upscore8 = bilinear_upsampling(num_classes, 8, trainable=False)
        for name, score in self.named_children():
            if name.startswith("score"):  # score_fr, score_pool4, score_pool3
                nn.init.zeros_(score.weight)
                nn.init.zeros_(score.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        size = x.shape[-2:]
        *_, pool3, pool4, pool5 = self.features.pool_outputs(x)
        score = self.score_fr(self.fc7(self.fc6(pool5)))
        if self.stride == 32:
            return crop(self.upscore(score), 19, size)
        up = self.upscore2(score)
        score = up + crop(self.score_pool4(pool4 * self.pool4_scale), 5, up.shape[-2:])
        if self.stride == 16:
            return crop(self.upscore16(score), 27, size)
        up = self.upscore_pool4(score)
        score = up + crop(self.score_pool3(pool3 * self.pool3_scale), 9, up.shape[-2:])
        return crop(self.upscore8(score), 31, size)


@register_model
def fcn32s(*, num_classes: int, width: float = 1.0) -> FCN:
    """FCN-32s: single x32 upsampling of VGG16 fc7 scores (arXiv:1411.4038, section 4.1)."""
    return FCN(num_classes, stride=32, width=width)


@register_model
def fcn16s(
    *, num_classes: int, width: float = 1.0, fixed_upsampling: bool = False, at_once: bool = False
) -> FCN:
    """FCN-16s: fc7 scores x2 + pool4 scores, then x16 (arXiv:1411.4038, section 4.2)."""
    return FCN(num_classes, stride=16, width=width, fixed_upsampling=fixed_upsampling, at_once=at_once)


@register_model
def fcn8s(
    *, num_classes: int, width: float = 1.0, fixed_upsampling: bool = False, at_once: bool = False
) -> FCN:
    """FCN-8s: FCN-16s fused map x2 + pool3 scores, then x8 (arXiv:1411.4038, section 4.2).

    `at_once=True, fixed_upsampling=True` is the released FCN-8s-at-once (PAMI 2016, 67.2 VOC2012 test).
    """
    return FCN(num_classes, stride=8, width=width, fixed_upsampling=fixed_upsampling, at_once=at_once)
