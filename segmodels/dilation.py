"""Dilation front-end + context module: Yu & Koltun, "Multi-Scale Context Aggregation by Dilated
Convolutions", ICLR 2016 (arXiv:1511.07122).

Front-end (section 4): VGG16 with pool4/pool5 removed, conv5_x dilated by 2, fc6 a 7x7 conv dilated by 4
(4096 channels), fc7 1x1 4096, a final 1x1 to C classes; output stride 8. "Same" zero padding replaces
the paper's reflection-padded input without inner padding (a simplification PAPERS.md allows).
Context module (section 3, Table 1) on the C score maps, then bilinear x8 to the input size.

`padding="valid"` is the released network instead (fyu/dilation `dilation8_pascal_voc_deploy.prototxt`):
no padding in the front end, the input reflection-padded (BORDER_REFLECT_101) by the 186 pixels
(`MARGIN`) the valid layers consume at the top/left and onto the release's 900 x 900 canvas (or more) at
the bottom/right, the context module padded once by 33 before its first layer, and the stride-8 scores
interpolated with the release's corner-aligned x8 zoom (which the release applies to probabilities,
segpipe to logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._blocks import SegmentationModel, VGG16Features, fc_block, mirror_pad, resize_to, scaled
from .registry import register_model

CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)  # layers 1-7 (3x3); layer 8 is 1x1
LARGE_WIDTHS = (2, 2, 4, 8, 16, 32, 32, 1)  # output channels of layers 1-8, in multiples of C
MARGIN = 186  # pixels the valid front end consumes on each side (the release's label_margin)
RELEASE_SCORES = 66  # the release's 900 x 900 input canvas gives 66 x 66 scores (images up to 521 px)
PADDINGS = ("same", "valid")


class ContextModule(nn.Sequential):
    """Paper Table 1: seven 3x3 dilated convs + ReLU and a 1x1 conv, N,C,h,w -> N,C,h,w; receptive field 67.

    `kind="basic"` keeps C channels throughout; `"large"` widens to 2C..32C. Identity initialisation
    (section 3): eq. 4 for basic; eq. 5 for large, where output channel b copies the input channels a of
    the same group, floor(a*C/c_in) == floor(b*C/c_out), with weight C/c_out, and every other weight is
    noise eps ~ N(0, noise_std^2) so the copies can diverge during training. With noise_std=0 the
    module maps any non-negative input to itself exactly. Default noise_std: 0 (basic), 1e-3 (large).
    """

    def __init__(
        self, num_classes: int, kind: str = "large", noise_std: float | None = None, *, valid: bool = False
    ) -> None:
        if kind not in ("basic", "large"):
            raise ValueError(f"context must be 'basic', 'large' or None, got {kind!r}")
        mults = LARGE_WIDTHS if kind == "large" else (1,) * 8
        widths = [num_classes * m for m in mults]
        layers: list[nn.Module] = []
        in_ch = num_classes
        for index, (dilation, out_ch) in enumerate(zip(CONTEXT_DILATIONS, widths[:7], strict=True)):
            # valid (the release): all 33 pixels of the receptive-field margin padded before layer 1.
            padding = (sum(CONTEXT_DILATIONS) if index == 0 else 0) if valid else dilation
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=padding, dilation=dilation),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        layers.append(nn.Conv2d(in_ch, widths[-1], 1))
        super().__init__(*layers)
        self.kind = kind
        if noise_std is None:
            noise_std = 1e-3 if kind == "large" else 0.0
        self.init_identity(num_classes, noise_std)

    @torch.no_grad()
    def init_identity(self, num_classes: int, noise_std: float) -> None:
        """Identity initialisation, paper eq. 4 / eq. 5 (see the class docstring)."""
        for conv in self:
            if not isinstance(conv, nn.Conv2d):
                continue
            c_out, c_in, kh, kw = conv.weight.shape
            group_out = torch.arange(c_out, device=conv.weight.device) * num_classes // c_out
            group_in = torch.arange(c_in, device=conv.weight.device) * num_classes // c_in
            same_group = group_out[:, None] == group_in[None, :]
            conv.weight.normal_(0.0, noise_std)
            centre = conv.weight[:, :, kh // 2, kw // 2]
            centre.copy_(torch.where(same_group, num_classes / c_out, centre))
            conv.bias.zero_()


class Dilation(SegmentationModel):
    """Front-end (+ optional context module). N,3,H,W -> N,C,H,W logits. Paper sections 3-4."""

    arch = "dilation"
    backbone_children = ("features", "fc6", "fc7")
    imagenet_source = "vgg16"

    def __init__(
        self, num_classes: int, *, width: float = 1.0, context: str | None = "large", padding: str = "same"
    ) -> None:
        super().__init__(num_classes, width=width)
        if padding not in PADDINGS:
            raise ValueError(f"dilation padding must be 'same' or 'valid' (the release), got {padding!r}")
        self.padding = padding
        valid = padding == "valid"
        # pool4 and pool5 removed (identity keeps torchvision's indices for conv5_x).
        pools = [nn.MaxPool2d(2, 2, ceil_mode=valid) for _ in range(3)] + [nn.Identity(), nn.Identity()]
        self.features = VGG16Features(width, pools=pools, conv5_dilation=2, valid=valid)
        fc = scaled(4096, width)
        self.fc6 = fc_block(self.features.out_channels, fc, 7, dilation=4, padding=0 if valid else 12)
        self.fc7 = fc_block(fc, fc, 1)
        self.final = nn.Conv2d(fc, num_classes, 1)
        self.context = ContextModule(num_classes, context, valid=valid) if context is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        height, width = x.shape[-2:]
        if self.padding == "valid":  # n x m scores whose corner-aligned x8 zoom covers H x W
            # At least the release's canvas: its context module sees scores beyond the image too.
            n, m = (max(RELEASE_SCORES, -(-(side - 1) // 8) + 1) for side in (height, width))
            x = mirror_pad(x, MARGIN, 8 * n + MARGIN - height, MARGIN, 8 * m + MARGIN - width)
        scores = self.final(self.fc7(self.fc6(self.features(x))))
        if self.context is not None:
            scores = self.context(scores)
        if self.padding == "valid":
            zoomed = F.interpolate(scores, size=(8 * n - 7, 8 * m - 7), mode="bilinear", align_corners=True)
            return zoomed[..., :height, :width]
        return resize_to(scores, (height, width))


@register_model
def dilation(
    *, num_classes: int, width: float = 1.0, context: str | None = "large", padding: str = "same"
) -> Dilation:
    """Dilation front-end with the "basic"/"large" context module or None (arXiv:1511.07122);
    padding="valid" is the released network's geometry (see the module docstring)."""
    return Dilation(num_classes, width=width, context=context, padding=padding)
