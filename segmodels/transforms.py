"""ImageNet normalisation between uint8 images (N,H,W,3) and network inputs (N,3,H,W float).

Every backbone here is an ImageNet classifier (VGG16, ResNet), so inputs use torchvision's mean and std.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _channel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB image H,W,3 or N,H,W,3 (numpy or tensor) -> float32 tensor N,3,H,W, ImageNet-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if x.dtype != torch.uint8:
        raise TypeError(
            f"normalize expects a uint8 RGB image, got dtype {x.dtype}; pass the decoded 0-255 pixels"
        )
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"normalize expects an image of shape H,W,3 or N,H,W,3 (channels last), got {tuple(x.shape)}"
        )
    mean, std = _channel_stats(x.device)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return ((x - mean) / std).contiguous()


def denormalize(x: torch.Tensor) -> np.ndarray:
    """Inverse of `normalize`: float tensor N,3,H,W (or 3,H,W) -> uint8 numpy N,H,W,3 (or H,W,3).

    Used to hand the network input back to the dense CRF, whose bilateral kernel needs the RGB pixels.
    """
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"denormalize expects a tensor of shape N,3,H,W or 3,H,W, got {tuple(x.shape)}")
    batched = x.ndim == 4
    x = x.detach().to(torch.float32)
    if not batched:
        x = x.unsqueeze(0)
    mean, std = _channel_stats(x.device)
    pixels = ((x * std + mean) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return pixels if batched else pixels[0]
