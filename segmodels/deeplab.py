"""DeepLab v1 LargeFOV: Chen, Papandreou, Kokkinos, Murphy & Yuille, "Semantic Image Segmentation with
Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015 (arXiv:1412.7062).

The layer settings follow the released DeepLab-LargeFOV prototxt: pool1-3 are 3x3 / stride 2 / pad 1,
pool4-5 3x3 / stride 1 / pad 1, conv5_x has dilation ("hole") 2, then `pool5a`, a 3x3 / stride 1 / pad 1
average pooling (Caffe's AVE divides by the padded window, 9, as count_include_pad does), fc6 a 3x3
conv with dilation 12 and 1024 channels, fc7 1x1 1024, fc8 1x1 to the classes. Output stride 8, logits
bilinearly upsampled to the input size. The dense CRF is separate (`segmodels.crf`).

`release=True` is the released test network's geometry (test.prototxt): the image data layer puts the
image at the top left of a 513 x 513 canvas (crop_size) filled with the mean, 0 once subtracted (larger
images: the next 8k + 1 side, where the release would crop), giving 65 x 65 scores, which its Interp
layer zooms x8 corner-aligned to 513 x 513 before the image's part is cropped. On such 8k + 1 sides
Caffe's rounded-up pools and PyTorch's rounded-down ones agree.

`msc=True` adds the paper's multi-scale prediction (section 4.3, DeepLab-MSc): the input and pool1..pool4
each feed a two-layer MLP (3x3 conv 128 + ReLU + dropout, 1x1 conv 128 + ReLU + dropout), whose 128
channels join fc8's input. Concatenating 5 x 128 channels before the linear fc8 equals summing a 1x1 to C
per branch with fc8's output, which is how it is built here. The 3x3 conv strides (8, 4, 2, 1, 1) bring
every branch to output stride 8, as in the released train.prototxt (DeepLab-MSc-LargeFOV, which has
pool5a too). Its test.prototxt, which `release=True` follows, runs the branch convs at stride 1 instead
and zooms every score map (branches x1, x2, x4, x8, x8; fc8 x8) onto the canvas before the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import SegmentationModel, VGG16Features, fc_block, resize_to, scaled
from .registry import register_model

MSC_CHANNELS = 128
# Multi-scale sources: (name, VGG channels at width 1 or None for the input, stride down to output stride 8).
MSC_SOURCES = (("data", None, 8), ("pool1", 64, 4), ("pool2", 128, 2), ("pool3", 256, 1), ("pool4", 512, 1))
RELEASE_SCORES = 65  # the release's 513 x 513 test canvas gives 65 x 65 scores


def msc_branch(in_ch: int, hidden: int, num_classes: int, stride: int) -> nn.Sequential:
    """One DeepLab-MSc branch: N,in_ch,h,w -> N,C,h/stride,w/stride class scores (section 4.3)."""
    score = nn.Conv2d(hidden, num_classes, 1)
    nn.init.normal_(score.weight, std=0.01)  # as fc8: the branch output is a new classifier layer
    nn.init.zeros_(score.bias)
    return nn.Sequential(
        fc_block(in_ch, hidden, 3, stride=stride, padding=1), fc_block(hidden, hidden, 1), score
    )


class DeepLabLargeFOV(SegmentationModel):
    """VGG16 at output stride 8 with a 3x3 rate-12 fc6. N,3,H,W -> N,C,H,W logits. Paper section 3.1, 4.1.

    fc6/fc7 are initialised from ImageNet's fc6/fc7 by decimation (`segmodels.weights`, paper section 3.1),
    so they belong to the backbone group; fc8 (and the MSc branches) are new layers (10x LR in the paper).
    """

    arch = "deeplab_largefov"
    backbone_children = ("features", "fc6", "fc7")
    imagenet_source = "vgg16"

    def __init__(
        self,
        num_classes: int,
        *,
        width: float = 1.0,
        ceil_mode: bool = False,
        msc: bool = False,
        release: bool = False,
    ) -> None:
        super().__init__(num_classes, width=width)
        if msc and ceil_mode:
            # The branches' strided convs round down; with rounded-up pools the maps only agree on 8k+1 sides.
            raise ValueError(
                "deeplab_largefov: msc=True needs ceil_mode=False (the multi-scale branches follow floor "
                "rounding); drop ceil_mode or msc"
            )
        # ceil_mode: Caffe's pooling rounds up, so the released model sees one more row/column on even sizes.
        pools = [nn.MaxPool2d(3, 2, padding=1, ceil_mode=ceil_mode) for _ in range(3)] + [
            nn.MaxPool2d(3, 1, padding=1) for _ in range(2)
        ]
        self.features = VGG16Features(width, pools=pools, conv5_dilation=2)
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1)
        self.release = release
        fc = scaled(1024, width)
        self.fc6 = fc_block(self.features.out_channels, fc, 3, dilation=12, padding=12)
        self.fc7 = fc_block(fc, fc, 1)
        self.fc8 = nn.Conv2d(fc, num_classes, 1)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)
        self.multiscale: nn.ModuleDict | None = None
        if msc:
            hidden = scaled(MSC_CHANNELS, width)
            self.multiscale = nn.ModuleDict(
                {
                    name: msc_branch(
                        self.in_channels if ch is None else scaled(ch, width),
                        hidden,
                        num_classes,
                        1 if release else stride,
                    )
                    for name, ch, stride in MSC_SOURCES
                }
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        height, width = x.shape[-2:]
        if self.release:  # n x m scores whose corner-aligned x8 zoom covers H x W (module docstring)
            n, m = (max(RELEASE_SCORES, -(-(side - 1) // 8) + 1) for side in (height, width))
            x = F.pad(x, (0, 8 * m - 7 - width, 0, 8 * n - 7 - height))
        pools = self.features.pool_outputs(x)
        scores = [self.fc8(self.fc7(self.fc6(self.pool5a(pools[-1]))))]
        if self.multiscale is not None:
            sources = [x, *pools[:4]]
            scores += [
                branch(source) for branch, source in zip(self.multiscale.values(), sources, strict=True)
            ]
        if self.release:  # every score map zoomed corner-aligned onto the canvas (Interp), then summed
            canvas = x.shape[-2:]
            zoomed = [F.interpolate(s, size=canvas, mode="bilinear", align_corners=True) for s in scores]
            return sum(zoomed)[..., :height, :width]
        return resize_to(sum(scores), (height, width))


@register_model
def deeplab_largefov(
    *,
    num_classes: int,
    width: float = 1.0,
    ceil_mode: bool = False,
    msc: bool = False,
    release: bool = False,
) -> DeepLabLargeFOV:
    """DeepLab-LargeFOV (arXiv:1412.7062): dilated VGG16, pool5a, fc6 3x3 rate 12 with 1024 channels.

    `ceil_mode=True` rounds pool1-3 up as Caffe does; `release=True` runs the released test network's
    513 x 513 canvas and x8 Interp zoom (set when importing the released weights); `msc=True` adds
    DeepLab-MSc's multi-scale prediction branches (section 4.3).
    """
    return DeepLabLargeFOV(num_classes, width=width, ceil_mode=ceil_mode, msc=msc, release=release)
