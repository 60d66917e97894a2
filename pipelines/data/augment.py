"""Training-time augmentation, run inside Ray Data `map_batches` so every epoch draws new samples.

Random scale 0.5-2.0, rotation, crop, blur, U-Net's elastic deformation, 255 padding, flip and
photometric jitter (the PSPNet / DeepLab / U-Net recipes). The geometry is sampled first and only the
crop window is resampled from the source image. Images stay uint8 HWC until the worker normalises them
on its device, which keeps the object store traffic small.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from pipelines.config import TrainConfig
from pipelines.data.dataset import decode_mask
from pipelines.images import decode_image

IGNORE = 255
MEAN_RGB = (124, 116, 104)  # ImageNet mean in 0-255: padding colour, so padded pixels normalise to ~0


# The augmentation options a TrainConfig carries under the same names (and with the same defaults).
FROM_TRAIN_CONFIG = ("scale_min", "scale_max", "flip", "rotate_deg", "jitter", "blur", "elastic", "crop_mode")


def train_default(name: str):
    """TrainConfig's default for `name`: the one place augmentation defaults are written."""
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


@dataclass(frozen=True)
class AugmentParams:
    crop: int
    scale_min: float = train_default("scale_min")
    scale_max: float = train_default("scale_max")
    flip: bool = train_default("flip")
    rotate_deg: float = train_default("rotate_deg")
    jitter: float = train_default("jitter")
    blur: float = train_default("blur")
    elastic: bool = train_default("elastic")
    unet_weights: bool = False
    crop_mode: str = train_default("crop_mode")  # random | object | proposal (DeconvNet, see object_window)

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> AugmentParams:
        shared = {name: getattr(cfg, name) for name in FROM_TRAIN_CONFIG}
        return cls(crop=cfg.crop, unet_weights=cfg.pixel_weight == "unet", **shared)


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


@dataclass(frozen=True)
class CropWindow:
    """Where one training crop comes from, sampled before any pixel is touched.

    The frame is the image resized by `scale` to `size` (width, height), rotated by `angle` degrees
    counter-clockwise about its centre keeping its size (as PIL's `rotate`), then padded bottom/right so a
    full crop fits; (x, y) is the crop's top-left corner in that frame.
    """

    scale: float
    size: tuple[int, int]
    angle: float
    x: int
    y: int
    flip: bool


def sample_window(height: int, width: int, p: AugmentParams, rng: np.random.Generator) -> CropWindow:
    """Scale in [scale_min, scale_max], angle in +-rotate_deg, crop corner uniform over the padded frame."""
    scale = rng.uniform(p.scale_min, p.scale_max)
    size = (width, height)
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
    angle = rng.uniform(-p.rotate_deg, p.rotate_deg) if p.rotate_deg else 0.0
    y = int(rng.integers(0, max(size[1], p.crop) - p.crop + 1))
    x = int(rng.integers(0, max(size[0], p.crop) - p.crop + 1))
    return CropWindow(scale, size, angle, x, y, bool(p.flip and rng.random() < 0.5))


def object_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes (x1, y1, x2, y2) of the ground-truth objects of a label map: each connected region of one
    foreground class (not background 0, not ignore 255)."""
    from scipy import ndimage

    boxes = []
    for cls in np.unique(mask):
        if cls in (0, IGNORE):
            continue
        regions, _ = ndimage.label(mask == cls)
        boxes += [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(regions)]
    return boxes


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def proposal_around(
    box: tuple[int, ...], rng: np.random.Generator, *, min_iou: float = 0.5
) -> tuple[float, ...]:
    """A box overlapping `box` by IoU >= min_iou, shifted and resized at random: what a proposal method
    returns for an object (DeconvNet stage 2 trains on proposals that overlap the ground truth)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    for _ in range(20):
        sw, sh = rng.uniform(0.7, 1.4, size=2)
        cx = (x1 + x2) / 2 + rng.uniform(-0.3, 0.3) * w
        cy = (y1 + y2) / 2 + rng.uniform(-0.3, 0.3) * h
        candidate = (cx - sw * w / 2, cy - sh * h / 2, cx + sw * w / 2, cy + sh * h / 2)
        if box_iou(candidate, box) >= min_iou:
            return candidate
    return tuple(float(v) for v in box)


def object_window(height: int, width: int, mask: np.ndarray, p: AugmentParams, rng: np.random.Generator):
    """DeconvNet's training crops (Noh et al., section 4.2), or None when the mask has no object.

    `object` (stage 1): a square 1.2x the longer side of a random ground-truth object, centred on it;
    `proposal` (stage 2, harder): the same around a box drawn with IoU >= 0.5 against the object, so
    objects appear off-centre, cut and at other scales. The square is scaled to the paper's 250/224 of
    the crop and a random crop-sized window is taken from it (the paper's random 224 crops of 250x250).
    """
    boxes = object_boxes(mask)
    if not boxes:
        return None
    box = boxes[int(rng.integers(len(boxes)))]
    if p.crop_mode == "proposal":
        box = proposal_around(box, rng)
    x1, y1, x2, y2 = box
    canvas = p.crop * 250 / 224
    scale = float(np.clip(canvas / (1.2 * max(x2 - x1, y2 - y1, 1)), 0.25, 4.0))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    jitter = max(0, round(canvas) - p.crop)
    x = round((x1 + x2) / 2 * scale - canvas / 2) + int(rng.integers(0, jitter + 1))
    y = round((y1 + y2) / 2 * scale - canvas / 2) + int(rng.integers(0, jitter + 1))
    x = min(max(x, 0), max(size[0] - p.crop, 0))
    y = min(max(y, 0), max(size[1] - p.crop, 0))
    return CropWindow(scale, size, 0.0, x, y, bool(p.flip and rng.random() < 0.5))


def window_to_source(window: CropWindow, height: int, width: int) -> tuple[float, ...]:
    """PIL AFFINE coefficients (a, b, c, d, e, f): crop point (u, v) -> source (a u + b v + c, d u + e v + f).

    Continuous coordinates with pixel i spanning [i, i + 1), PIL's convention for `resize`, `rotate` and
    `transform`, so crop -> rotated frame is a shift by (x, y), rotated -> resized frame is `rotate`'s own
    inverse map about (w' / 2, h' / 2), and resized -> source multiplies by width / w', height / h'.
    """
    wf, hf = window.size
    theta = -math.radians(window.angle)
    # Rounded like PIL's rotate, whose output this reproduces pixel for pixel at scale 1.
    cos, sin = round(math.cos(theta), 15), round(math.sin(theta), 15)
    sx, sy = width / wf, height / hf
    tx, ty = window.x - wf / 2, window.y - hf / 2
    return (
        sx * cos,
        sx * sin,
        sx * (cos * tx + sin * ty + wf / 2),
        -sy * sin,
        sy * cos,
        sy * (-sin * tx + cos * ty + hf / 2),
    )


def warp_window(
    image: np.ndarray, mask: np.ndarray, window: CropWindow, crop: int
) -> tuple[np.ndarray, np.ndarray]:
    """HxWx3 uint8 image, HxW mask -> the part of the window inside the frame (h x w <= crop x crop).

    Resampled straight from the source, image bilinear and mask nearest. Without rotation this is PIL's
    separable resize of the window's source box: the sample positions and filter of resizing the whole
    image (anti-aliased below scale 1), so the crop matches the whole-image path to a grey level. With
    rotation it is one affine warp, whose bilinear is not anti-aliased (like the OpenCV warps of the PSPNet
    recipe); pixels it brings in from outside the image get the mean colour and the ignore label. Flipped
    left-right when `window.flip`.
    """
    height, width = mask.shape
    size = (min(crop, window.size[0] - window.x), min(crop, window.size[1] - window.y))
    img, msk = Image.fromarray(image), Image.fromarray(mask)
    if window.angle == 0.0:
        sx, sy = width / window.size[0], height / window.size[1]
        x1, y1 = min(width, (window.x + size[0]) * sx), min(height, (window.y + size[1]) * sy)
        box = (window.x * sx, window.y * sy, x1, y1)
        img, msk = img.resize(size, Image.BILINEAR, box=box), msk.resize(size, Image.NEAREST, box=box)
    else:
        coeffs = window_to_source(window, height, width)
        img = img.transform(size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=MEAN_RGB)
        msk = msk.transform(size, Image.AFFINE, coeffs, Image.NEAREST, fillcolor=IGNORE)
    if window.flip:  # PIL's transpose: several times faster than copying a reversed numpy view
        img, msk = img.transpose(Image.FLIP_LEFT_RIGHT), msk.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img), np.asarray(msk)


def augment_sample(
    image: np.ndarray, mask: np.ndarray, p: AugmentParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One HxWx3 uint8 image and HxW mask -> crop x crop pair.

    Crop first: scale, rotation, flip and the crop window are sampled, then only the window is resampled,
    so the cost follows the crop size and not the (up to 2x up-scaled) image. Blur (radius in crop pixels)
    and elastic deformation run on the window's part inside the frame, before the padding as they did on
    the whole image; photometric jitter on the padded crop.
    """
    window = None
    if p.crop_mode != "random":
        window = object_window(mask.shape[0], mask.shape[1], mask, p, rng)
    if window is None:
        window = sample_window(mask.shape[0], mask.shape[1], p, rng)
    img, msk = warp_window(image, mask, window, p.crop)
    if p.blur and rng.random() < p.blur:
        blurred = Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        img = np.asarray(blurred)
    if p.elastic:
        img, msk = elastic_deform(img, msk, rng)
    h, w = msk.shape
    if (h, w) != (p.crop, p.crop):
        # Padding is bottom/right of the frame, so left of a flipped crop. Mean colour normalises to ~0.
        cols = slice(p.crop - w, p.crop) if window.flip else slice(0, w)
        padded_img = np.empty((p.crop, p.crop, 3), dtype=np.uint8)
        padded_img[...] = MEAN_RGB
        padded_img[:h, cols] = img
        padded_msk = np.full((p.crop, p.crop), IGNORE, dtype=np.uint8)
        padded_msk[:h, cols] = msk
        img, msk = padded_img, padded_msk
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
