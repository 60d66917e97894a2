"""U-Net: Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015 (arXiv:1505.04597).

`padding="valid"` (default) is the paper's network: unpadded 3x3 convs, so a 572x572 tile gives a 388x388
map (92 px of context lost on each side). To return logits for every pixel of any H x W, the input is
mirror-extended (the paper's overlap-tile border extrapolation, section 2) by 96 px at the top/left and
enough at the bottom/right to reach the next valid tile size, and the output is cropped to H x W.
96 = 92 rounded up to the 16-px pooling period: the image then sits at the pooling phase of the paper's
tile, so the valid centre of a 572 crop (what the overlap-tile loss scores, `segmentation_loss(border=92)`)
is exactly the paper's 388 output of that crop and never depends on the mirrored border.
`padding="same"` uses padded convs + batch norm (a common modern variant); the input is mirrored up to a
multiple of 16.

The authors' released network (`phseg_v5`, u-net-release-2015-10-02) differs from Fig. 1 in two details
that its weights need: a ReLU after every up-convolution (`upconv_relu=True`) and 128 output channels on
the last up-convolution instead of 64 (`last_up_channels=128`); `segpipe import-weights` sets both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._blocks import SegmentationModel, mirror_pad, scaled
from .registry import register_model

CHANNELS = (64, 128, 256, 512, 1024)
VALID_MARGIN = 92  # context lost per side by the valid convolutions (572 -> 388)
TILE_OFFSET = 96  # where the image starts in the mirrored tile: VALID_MARGIN rounded up to a multiple of 16


def double_conv(in_ch: int, out_ch: int, same: bool) -> nn.Sequential:
    """Two 3x3 convs + ReLU (unpadded), or padded conv + BN + ReLU twice when `same`."""
    layers: list[nn.Module] = []
    for c_in in (in_ch, out_ch):
        if same:
            layers += [nn.Conv2d(c_in, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch)]
        else:
            layers.append(nn.Conv2d(c_in, out_ch, 3))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def center_crop(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """The centre size[0] x size[1] window of N,C,H,W (the paper's crop before concatenation)."""
    top, left = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


class UNet(SegmentationModel):
    """Contracting path 64..1024, 2x2 up-convolutions, crop-and-concat, final 1x1.

    N,in_channels,H,W -> N,C,H,W logits for any H, W (module docstring). Paper section 2, Fig. 1.
    Weights are drawn from N(0, 2/N), N = inputs per unit (section 3); everything is trained from
    scratch, so only the final 1x1 counts as "head".
    """

    arch = "unet"
    backbone_children = ("down", "up", "up_convs")

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 3,
        width: float = 1.0,
        padding: str = "valid",
        upconv_relu: bool = False,
        last_up_channels: int = 0,
    ):
        super().__init__(num_classes, in_channels=in_channels, width=width)
        if padding not in ("valid", "same"):
            raise ValueError(f"unet padding must be 'valid' (the paper) or 'same', got {padding!r}")
        if last_up_channels < 0:
            raise ValueError(f"last_up_channels must be >= 0 (0: the paper's), got {last_up_channels}")
        self.padding = padding
        self.upconv_relu = upconv_relu
        same = padding == "same"
        ch = [scaled(c, width) for c in CHANNELS]
        self.down = nn.ModuleList(
            double_conv(a, b, same) for a, b in zip([in_channels, *ch[:-1]], ch, strict=True)
        )
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(0.5)  # "at the end of the contracting path"
        up_out = [*ch[-2:0:-1], last_up_channels or ch[0]]  # what each up-convolution hands its level
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(a, b, 2, stride=2) for a, b in zip(ch[:0:-1], up_out, strict=True)
        )
        # Each level's convs read [cropped skip, up-sampled] and keep the skip's width.
        self.up_convs = nn.ModuleList(
            double_conv(b + u, b, same) for b, u in zip(ch[-2::-1], up_out, strict=True)
        )
        self.final = nn.Conv2d(ch[0], num_classes, 1)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                fan_in = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.in_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        height, width = x.shape[-2:]
        shift = 0  # where the image's logits start in the output
        if self.padding == "valid":
            shift = TILE_OFFSET - VALID_MARGIN
            x = mirror_pad(
                x,
                TILE_OFFSET,
                valid_input(height + shift) - height - TILE_OFFSET,
                TILE_OFFSET,
                valid_input(width + shift) - width - TILE_OFFSET,
            )
        else:
            x = mirror_pad(x, 0, -height % 16, 0, -width % 16)
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        x = self.dropout(x)
        for up, block, skip in zip(self.up, self.up_convs, reversed(skips), strict=True):
            x = up(x)
            if self.upconv_relu:
                x = torch.relu(x)
            x = block(torch.cat([center_crop(skip, x.shape[-2:]), x], dim=1))
        return self.final(x)[..., shift : shift + height, shift : shift + width]


def valid_input(size: int) -> int:
    """Smallest valid tile side (16k + 124, as 572 = 16*28 + 124) whose output (tile - 184) covers `size`."""
    return 16 * math.ceil((size + 60) / 16) + 124


@register_model
def unet(
    *,
    num_classes: int,
    in_channels: int = 3,
    width: float = 1.0,
    padding: str = "valid",
    upconv_relu: bool = False,
    last_up_channels: int = 0,
) -> UNet:
    """U-Net (arXiv:1505.04597); padding="valid" is the paper's network, "same" adds BN and padded convs;
    upconv_relu / last_up_channels=128 give the authors' released phseg_v5 network."""
    return UNet(
        num_classes,
        in_channels=in_channels,
        width=width,
        padding=padding,
        upconv_relu=upconv_relu,
        last_up_channels=last_up_channels,
    )
