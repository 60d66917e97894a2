"""The one image decoder's rules (pipelines.images), on the images decoders disagree about."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.images import ImageError, decode_image


def test_sixteen_bit_grey_keeps_the_top_byte(tricky_images):
    data, _ = tricky_images["grey16.png"]
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = decode_image(data)
    assert rgb[0, :4, 0].tolist() == [0, 1, 156, 255]  # [0, 300, 40000, 65535] >> 8
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_exif_orientation_gives_the_pixels_a_viewer_shows(tricky_images):
    data, shape = tricky_images["rotated.jpg"]
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    upright = decode_image(data)
    assert stored.shape[:2] == shape[::-1] and upright.shape[:2] == shape
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))  # orientation 6: 90 degrees clockwise


@pytest.mark.parametrize("name", ["cmyk.jpg", "transparent.png", "grey16.png", "rotated.jpg"])
def test_every_tricky_image_becomes_writable_rgb(tricky_images, name):
    data, shape = tricky_images[name]
    rgb = decode_image(data)
    assert rgb.shape == (*shape, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable


def test_unusable_bytes_say_why(tricky_images):
    gif = io.BytesIO()
    Image.new("P", (4, 4)).save(gif, format="GIF")
    data, _ = tricky_images["cmyk.jpg"]
    cases = [
        (gif.getvalue(), 0, "unsupported", "GIF image"),
        (b"hello", 0, "bad", "unknown file signature"),
        (data[: len(data) // 2], 0, "bad", "truncated"),
        (data, 100, "too_large", "40x28 = 1120 pixels is over the limit of 100"),  # from the header
    ]
    for payload, max_pixels, kind, message in cases:
        with pytest.raises(ImageError, match=message) as caught:
            decode_image(payload, max_pixels=max_pixels)
        assert caught.value.kind == kind
