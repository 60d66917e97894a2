"""Fully connected CRF post-processing (Kraehenbuehl & Koltun 2011) as used by DeepLab (ICLR 2015, section 4).

Energy: unary -log P(x_i) from the network, plus a bilateral appearance kernel
w1 * exp(-|p_i - p_j|^2 / (2 theta_alpha^2) - |I_i - I_j|^2 / (2 theta_beta^2)) and a smoothness kernel
w2 * exp(-|p_i - p_j|^2 / (2 theta_gamma^2)), with Potts compatibility; mean-field inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
from pydensecrf.utils import unary_from_softmax


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations and kernel parameters. Defaults: DeepLab's 10 iterations, w2 = theta_gamma = 3,
    and typical cross-validated bilateral values (w1 ~4-5, theta_alpha ~50-120, theta_beta ~3-5)."""

    iterations: int = 10
    w1: float = 4.0
    theta_alpha: float = 80.0
    theta_beta: float = 3.0
    w2: float = 3.0
    theta_gamma: float = 3.0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"CRFParams.iterations must be >= 1, got {self.iterations}")
        for name in ("theta_alpha", "theta_beta", "theta_gamma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CRFParams.{name} must be > 0, got {getattr(self, name)}")
        for name in ("w1", "w2"):
            if getattr(self, name) < 0:
                raise ValueError(f"CRFParams.{name} must be >= 0, got {getattr(self, name)}")


# Peak memory of one `dense_crf`, its float32 input included (bench/crf.py, pydensecrf2, 10 iterations):
# 64 B per pixel and class (unary, Q and message buffers; measured between 5 and 21 classes at 375x500)
# plus 512 B per pixel for the bilateral lattice, whose size grows with the image's colour variety (a
# photo-like 375x500 image needs ~410 B, uniform noise more), plus a 64 MB floor. Measured: 375x500 x 21
# 0.35 GB (0.40 GB on noise), 2048x1024 x 19 2.4 GB; this gives 0.41 and 3.7 GB.
CRF_BYTES_PER_PIXEL_CLASS = 64
CRF_BYTES_PER_PIXEL = 512
CRF_BYTES_FLOOR = 64 * 2**20


def crf_memory_bytes(height: int, width: int, num_classes: int) -> int:
    """Bytes to reserve for one `dense_crf` on an H x W image with C classes (e.g. as Ray `memory=`)."""
    pixels = height * width
    return CRF_BYTES_PER_PIXEL_CLASS * pixels * num_classes + CRF_BYTES_PER_PIXEL * pixels + CRF_BYTES_FLOOR


def dense_crf(
    image: np.ndarray, probs: np.ndarray | torch.Tensor, params: CRFParams = CRFParams()
) -> np.ndarray:
    """Refine class probabilities with a dense CRF: image H,W,3 uint8 RGB, probs C,H,W -> float32 C,H,W.

    Probabilities are clipped at 1e-5 before the log so a zero probability is a large, finite cost.
    The result sums to 1 over classes at every pixel.
    """
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float32)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            "dense_crf needs the RGB image as a uint8 numpy array of shape H,W,3, got "
            f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')} "
            "(segmodels.transforms.denormalize turns a network input back into one)"
        )
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs of shape {probs.shape} do not match image of shape {image.shape}: expected C,H,W with the "
            "image's H,W (upsample the probabilities to the image size first)"
        )
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative: pass softmax probabilities, not logits")
    num_classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=params.theta_gamma, compat=params.w2)
    # pydensecrf takes the image as a writable C buffer; decoded or Ray-shared arrays are often read-only.
    crf.addPairwiseBilateral(
        sxy=params.theta_alpha,
        srgb=params.theta_beta,
        rgbim=np.require(image, requirements=["C", "W"]),
        compat=params.w1,
    )
    refined = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return refined.reshape(num_classes, height, width)


def dense_crf_batch(
    images: np.ndarray, probs: np.ndarray | torch.Tensor, params: CRFParams = CRFParams()
) -> np.ndarray:
    """`dense_crf` over a batch: images N,H,W,3 uint8, probs N,C,H,W -> float32 N,C,H,W."""
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    if len(images) != len(probs):
        raise ValueError(
            f"got {len(images)} images but {len(probs)} probability maps: pass one map per image"
        )
    return np.stack([dense_crf(image, p, params) for image, p in zip(images, probs, strict=True)])
