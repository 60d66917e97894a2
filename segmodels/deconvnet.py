"""DeconvNet: Noh, Hong & Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015
(arXiv:1505.04366).

Input size: the paper runs the network on 224x224 inputs (whole crops or resized object proposals),
where fc6 (valid 7x7) turns the 7x7 pool5 map into 1x1 and deconv-fc6 turns it back into 7x7. Other
sizes are zero-padded at the bottom/right (zero = the mean colour after ImageNet normalisation) to a
multiple of 32 that is at least 224, so fc6 still sees at least a 7x7 map and every unpooling exactly
inverts its pooling; the logits are cropped back to H x W. At 224x224 no padding happens.
Instance-wise inference (paper section 4.1) is just this forward on a batch of resized proposal crops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import SegmentationModel, VGG16Features, fc_block, scaled
from .registry import register_model

# Decoder (paper Table 1 / Fig. 2): after unpool5..unpool1, the output widths of the 3x3 deconvs.
DECODER = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64, 64))
PAPER_SIZE = 224


def deconv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3) -> nn.Sequential:
    """Transposed conv (stride 1, size-preserving for 3x3; 1x1 -> 7x7 for deconv-fc6) + BN + ReLU."""
    padding = 1 if kernel == 3 else 0
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, kernel, padding=padding),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DeconvNet(SegmentationModel):
    """VGG16-BN encoder with pooling switches, fc6/fc7, and its mirror of unpooling + deconvolution.

    N,3,H,W -> N,C,H,W logits (see the module docstring for sizes other than 224). Paper section 3.
    """

    arch = "deconvnet"
    backbone_children = ("features", "fc6", "fc7")
    imagenet_source = "vgg16_bn"

    def __init__(self, num_classes: int, *, width: float = 1.0) -> None:
        super().__init__(num_classes, width=width)
        switch_pools = [nn.MaxPool2d(2, 2, return_indices=True) for _ in range(5)]
        self.features = VGG16Features(width, batch_norm=True, pools=switch_pools)
        fc = scaled(4096, width)
        self.fc6 = fc_block(self.features.out_channels, fc, 7, dropout=False, batch_norm=True)
        self.fc7 = fc_block(fc, fc, 1, dropout=False, batch_norm=True)
        self.deconv_fc6 = deconv_bn_relu(fc, self.features.out_channels, kernel=7)
        self.unpool = nn.MaxUnpool2d(2, 2)
        stages, in_ch = [], self.features.out_channels
        for widths in DECODER:
            blocks = []
            for out in widths:
                blocks.append(deconv_bn_relu(in_ch, scaled(out, width)))
                in_ch = scaled(out, width)
            stages.append(nn.Sequential(*blocks))
        # deconv5 (after unpool5) first ... deconv1 last.
        self.deconv5, self.deconv4, self.deconv3, self.deconv2, self.deconv1 = stages
        self.score = nn.Conv2d(in_ch, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        height, width = x.shape[-2:]
        x = F.pad(x, (0, padded_size(width) - width, 0, padded_size(height) - height))
        switches = []
        for stage in self.features.stages():
            x, indices = stage(x)
            switches.append(indices)
        x = self.deconv_fc6(self.fc7(self.fc6(x)))
        for deconv, indices in zip(
            (self.deconv5, self.deconv4, self.deconv3, self.deconv2, self.deconv1),
            reversed(switches),
            strict=True,
        ):
            x = deconv(self.unpool(x, indices))
        return self.score(x)[..., :height, :width]


def padded_size(size: int) -> int:
    """Smallest multiple of 32 that is >= max(size, 224)."""
    return max(PAPER_SIZE, -(-size // 32) * 32)


@register_model
def deconvnet(*, num_classes: int, width: float = 1.0) -> DeconvNet:
    """DeconvNet (arXiv:1505.04366): VGG16-BN + fc6/fc7, mirrored unpooling/deconvolution decoder."""
    return DeconvNet(num_classes, width=width)
