"""Uploads: reading the request body within its limits, and decoding JPEG/PNG bytes safely.

The ingress reads the body (media type, declared and streamed length, multipart field `file`); the model
replica decodes it with `pipelines.images` (the rules every stage decodes by) and answers its errors here.
"""

from __future__ import annotations

import json

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from pipelines.images import ImageError, decode_image


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
    """JPEG or PNG bytes -> uint8 H,W,3 RGB by `pipelines.images`' rules; its errors as HTTP errors:
    unsupported formats 415, too many pixels (from the header, before decoding) 413, anything else 400."""
    try:
        return decode_image(data, max_pixels)
    except ImageError as err:
        status, code = {
            "unsupported": (415, "unsupported_media_type"),
            "too_large": (413, "image_too_large"),
        }.get(err.kind, (400, "bad_image"))
        detail = f"{err} (the server's max_pixels)" if err.kind == "too_large" else str(err)
        raise ApiError(status, code, detail) from None
