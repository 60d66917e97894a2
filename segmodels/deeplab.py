"""DeepLab v1 LargeFOV: Chen, Papandreou, Kokkinos, Murphy & Yuille, "Semantic Image Segmentation with
Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015 (arXiv:1412.7062).

The layer settings follow the released DeepLab-LargeFOV prototxt: pool1-3 are 3x3 / stride 2 / pad 1,
pool4-5 3x3 / stride 1 / pad 1, conv5_x has dilation ("hole") 2, fc6 is a 3x3 conv with dilation 12
and 1024 channels, fc7 1x1 1024, fc8 1x1 to the classes. Output stride 8, logits bilinearly
upsampled to the input size. The dense CRF is separate (`segmodels.crf`).
"""

from __future__ import annotations

import torch
from torch import nn

from ._blocks import SegmentationModel, VGG16Features, fc_block, resize_to, scaled
from .registry import register_model


class DeepLabLargeFOV(SegmentationModel):
    """VGG16 at output stride 8 with a 3x3 rate-12 fc6. N,3,H,W -> N,C,H,W logits. Paper section 3.1, 4.1.

    fc6/fc7 are initialised from ImageNet's fc6/fc7 by decimation (`segmodels.weights`, paper section 3.1),
    so they belong to the backbone group; fc8 is the new layer (trained at 10x LR in the paper).
    """

    arch = "deeplab_largefov"
    backbone_children = ("features", "fc6", "fc7")
    imagenet_source = "vgg16"

    def __init__(self, num_classes: int, *, width: float = 1.0, ceil_mode: bool = False) -> None:
        super().__init__(num_classes, width=width)
        # ceil_mode: Caffe's pooling rounds up, so the released model sees one more row/column on even sizes.
        pools = [nn.MaxPool2d(3, 2, padding=1, ceil_mode=ceil_mode) for _ in range(3)] + [
            nn.MaxPool2d(3, 1, padding=1) for _ in range(2)
        ]
        self.features = VGG16Features(width, pools=pools, conv5_dilation=2)
        fc = scaled(1024, width)
        self.fc6 = fc_block(self.features.out_channels, fc, 3, dilation=12, padding=12)
        self.fc7 = fc_block(fc, fc, 1)
        self.fc8 = nn.Conv2d(fc, num_classes, 1)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return resize_to(self.fc8(self.fc7(self.fc6(self.features(x)))), x.shape[-2:])


@register_model
def deeplab_largefov(*, num_classes: int, width: float = 1.0, ceil_mode: bool = False) -> DeepLabLargeFOV:
    """DeepLab-LargeFOV (arXiv:1412.7062): dilated VGG16, fc6 3x3 rate 12 with 1024 channels.

    `ceil_mode=True` rounds pool1-3 up as Caffe does (set when importing the released weights).
    """
    return DeepLabLargeFOV(num_classes, width=width, ceil_mode=ceil_mode)
