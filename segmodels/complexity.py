"""Model size and cost: parameter counts and multiply-accumulates of one forward pass.

MACs come from `torch.utils.flop_counter.FlopCounterMode` (convolutions, transposed convolutions and
matrix products; MACs = FLOPs / 2). Pooling, normalisation, activations and interpolation are not
counted, as in the papers' figures. Works on the `meta` device, so full-size models cost nothing to measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, exclude_aux: bool = True) -> int:
    """Number of parameters; with `exclude_aux`, training-only auxiliary heads (`aux*`) are left out."""
    return sum(
        p.numel() for name, p in model.named_parameters() if not (exclude_aux and name.startswith("aux"))
    )


def count_gmacs(model: nn.Module, size: Sequence[int] = (512, 512)) -> float:
    """GMACs of one eval-mode forward pass on a 1 x in_channels x H x W input, `size` = (H, W)."""
    param = next(model.parameters())
    x = torch.zeros(1, getattr(model, "in_channels", 3), *size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2e9
