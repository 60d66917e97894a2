"""Crop-first augmentation: image/label alignment, the fill outside the image, the identity crop, the
sampled distribution, and the batch UDF's output."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from pipelines.data.augment import (
    IGNORE,
    MEAN_RGB,
    AugmentParams,
    augment_batch,
    augment_sample,
    box_iou,
    object_boxes,
    proposal_around,
    sample_window,
)
from pipelines.data.layouts.voc import voc_colormap

PALETTE = np.array(voc_colormap(21), dtype=np.uint8)  # no entry equals MEAN_RGB


def checkerboard(height: int, width: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells of classes 1-20, neighbours always different; the image is each class's palette colour."""
    rows, cols = np.arange(height)[:, None] // cell, np.arange(width)[None, :] // cell
    mask = ((rows * 7 + cols * 3) % 20 + 1).astype(np.uint8)
    return PALETTE[np.minimum(mask, 20)], mask


def interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood carries one label: outside the band where bilinear mixes colours.

    The crop's own border is left out: its neighbours outside the crop are unknown."""
    padded = np.pad(mask, 1, constant_values=IGNORE)
    same = np.ones(mask.shape, dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] == mask
    return same & (mask != IGNORE)


def reference_crop(image, mask, crop, x, y, flip):
    """The previous rule at scale 1 without rotation: pad bottom/right (mean colour, ignore), then crop."""
    h, w = mask.shape
    img = np.empty((max(h, crop), max(w, crop), 3), dtype=np.uint8)
    img[...] = MEAN_RGB
    img[:h, :w] = image
    msk = np.full(img.shape[:2], IGNORE, dtype=np.uint8)
    msk[:h, :w] = mask
    img, msk = img[y : y + crop, x : x + crop], msk[y : y + crop, x : x + crop]
    return (img[:, ::-1], msk[:, ::-1]) if flip else (img, msk)


def test_labels_stay_aligned_with_pixels_under_scale_rotation_flip_and_crop():
    image, mask = checkerboard(60, 80, cell=11)
    p = AugmentParams(crop=56, scale_min=0.5, scale_max=2.0, rotate_deg=30.0, flip=True)
    checked = 0
    for seed in range(24):
        img, msk = augment_sample(image, mask, p, np.random.default_rng(seed))
        assert img.shape == (56, 56, 3) and msk.shape == (56, 56)
        assert set(np.unique(msk)) <= set(range(1, 21)) | {IGNORE}
        inside = interior(msk)
        np.testing.assert_array_equal(img[inside], PALETTE[msk[inside]], err_msg=f"seed {seed}")
        checked += int(inside.sum())
    assert checked > 24 * 56 * 56 // 3  # the band is thin: most labelled pixels are checked


def test_out_of_image_pixels_get_ignore_and_the_mean_colour():
    image, mask = checkerboard(20, 30, cell=5)
    # A small image in a large crop: the bottom/right padding.
    p = AugmentParams(crop=64, scale_min=1.0, scale_max=1.0, flip=False)
    img, msk = augment_sample(image, mask, p, np.random.default_rng(0))
    np.testing.assert_array_equal(msk[:20, :30], mask)
    np.testing.assert_array_equal(img[:20, :30], image)
    assert (msk[20:] == IGNORE).all() and (msk[:, 30:] == IGNORE).all()
    assert (img[20:] == MEAN_RGB).all() and (img[:, 30:] == MEAN_RGB).all()
    # Rotation corners: the resized frame fits in the crop, so its rotated-away corners show.
    image, mask = checkerboard(40, 40, cell=6)
    p = AugmentParams(crop=40, scale_min=0.8, scale_max=1.0, rotate_deg=45.0, flip=False)
    for seed in range(16):
        window = sample_window(40, 40, p, np.random.default_rng(seed))
        img, msk = augment_sample(image, mask, p, np.random.default_rng(seed))
        filled = (img == MEAN_RGB).all(axis=2)
        # Image and mask take the same inside/outside decision, up to one pixel along the image's edge:
        # PIL warps nearest-neighbour in fixed point and bilinear in double precision.
        edge = binary_dilation(filled) & binary_dilation(~filled)
        disagree = (msk == IGNORE) != filled
        assert not (disagree & ~edge).any(), f"seed {seed}"
        assert disagree.sum() <= 4, f"seed {seed}"
        w, h = window.size
        assert not filled[h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2].any()  # the centre is inside
        if abs(window.angle) > 5:
            assert (msk[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]] == IGNORE).all(), f"seed {seed}"
        assert (msk[h:] == IGNORE).all() and (msk[:, w:] == IGNORE).all()


@pytest.mark.parametrize(("size", "crop"), [((37, 50), 24), ((37, 50), 64), ((37, 50), 44)])
@pytest.mark.parametrize("flip", [False, True])
def test_identity_transform_is_a_plain_crop(size, crop, flip):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, size=size, dtype=np.uint8)
    p = AugmentParams(crop=crop, scale_min=1.0, scale_max=1.0, flip=flip)
    for seed in range(6):
        window = sample_window(*size, p, np.random.default_rng(seed))
        img, msk = augment_sample(image, mask, p, np.random.default_rng(seed))
        ref_img, ref_msk = reference_crop(image, mask, crop, window.x, window.y, window.flip)
        assert img.tobytes() == ref_img.tobytes() and msk.tobytes() == ref_msk.tobytes()


@pytest.mark.parametrize("flip", [False, True])
def test_rotation_at_scale_one_matches_pil_rotate_then_crop(flip):
    """One warp reproduces PIL's rotate about the image centre (same size, same fill) pixel for pixel."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(30, 42, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, size=(30, 42), dtype=np.uint8)
    p = AugmentParams(crop=36, scale_min=1.0, scale_max=1.0, rotate_deg=20.0, flip=flip)
    for seed in range(4):
        window = sample_window(30, 42, p, np.random.default_rng(seed))
        img, msk = augment_sample(image, mask, p, np.random.default_rng(seed))
        rotated = Image.fromarray(image).rotate(window.angle, Image.BILINEAR, fillcolor=MEAN_RGB)
        rotated_mask = Image.fromarray(mask).rotate(window.angle, Image.NEAREST, fillcolor=IGNORE)
        ref_img, ref_msk = reference_crop(
            np.asarray(rotated), np.asarray(rotated_mask), 36, window.x, window.y, window.flip
        )
        np.testing.assert_array_equal(img, ref_img)
        np.testing.assert_array_equal(msk, ref_msk)


def test_scaling_without_rotation_matches_resizing_the_whole_image_then_cropping():
    """The window's source box resized alone: same samples and anti-aliasing as the whole-image resize."""
    image, mask = checkerboard(30, 42, cell=5)
    image = np.clip(image + np.random.default_rng(1).normal(0, 20, image.shape), 0, 255).astype(np.uint8)
    p = AugmentParams(crop=40, scale_min=0.5, scale_max=2.0, flip=True)
    for seed in range(12):
        window = sample_window(30, 42, p, np.random.default_rng(seed))
        img, msk = augment_sample(image, mask, p, np.random.default_rng(seed))
        resized = Image.fromarray(image).resize(window.size, Image.BILINEAR)
        resized_mask = Image.fromarray(mask).resize(window.size, Image.NEAREST)
        ref_img, ref_msk = reference_crop(
            np.asarray(resized), np.asarray(resized_mask), 40, window.x, window.y, window.flip
        )
        # Float rounding of the box corners moves samples by a hair: a grey level or two, and where a
        # sample sits exactly between two source pixels the nearest label may be the neighbour's.
        assert np.abs(img.astype(int) - ref_img).max() <= 2, f"seed {seed}"
        padded = np.pad(ref_msk, 1, mode="edge")
        neighbours = [
            padded[1 + dy : 41 + dy, 1 + dx : 41 + dx] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
        ]
        assert ((msk == ref_msk) | np.any([msk == n for n in neighbours], axis=0)).all(), f"seed {seed}"
        assert (msk != ref_msk).mean() <= 0.1, f"seed {seed}"  # a few tied rows or columns


def test_sampled_scales_angles_flips_and_crop_corners_cover_their_ranges():
    p = AugmentParams(crop=100, scale_min=0.5, scale_max=2.0, rotate_deg=10.0, flip=True)
    rng = np.random.default_rng(0)
    windows = [sample_window(75, 120, p, rng) for _ in range(4000)]
    scales = np.array([w.scale for w in windows])
    assert 0.5 <= scales.min() < 0.51 and 1.99 < scales.max() <= 2.0
    assert np.quantile(scales, [0.25, 0.5, 0.75]) == pytest.approx([0.875, 1.25, 1.625], abs=0.05)
    angles = np.array([w.angle for w in windows])
    assert -10.0 <= angles.min() < -9.9 and 9.9 < angles.max() <= 10.0 and abs(angles.mean()) < 0.3
    assert np.mean([w.flip for w in windows]) == pytest.approx(0.5, abs=0.03)
    for w in windows:
        assert w.size == (max(1, round(120 * w.scale)), max(1, round(75 * w.scale)))
        # Corner uniform over the padded frame: 0 .. max(frame, crop) - crop.
        assert 0 <= w.x <= max(w.size[0], 100) - 100 and 0 <= w.y <= max(w.size[1], 100) - 100
    # At a fixed scale of 2 (frame 240 x 150) the corner is uniform over 0..140 and 0..50.
    p2 = AugmentParams(crop=100, scale_min=2.0, scale_max=2.0)
    corners = np.array([(w.x, w.y) for w in (sample_window(75, 120, p2, rng) for _ in range(4000))])
    assert corners.min(axis=0).tolist() == [0, 0] and corners.max(axis=0).tolist() == [140, 50]
    assert corners.mean(axis=0) == pytest.approx([70, 25], abs=2.5)


def test_blur_runs_on_the_crop_with_its_probability_and_leaves_labels_alone():
    image, mask = checkerboard(40, 50, cell=7)
    sharp = AugmentParams(crop=32, scale_min=0.75, scale_max=1.5, rotate_deg=10.0)
    blurry = AugmentParams(crop=32, scale_min=0.75, scale_max=1.5, rotate_deg=10.0, blur=0.5)
    blurred = 0
    for seed in range(60):
        img_a, msk_a = augment_sample(image, mask, sharp, np.random.default_rng(seed))
        img_b, msk_b = augment_sample(image, mask, blurry, np.random.default_rng(seed))
        np.testing.assert_array_equal(msk_a, msk_b)  # geometry is sampled before the blur
        blurred += not np.array_equal(img_a, img_b)
    assert 18 <= blurred <= 42


def test_augment_batch_decodes_and_returns_fixed_size_crops_with_unet_weights():
    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    image, mask = checkerboard(30, 40, cell=6)
    batch = {
        "image": np.array([png(image)] * 2, dtype=object),
        "mask": np.array([png(mask)] * 2, dtype=object),
    }
    p = AugmentParams(
        crop=32, scale_min=1.0, scale_max=1.0, rotate_deg=10.0, jitter=0.2, elastic=True, unet_weights=True
    )
    out = augment_batch(batch, p)
    assert out["image"].shape == (2, 32, 32, 3) and out["image"].dtype == np.uint8
    assert out["mask"].shape == (2, 32, 32) and out["weight"].shape == (2, 32, 32)
    assert set(np.unique(out["mask"])) <= set(range(1, 21)) | {IGNORE}


def objects_mask() -> np.ndarray:
    """A 200x300 label map with two objects: class 3 at rows 20-59, cols 30-89; class 7 at 120-179, 200-279."""
    mask = np.zeros((200, 300), np.uint8)
    mask[20:60, 30:90] = 3
    mask[120:180, 200:280] = 7
    mask[0, :] = IGNORE
    return mask


def test_object_boxes_are_the_connected_regions_of_each_class() -> None:
    assert sorted(object_boxes(objects_mask())) == [(30, 20, 90, 60), (200, 120, 280, 180)]
    assert object_boxes(np.zeros((8, 8), np.uint8)) == []


def test_object_crops_are_centred_on_a_ground_truth_object() -> None:
    """DeconvNet stage 1: the object fills about 1/1.2 of the 250/224 canvas around it, at its centre."""
    rng = np.random.default_rng(0)
    params = AugmentParams(crop=64, flip=False, crop_mode="object")
    mask = objects_mask()
    image = PALETTE[np.minimum(mask, 20)]
    for _ in range(20):
        img, crop = augment_sample(image, mask, params, rng)
        assert crop.shape == (64, 64) and img.shape == (64, 64, 3)
        labels = set(np.unique(crop)) - {0, IGNORE}
        assert len(labels) == 1  # one object, seen whole or nearly
        ys, xs = np.nonzero(crop == labels.pop())
        # Object side = canvas / 1.2 = 59.5 px; the random 64-of-71 crop shifts it by at most 7 px.
        assert 50 <= max(np.ptp(ys), np.ptp(xs)) + 1 <= 62
        assert abs(ys.mean() - 32) <= 8 and abs(xs.mean() - 32) <= 8


def test_proposal_crops_overlap_an_object_by_at_least_half() -> None:
    rng = np.random.default_rng(1)
    box = (30, 20, 90, 60)
    boxes = [proposal_around(box, rng) for _ in range(200)]
    assert all(box_iou(b, box) >= 0.5 for b in boxes)
    assert len({tuple(round(v) for v in b) for b in boxes}) > 100  # varied, not the object box again
    params = AugmentParams(crop=64, flip=False, crop_mode="proposal")
    mask = objects_mask()
    seen = [
        set(np.unique(augment_sample(PALETTE[np.minimum(mask, 20)], mask, params, rng)[1])) - {0, IGNORE}
        for _ in range(20)
    ]
    assert all(s for s in seen)  # every crop still shows an object


def test_object_mode_without_objects_falls_back_to_random_crops() -> None:
    mask = np.zeros((100, 100), np.uint8)
    img, crop = augment_sample(
        PALETTE[np.minimum(mask, 20)],
        mask,
        AugmentParams(crop=64, crop_mode="object"),
        np.random.default_rng(0),
    )
    assert crop.shape == (64, 64) and set(np.unique(crop)) <= {0, IGNORE}
