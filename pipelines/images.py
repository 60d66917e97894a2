"""The one image decoder: JPEG/PNG bytes -> uint8 H,W,3 RGB, with the same rules everywhere.

prepare, the training feed, evaluation, predict, the pyfunc model and serving all decode through here, so
one upload gets one mask whichever way it comes in. The rules, in order:

1. File signature: JPEG or PNG. Other image formats (GIF, BMP, TIFF, WebP, ICO) are `unsupported`;
   anything else is `bad`.
2. Size from the header, before any pixel is decoded: over `max_pixels` (when given) is `too_large`;
   Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) holds in any case.
3. Decoded fully (a truncated file fails here, as `bad`).
4. EXIF orientation applied (`ImageOps.exif_transpose`): the pixels as a viewer shows them, which is how
   phone photos are annotated and looked at.
5. Modes to RGB: 16-bit grey (I;16, I) keeps its top 8 bits (value >> 8), so [0, 300, 40000, 65535] ->
   [0, 1, 156, 255]; a palette with transparency and LA/RGBA drop the alpha channel; CMYK, L, P, 1 convert
   with Pillow's rules.
6. The array is a writable copy (the dense CRF refuses read-only buffers).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
# Recognised but refused as unsupported rather than reported as garbage.
OTHER_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WebP",
    b"\x00\x00\x01\x00": "ICO",
}


ORIENTATION = 0x0112  # the EXIF tag


class ImageError(ValueError):
    """Bytes that are not a usable image; `kind` is `unsupported`, `bad` or `too_large`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def image_format(data: bytes) -> str:
    """JPEG or PNG from the file signature; ImageError for anything else."""
    kind = next((k for sig, k in SIGNATURES.items() if data.startswith(sig)), None)
    if kind is None:
        other = next((k for sig, k in OTHER_SIGNATURES.items() if data.startswith(sig)), None)
        if other:
            raise ImageError("unsupported", f"{other} image: convert it to JPEG or PNG")
        raise ImageError("bad", "not a JPEG or PNG image (unknown file signature)")
    return kind


def open_image(data: bytes, max_pixels: int = 0) -> Image.Image:
    """Rules 1-4: the decoded, upright Pillow image (its `format` is the file's, JPEG or PNG)."""
    kind = image_format(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])  # lazy: reads the header only
    except Image.DecompressionBombError as err:
        raise ImageError("too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("bad", f"unreadable {kind} header: {err}") from None
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}: downscale the image",
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError("bad", f"corrupt or truncated {kind}: {err}") from None
    if image.getexif().get(ORIENTATION, 1) == 1:
        return image  # already upright: no copy
    upright = ImageOps.exif_transpose(image)
    upright.format = kind
    return upright


def to_rgb(image: Image.Image) -> np.ndarray:
    """Rules 5-6: any JPEG/PNG mode -> a writable uint8 H,W,3 array."""
    if image.mode.startswith("I"):  # 16-bit grey: keep the top 8 bits
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.array(image.convert("RGB"))


def decode_image(data: bytes, max_pixels: int = 0) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 H,W,3 RGB by the module's rules; ImageError says what was wrong."""
    return to_rgb(open_image(data, max_pixels))
