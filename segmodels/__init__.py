"""segmodels: the six papers' segmentation networks (eight registered models) in plain PyTorch.

    import segmodels
    model = segmodels.build_model("fcn8s", num_classes=21)  # N,3,H,W -> N,21,H,W logits

Importing this package loads torch and torchvision only; losses, metrics, inference, CRF and ensembling
live in their own submodules (`segmodels.losses`, ...).
"""

from .registry import MODEL_REGISTRY, build_model, register_model
from .transforms import IMAGENET_MEAN, IMAGENET_STD
from .weights import load_backbone_weights

# Importing the architecture modules registers their builders; the import order is the order of MODELS.
# isort: off
from . import fcn, deconvnet, deeplab, dilation, unet, pspnet  # noqa: F401
# isort: on

MODELS = tuple(MODEL_REGISTRY)  # the eight paper models: fcn32s, fcn16s, fcn8s, ..., pspnet

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "MODEL_REGISTRY",
    "build_model",
    "load_backbone_weights",
    "register_model",
]
