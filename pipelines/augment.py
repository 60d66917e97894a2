"""Training-time augmentation, run inside Ray Data `map_batches` so every epoch draws new samples.

Random scale 0.5-2.0, rotation, blur, U-Net's elastic deformation, crop with 255 padding, flip and
photometric jitter (the PSPNet / DeepLab / U-Net recipes). Images stay uint8 HWC until the worker
normalises them on its device, which keeps the object store traffic small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from pipelines.dataset import decode_image, decode_mask

IGNORE = 255
MEAN_RGB = (124, 116, 104)  # ImageNet mean in 0-255: padding colour, so padded pixels normalise to ~0


@dataclass(frozen=True)
class AugmentParams:
    crop: int
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    rotate_deg: float = 0.0
    jitter: float = 0.0
    blur: float = 0.0
    elastic: bool = False
    unet_weights: bool = False

    @classmethod
    def from_train_config(cls, cfg) -> AugmentParams:
        return cls(
            crop=cfg.crop,
            scale_min=cfg.scale_min,
            scale_max=cfg.scale_max,
            flip=cfg.flip,
            rotate_deg=cfg.rotate_deg,
            jitter=cfg.jitter,
            blur=cfg.blur,
            elastic=cfg.elastic,
            unet_weights=cfg.pixel_weight == "unet",
        )


def elastic_deform(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, grid: int = 3, std: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """U-Net's elastic deformation: random displacements on a coarse grid, bicubically interpolated."""
    from scipy.ndimage import map_coordinates, zoom

    h, w = mask.shape
    coarse = rng.normal(0.0, std, size=(2, grid, grid))
    field = np.stack([zoom(c, (h / grid, w / grid), order=3)[:h, :w] for c in coarse])
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([yy + field[0], xx + field[1]])
    warped = np.stack(
        [map_coordinates(image[..., c], coords, order=3, mode="reflect") for c in range(image.shape[2])],
        axis=-1,
    )
    warped_mask = map_coordinates(mask, coords, order=0, mode="constant", cval=IGNORE)
    return np.clip(warped, 0, 255).astype(np.uint8), warped_mask.astype(np.uint8)


def photometric_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation factors in [1 - strength, 1 + strength]."""
    img = image.astype(np.float32)
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    img = img * brightness
    img = (img - img.mean()) * contrast + img.mean()
    gray = img.mean(axis=2, keepdims=True)
    img = (img - gray) * saturation + gray
    return np.clip(img, 0, 255).astype(np.uint8)


def augment_sample(
    image: np.ndarray, mask: np.ndarray, p: AugmentParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One HxWx3 uint8 image and HxW mask -> crop x crop pair."""
    pil_img, pil_mask = Image.fromarray(image), Image.fromarray(mask)
    scale = rng.uniform(p.scale_min, p.scale_max)
    if scale != 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        pil_img = pil_img.resize(size, Image.BILINEAR)
        pil_mask = pil_mask.resize(size, Image.NEAREST)
    if p.rotate_deg:
        angle = rng.uniform(-p.rotate_deg, p.rotate_deg)
        pil_img = pil_img.rotate(angle, Image.BILINEAR, fillcolor=MEAN_RGB)
        pil_mask = pil_mask.rotate(angle, Image.NEAREST, fillcolor=IGNORE)
    if p.blur and rng.random() < p.blur:
        pil_img = pil_img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    img, msk = np.asarray(pil_img), np.asarray(pil_mask)
    if p.elastic:
        img, msk = elastic_deform(img, msk, rng)
    # Pad (image with the mean colour, mask with ignore) so a full crop always fits, then crop at random.
    h, w = msk.shape
    ph, pw = max(p.crop - h, 0), max(p.crop - w, 0)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        img[h:, :, :] = MEAN_RGB
        img[:, w:, :] = MEAN_RGB
        msk = np.pad(msk, ((0, ph), (0, pw)), constant_values=IGNORE)
    y = int(rng.integers(0, msk.shape[0] - p.crop + 1))
    x = int(rng.integers(0, msk.shape[1] - p.crop + 1))
    img, msk = img[y : y + p.crop, x : x + p.crop], msk[y : y + p.crop, x : x + p.crop]
    if p.flip and rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    if p.jitter:
        img = photometric_jitter(img, p.jitter, rng)
    return np.ascontiguousarray(img), np.ascontiguousarray(msk)


def augment_batch(batch: dict[str, np.ndarray], params: AugmentParams) -> dict[str, np.ndarray]:
    """Ray Data UDF: parquet rows (encoded bytes) -> fixed-size uint8 crops (+ U-Net weight maps)."""
    rng = np.random.default_rng()
    images, masks = [], []
    for img_bytes, mask_bytes in zip(batch["image"], batch["mask"], strict=True):
        img, msk = augment_sample(decode_image(img_bytes), decode_mask(mask_bytes), params, rng)
        images.append(img)
        masks.append(msk)
    out = {"image": np.stack(images), "mask": np.stack(masks)}
    if params.unet_weights:
        from segmodels.losses import unet_weight_map

        out["weight"] = np.stack([np.asarray(unet_weight_map(m), dtype=np.float32) for m in masks])
    return out


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validation UDF: decode without augmentation; sizes may differ, so arrays are object-typed."""
    images = np.empty(len(batch["image"]), dtype=object)
    masks = np.empty(len(batch["mask"]), dtype=object)
    for i, (img_bytes, mask_bytes) in enumerate(zip(batch["image"], batch["mask"], strict=True)):
        images[i] = decode_image(img_bytes)
        masks[i] = decode_mask(mask_bytes)
    return {"image_id": batch["image_id"], "image": images, "mask": masks}
