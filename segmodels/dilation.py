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

`release="cityscapes"` is Dilation10 (`dilation10_cityscapes_deploy.prototxt`) on that unpadded front
end: a basic context module of ten layers (dilations up to 64, `context_layers=10`) whose convolutions are
each zero-padded by their dilation, on a canvas of at least the release's 1396 x 1396 tile (128 x 128
scores), and the scores up-sampled by its fixed bilinear deconvolution (`ctx_upsample`: kernel 16,
stride 8, pad 4, one group per class) instead of the zoom. The release tiles a 2048 x 1024 image into
1024 x 1024 outputs (margins from the neighbouring pixels); segpipe runs the whole image at once.
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
CITYSCAPES_SCORES = 128  # Dilation10's 1396 x 1396 tile gives 128 x 128 scores (1024 x 1024 labels)
PADDINGS = ("same", "valid")
RELEASES = ("", "voc", "cityscapes")


def context_dilations(layers: int) -> tuple[int, ...]:
    """The 3x3 layers' dilations of a context module of `layers` layers: 1, 1, 2, 4, ..., 1 (8: Table 1)."""
    if layers < 4:
        raise ValueError(f"a context module has at least 4 layers, got {layers}")
    return (1, 1, *(2**k for k in range(1, layers - 3)), 1)


def bilinear_kernel(factor: int) -> torch.Tensor:
    """Caffe's `bilinear` filler for a 2*factor kernel (as FCN's and Dilation10's up-sampling layers)."""
    size = 2 * factor - factor % 2
    centre = (2 * factor - 1 - factor % 2) / (2.0 * factor)
    ramp = 1 - (torch.arange(size, dtype=torch.float64) / factor - centre).abs()
    return (ramp[:, None] * ramp[None, :]).float()


class ContextModule(nn.Sequential):
    """Paper Table 1: seven 3x3 dilated convs + ReLU and a 1x1 conv, N,C,h,w -> N,C,h,w; receptive field 67.

    `kind="basic"` keeps C channels throughout; `"large"` widens to 2C..32C. Identity initialisation
    (section 3): eq. 4 for basic; eq. 5 for large, where output channel b copies the input channels a of
    the same group, floor(a*C/c_in) == floor(b*C/c_out), with weight C/c_out, and every other weight is
    noise eps ~ N(0, noise_std^2) so the copies can diverge during training. With noise_std=0 the
    module maps any non-negative input to itself exactly. Default noise_std: 0 (basic), 1e-3 (large).
    """

    def __init__(
        self,
        num_classes: int,
        kind: str = "large",
        noise_std: float | None = None,
        *,
        valid: bool = False,
        layers: int = 8,
    ) -> None:
        if kind not in ("basic", "large"):
            raise ValueError(f"context must be 'basic', 'large' or None, got {kind!r}")
        if kind == "large" and layers != 8:
            raise ValueError(f"the large context module has 8 layers (Table 1), got context_layers={layers}")
        dilations = context_dilations(layers)
        mults = LARGE_WIDTHS if kind == "large" else (1,) * layers
        widths = [num_classes * m for m in mults]
        modules: list[nn.Module] = []
        in_ch = num_classes
        for index, (dilation, out_ch) in enumerate(zip(dilations, widths[:-1], strict=True)):
            # valid (the VOC release): the whole receptive-field margin (33) padded before layer 1.
            padding = (sum(dilations) if index == 0 else 0) if valid else dilation
            modules += [
                nn.Conv2d(in_ch, out_ch, 3, padding=padding, dilation=dilation),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        modules.append(nn.Conv2d(in_ch, widths[-1], 1))
        super().__init__(*modules)
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
        self,
        num_classes: int,
        *,
        width: float = 1.0,
        context: str | None = "large",
        padding: str = "same",
        context_layers: int = 8,
        release: str = "",
    ) -> None:
        super().__init__(num_classes, width=width)
        if padding not in PADDINGS:
            raise ValueError(f"dilation padding must be 'same' or 'valid' (the release), got {padding!r}")
        if release not in RELEASES:
            raise ValueError(f"dilation release must be one of {RELEASES[1:]} or empty, got {release!r}")
        if release == "cityscapes" and (padding != "valid" or context != "basic" or context_layers != 10):
            raise ValueError("the cityscapes release is padding='valid', context='basic', context_layers=10")
        self.padding = padding
        self.release = release or ("voc" if padding == "valid" else "")
        valid = padding == "valid"
        # pool4 and pool5 removed (identity keeps torchvision's indices for conv5_x).
        pools = [nn.MaxPool2d(2, 2, ceil_mode=valid) for _ in range(3)] + [nn.Identity(), nn.Identity()]
        self.features = VGG16Features(width, pools=pools, conv5_dilation=2, valid=valid)
        fc = scaled(4096, width)
        self.fc6 = fc_block(self.features.out_channels, fc, 7, dilation=4, padding=0 if valid else 12)
        self.fc7 = fc_block(fc, fc, 1)
        self.final = nn.Conv2d(fc, num_classes, 1)
        self.context = None
        if context is not None:
            # The Cityscapes release pads each context layer by its dilation, as the paper's "same" module.
            per_layer = self.release == "cityscapes"
            self.context = ContextModule(
                num_classes, context, valid=valid and not per_layer, layers=context_layers
            )
        if self.release == "cityscapes":
            kernel = bilinear_kernel(8).expand(num_classes, 1, 16, 16).contiguous()
            self.register_buffer("upsample_kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        height, width = x.shape[-2:]
        if self.release == "cityscapes":  # n x m scores whose x8 deconvolution covers H x W
            n, m = (max(CITYSCAPES_SCORES, -(-side // 8)) for side in (height, width))
            x = mirror_pad(x, MARGIN, 8 * n + MARGIN - height, MARGIN, 8 * m + MARGIN - width)
        elif self.padding == "valid":  # n x m scores whose corner-aligned x8 zoom covers H x W
            # At least the release's canvas: its context module sees scores beyond the image too.
            n, m = (max(RELEASE_SCORES, -(-(side - 1) // 8) + 1) for side in (height, width))
            x = mirror_pad(x, MARGIN, 8 * n + MARGIN - height, MARGIN, 8 * m + MARGIN - width)
        scores = self.final(self.fc7(self.fc6(self.features(x))))
        if self.context is not None:
            scores = self.context(scores)
        if self.release == "cityscapes":
            kernel = self.upsample_kernel.to(scores.dtype)
            up = F.conv_transpose2d(scores, kernel, stride=8, padding=4, groups=scores.shape[1])
            return up[..., :height, :width]
        if self.padding == "valid":
            zoomed = F.interpolate(scores, size=(8 * n - 7, 8 * m - 7), mode="bilinear", align_corners=True)
            return zoomed[..., :height, :width]
        return resize_to(scores, (height, width))


@register_model
def dilation(
    *,
    num_classes: int,
    width: float = 1.0,
    context: str | None = "large",
    padding: str = "same",
    context_layers: int = 8,
    release: str = "",
) -> Dilation:
    """Dilation front-end with the "basic"/"large" context module or None (arXiv:1511.07122);
    padding="valid" is the released network's geometry, release="cityscapes" Dilation10's (module docstring)."""
    return Dilation(
        num_classes,
        width=width,
        context=context,
        padding=padding,
        context_layers=context_layers,
        release=release,
    )
