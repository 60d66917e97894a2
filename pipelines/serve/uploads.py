"""Uploads: reading the request body within its limits, and decoding JPEG/PNG bytes safely.

The ingress reads the body (media type, declared and streamed length, multipart field `file`); the model
replica decodes it (signature, pixel count from the header before decoding, Pillow's bomb limit).
"""

from __future__ import annotations

import io
import json

import numpy as np
from fastapi import Request
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException


class ApiError(Exception):
    """An HTTP error answered as JSON {"error": short code, "detail": what was wrong and what to do}."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail

    def __reduce__(self):  # crosses process boundaries (a model replica's answer) intact
        return type(self), (self.status, self.error, self.detail)

    def body(self) -> bytes:
        return json.dumps({"error": self.error, "detail": self.detail}).encode()


ACCEPTED_MEDIA = ("image/jpeg", "image/png", "multipart/form-data")
SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
# Recognised but refused (415) rather than reported as garbage (400).
OTHER_IMAGE_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WebP",
    b"\x00\x00\x01\x00": "ICO",
}


async def read_upload(request: Request, limit: int) -> bytes:
    """The image bytes of a request: the raw body (image/jpeg, image/png) or the multipart field `file`.

    The declared length is checked before anything is read and the streamed body is cut off at `limit`.
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ACCEPTED_MEDIA:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {media or '(none)'} is not accepted: send the image as the body with "
            "Content-Type image/jpeg or image/png, or as field 'file' of a multipart/form-data upload",
        )
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(
            413,
            "payload_too_large",
            f"the body ({declared} bytes) is over the limit of {limit} bytes (max_body_mb): send a "
            "smaller image",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413,
                "payload_too_large",
                f"the body is over the limit of {limit} bytes (max_body_mb): send a smaller image",
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    if media == "multipart/form-data":
        body = await multipart_file(request, body)
    if not body:
        raise ApiError(400, "empty_body", "the request carries no image: send JPEG or PNG bytes")
    return body


async def multipart_file(request: Request, body: bytes) -> bytes:
    """Field `file` of a multipart body that was already read (and size-checked) by `read_upload`."""
    from starlette.formparsers import MultiPartException

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except (MultiPartException, HTTPException) as err:
        raise ApiError(
            400, "bad_multipart", f"unreadable multipart/form-data body: {getattr(err, 'detail', err)}"
        ) from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                400, "bad_multipart", "the multipart upload needs the image in a file field named 'file'"
            )
        return await upload.read()
    finally:
        await form.close()


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """JPEG or PNG bytes -> uint8 H,W,3 RGB; the size comes from the header and is checked before decoding.

    Pillow's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) stays in force above `max_pixels`.
    """
    kind = next((k for sig, k in SIGNATURES.items() if data.startswith(sig)), None)
    if kind is None:
        other = next((k for sig, k in OTHER_IMAGE_SIGNATURES.items() if data.startswith(sig)), None)
        if other:
            raise ApiError(
                415, "unsupported_media_type", f"{other} images are not accepted: convert to JPEG or PNG"
            )
        raise ApiError(400, "bad_image", "the body is not a JPEG or PNG image (unknown file signature)")
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])  # lazy: reads the header only
    except Image.DecompressionBombError as err:
        raise ApiError(413, "image_too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ApiError(400, "bad_image", f"unreadable {kind} header: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} (max_pixels): downscale the image",
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ApiError(400, "bad_image", f"corrupt or truncated {kind}: {err}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any JPEG/PNG mode (L, LA, P, RGBA, CMYK, 16-bit I;16) -> uint8 H,W,3; alpha is dropped."""
    if image.mode.startswith("I"):  # 16-bit grey: keep the top 8 bits
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.array(image.convert("RGB"))  # a writable copy: the dense CRF refuses read-only buffers
