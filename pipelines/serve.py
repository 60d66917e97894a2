"""Serving stage: the registered model on an autoscaled Ray Serve endpoint.

    HTTP -> Serve proxy -> SegmentationIngress (FastAPI: decode, fan out, average, CRF, encode)
                              -> MemberModel_0 ... MemberModel_{K-1}  (one per ensemble member, @serve.batch)

Each member network runs in its own deployment with its own autoscaling and CPU/GPU resources, batching
concurrent images of equal size. The ingress averages the members' probabilities with the model's
ensemble weights (what `segmodels.ensemble.Ensemble` computes in one process), applies the optional
dense CRF and answers a palette PNG, JSON statistics or a JPEG overlay.

Only the operator's configuration picks the model (`model_uri`); no request parameter names a path or
a URL. With `models:/NAME@ALIAS` the ingress polls the alias; when it moves, the members load the new
version and only then does the ingress switch. A request keeps the version it started with, so none
fails during an update.

`pipelines.serve:app` is the args builder for `serve run` / `serve deploy` (cluster/serve_config.yaml);
`start_server` / `stop_server` run the same application from Python (the CLI, the tests, the demo).
"""

import asyncio
import dataclasses
import io
import json
import logging
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from pipelines.errors import UserError

logger = logging.getLogger("ray.serve")

APP_NAME = "segpipe"
# The proxy gives up this long after the app's own timeout, so clients normally get the app's JSON 504.
PROXY_TIMEOUT_MARGIN_S = 5.0
# Model versions a member replica keeps loaded: the current one and the one in-flight requests may still use.
KEEP_VERSIONS = 2


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ServeConfig:
    """The endpoint: which model, how it scales, and the limits that protect it."""

    model_uri: str  # runs:/ID/model, models:/NAME/VERSION, models:/NAME@ALIAS (followed) or a model folder
    tracking_uri: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    # Autoscaling of every member deployment (replicas of one member network each).
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0
    # Ray's CPU reservations (each replica computes on one thread): small enough that a two-member ensemble
    # fits on a 2-core machine; raise member_cpus on a cluster to spread replicas out.
    member_cpus: float = 0.5
    member_gpus: float = 0.0
    ingress_cpus: float = 0.25
    # Dynamic batching in each member replica.
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    # Limits: concurrency per ingress replica, queue per caller (503 beyond), request body, image size, time.
    max_ongoing_requests: int = 32
    max_queued_requests: int = 256
    max_body_mb: float = 10.0
    max_pixels: int = 4096 * 4096
    request_timeout_s: float = 30.0
    crf: bool = False
    poll_s: float = 10.0  # how often a models:/NAME@ALIAS endpoint checks where the alias points

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise UserError("no model to serve: pass --model-uri (runs:/..., models:/NAME@ALIAS, a folder)")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise UserError(
                f"replicas need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                f"{self.min_replicas} and {self.max_replicas}"
            )
        if not 0 < self.max_pixels <= (Image.MAX_IMAGE_PIXELS or self.max_pixels):
            raise UserError(
                f"max_pixels must be between 1 and Pillow's MAX_IMAGE_PIXELS "
                f"({Image.MAX_IMAGE_PIXELS}), got {self.max_pixels}"
            )
        positive = (
            "max_batch_size",
            "max_ongoing_requests",
            "max_body_mb",
            "request_timeout_s",
            "poll_s",
            "target_ongoing_requests",
            "look_back_period_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_queued_requests == 0 or self.max_queued_requests < -1:
            raise UserError(
                f"max_queued_requests must be -1 (no limit) or >= 1, got {self.max_queued_requests}"
            )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


# Everything but where the proxy listens, which belongs to Serve's http_options.
APP_ARGS = tuple(f.name for f in dataclasses.fields(ServeConfig) if f.name not in ("host", "port"))


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """The args of `serve run pipelines.serve:app key=value ...` or a Serve config's `args:` -> ServeConfig.

    `serve run` passes strings; YAML passes typed values. Unknown keys are errors, not silently ignored.
    """
    unknown = sorted(set(args) - set(APP_ARGS))
    if unknown:
        raise UserError(f"unknown serve app args {unknown}; valid: {', '.join(APP_ARGS)}")
    types = {f.name: f.type for f in dataclasses.fields(ServeConfig)}
    values = {}
    for key, value in args.items():
        kind = types[key]
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            elif kind in (int, float, bool):
                value = kind(value)
            else:
                value = str(value)
        except ValueError:
            raise UserError(f"serve app arg {key}={value!r} is not a valid {kind.__name__}") from None
        values[key] = value
    if "model_uri" not in values:
        raise UserError("serve app args need model_uri (e.g. model_uri=models:/segpipe-voc@champion)")
    return ServeConfig(**values)


# ---------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelRef:
    """One exact model: the pinned URI members load it from (set by the operator, never by a request)."""

    source: str  # models:/NAME/VERSION, runs:/ID/model or an absolute model folder
    version: str  # registry version; "" for a run or a folder
    spec: Any  # segmodels.artifact.ModelSpec


def registry_alias(model_uri: str) -> tuple[str, str] | None:
    """models:/NAME@ALIAS -> (NAME, ALIAS); None for any other URI (nothing to follow)."""
    if model_uri.startswith("models:/") and "@" in model_uri:
        name, alias = model_uri.removeprefix("models:/").split("@", 1)
        return name, alias
    return None


def registry_name(model_uri: str) -> str | None:
    if not model_uri.startswith("models:/"):
        return None
    body = model_uri.removeprefix("models:/")
    return body.split("@", 1)[0] if "@" in body else body.rsplit("/", 1)[0]


def is_local_folder(uri: str) -> bool:
    return "://" not in uri and not uri.startswith(("runs:", "models:"))


def resolve_model(model_uri: str, tracking_uri: str) -> ModelRef:
    """Pin `model_uri` (an alias resolves to its current version, a folder becomes absolute) and read its spec."""
    from pipelines import tracking

    if model_uri.startswith("models:/"):
        version = tracking.model_version(tracking.connect(tracking_uri), model_uri)
        source, number = f"models:/{version.name}/{version.version}", str(version.version)
    elif is_local_folder(model_uri):
        source, number = str(Path(model_uri).expanduser().resolve()), ""
    else:
        source, number = model_uri, ""
    folder = tracking.download_model(source, tracking_uri)
    try:
        from segmodels.artifact import read_spec

        spec = read_spec(folder)
    finally:
        discard_download(source, folder)
    return ModelRef(source=source, version=number, spec=spec)


def discard_download(source: str, folder: Path) -> None:
    """Remove a folder `tracking.download_model` fetched; never the operator's own model folder."""
    if not is_local_folder(source):
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- requests
class ApiError(Exception):
    """An HTTP error answered as JSON {"error": short code, "detail": what was wrong and what to do}."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


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


def combine(member_probs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted mean of the members' C,H,W probabilities (weights normalised to sum 1), float32."""
    total = np.zeros(member_probs[0].shape, dtype=np.float32)
    for weight, probs in zip(weights, member_probs, strict=True):
        total += (weight / sum(weights)) * probs.astype(np.float32)
    return total


# ---------------------------------------------------------------------------------------------- members
@serve.deployment
class MemberModel:
    """Member networks of the served model: uint8 H,W,3 images -> float16 C,H,W probabilities, batched.

    Deployment k of K runs members k, k+K, ... of whichever version a request names (a newer version may
    have more members than there are deployments). Versions load on first use and the `KEEP_VERSIONS`
    most recent stay loaded, so requests still on the previous version keep being answered.
    """

    def __init__(self, cfg: ServeConfig, model: ModelRef, slot: int, num_slots: int):
        import torch

        torch.set_num_threads(max(1, int(cfg.member_cpus)))
        self.cfg, self.initial_source = cfg, model.source
        self.registry = registry_name(cfg.model_uri)
        self.device = "cuda" if cfg.member_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.loaded: OrderedDict[str, dict[int, Any]] = OrderedDict()  # source -> member index -> LoadedModel
        self.lock = threading.Lock()
        self.batched.set_max_batch_size(cfg.max_batch_size)
        self.in_flight = 0
        for index in range(slot, len(model.spec.members), num_slots):
            self.member(model.source, index)

    def check_source(self, source: str) -> None:
        """Only the operator's model, or another version of the same registered model, may be loaded."""
        pinned = source == self.initial_source
        if not pinned and not (
            self.registry and re.fullmatch(rf"models:/{re.escape(self.registry)}/\d+", source)
        ):
            raise ValueError(f"refusing to load {source!r}: this endpoint serves {self.cfg.model_uri!r}")

    def member(self, source: str, index: int):
        """Member `index` of model `source` as a LoadedModel (an ensemble of that one network)."""
        from pipelines import tracking
        from segmodels.artifact import LoadedModel, load_member, read_spec
        from segmodels.ensemble import Ensemble

        with self.lock:
            if index in self.loaded.get(source, {}):
                self.loaded.move_to_end(source)
                return self.loaded[source][index]
            self.check_source(source)
            folder = tracking.download_model(source, self.cfg.tracking_uri)
            try:
                spec = read_spec(folder)
                if not 0 <= index < len(spec.members):
                    raise ValueError(f"{source} has {len(spec.members)} members, not member {index}")
                network = load_member(folder, spec.members[index], self.device)
            finally:
                discard_download(source, folder)
            model = LoadedModel(spec=spec, ensemble=Ensemble([network]).to(self.device).eval(), folder=folder)
            self.loaded.setdefault(source, {})[index] = model
            self.loaded.move_to_end(source)
            while len(self.loaded) > KEEP_VERSIONS:
                self.loaded.popitem(last=False)
            logger.info(
                "loaded member %d of %s (%s) on %s", index, source, spec.members[index].arch, self.device
            )
            return model

    async def load(self, source: str, index: int) -> None:
        """Load a member ahead of traffic (the ingress calls this before switching to a new version)."""
        await asyncio.to_thread(self.member, source, index)

    async def predict(self, image: np.ndarray, source: str, index: int, labels: bool) -> np.ndarray:
        """H,W,3 uint8 -> float16 C,H,W probabilities, or uint8 H,W class indices when `labels` (a lone member).

        Waits up to `batch_wait_timeout_s` for companions only while other requests are in flight here: an
        idle replica starts at once, a busy one fills its next batch.
        """
        self.in_flight += 1
        try:
            self.batched.set_batch_wait_timeout_s(
                self.cfg.batch_wait_timeout_s if self.in_flight > 1 else 0.0
            )
            result = await self.batched(image, source, index, labels)
        finally:
            self.in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)  # both reset from the config
    async def batched(
        self, images: list[np.ndarray], sources: list[str], indexes: list[int], labels: list[bool]
    ) -> list[np.ndarray]:
        # In a thread, so the replica keeps accepting requests (the next batch) while this one computes.
        return await asyncio.to_thread(self.predict_batch, images, sources, indexes, labels)

    def predict_batch(
        self, images: list[np.ndarray], sources: list[str], indexes: list[int], labels: list[bool]
    ) -> list[np.ndarray]:
        """One forward pass per (version, member, image size) group of the batch.

        A group that fails (say, a version that cannot be loaded) gets its exception as its results, so the
        other requests batched with it are still answered.
        """
        import torch

        from pipelines.evaluate import InferenceSettings, predict_batch

        groups: dict[tuple, list[int]] = {}
        for i, (image, source, index) in enumerate(zip(images, sources, indexes, strict=True)):
            groups.setdefault((source, index, image.shape), []).append(i)
        results: list[np.ndarray | Exception] = [None] * len(images)  # type: ignore[list-item]
        for (source, index, _), positions in groups.items():
            try:
                probs = predict_batch(
                    self.member(source, index), np.stack([images[i] for i in positions]), InferenceSettings()
                )
            except Exception as err:
                logger.exception("member %d of %s failed", index, source)
                for i in positions:
                    results[i] = err
                continue
            for k, i in enumerate(positions):
                out = probs[k].argmax(0).to(torch.uint8) if labels[i] else probs[k].half()
                results[i] = out.cpu().numpy()
        return results


# ---------------------------------------------------------------------------------------------- ingress
api = FastAPI(
    title="segpipe",
    version="1",
    description="Semantic segmentation of JPEG/PNG images by the registered segpipe model. Errors are JSON "
    '`{"error": code, "detail": message}`.',
)

SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    },
}
SEGMENT_RESPONSES = {
    200: {
        "content": {"image/png": {}, "image/jpeg": {}, "application/json": {}},
        "description": "format=png: palette PNG mask of the input's size; json: class fractions; overlay: JPEG",
    },
    **{
        code: {"description": what}
        for code, what in [
            (400, "empty, corrupt or truncated image"),
            (413, "body or image dimensions over the limit"),
            (415, "not a JPEG or PNG"),
            (503, "overloaded: retry later"),
            (504, "not answered in time"),
        ]
    },
}


@dataclass(frozen=True)
class Served:
    """The model the ingress currently answers with."""

    ref: ModelRef
    weights: list[float]
    crf_params: Any  # segmodels.crf.CRFParams, or None without --crf


def served(ref: ModelRef, crf: bool) -> Served:
    from segmodels.crf import CRFParams

    return Served(
        ref=ref,
        weights=list(ref.spec.ensemble_weights),
        crf_params=CRFParams(**(ref.spec.crf or {})) if crf else None,
    )


def labels_only(model: Served) -> bool:
    """A lone member without CRF can answer class indices itself: 1 byte a pixel instead of 2 per class."""
    return len(model.ref.spec.members) == 1 and model.crf_params is None


def render(
    image: np.ndarray, outputs: list[np.ndarray], model: Served, fmt: str, seconds: dict[str, float]
) -> tuple[bytes, str]:
    """The members' outputs -> (body, media type).

    `outputs`: one H,W class-index map (`labels_only`), or each member's C,H,W probabilities, averaged
    with the ensemble weights and refined by the dense CRF when enabled.
    """
    from pipelines.report import blend, palette_png
    from segmodels.crf import dense_crf

    started = time.perf_counter()
    spec = model.ref.spec
    if labels_only(model):
        mask = outputs[0]
    else:
        probs = combine(outputs, model.weights)
        if model.crf_params is not None:
            probs = dense_crf(image, probs, model.crf_params)
        mask = probs.argmax(0).astype(np.uint8)
    if fmt == "png":
        return palette_png(mask, spec.palette), "image/png"
    if fmt == "overlay":
        buffer = io.BytesIO()
        Image.fromarray(blend(image, mask, spec.palette)).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue(), "image/jpeg"
    counts = np.bincount(mask.ravel(), minlength=len(spec.classes))
    present = [c for c in range(len(spec.classes)) if counts[c]]
    seconds = {**seconds, "postprocess": time.perf_counter() - started}
    answer = {
        "model": {"name": spec.name, "version": model.ref.version},
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "classes_present": [spec.classes[c] for c in present],
        "class_fractions": {spec.classes[c]: float(counts[c]) / mask.size for c in present},
        "timing_ms": {k: round(v * 1000, 3) for k, v in seconds.items()},
    }
    return json.dumps(answer).encode(), "application/json"


# Registered before @serve.ingress(api) below, which takes the app as it is then.
@api.exception_handler(ApiError)
async def api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse({"error": err.error, "detail": err.detail}, status_code=err.status)


@api.exception_handler(HTTPException)
async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    code = HTTPStatus(err.status_code).phrase.lower().replace(" ", "_")
    return JSONResponse(
        {"error": code, "detail": str(err.detail)},
        status_code=err.status_code,
        headers=getattr(err, "headers", None),
    )


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": "bad_request", "detail": detail}, status_code=400)


@serve.deployment
@serve.ingress(api)
class SegmentationIngress:
    """HTTP front: decodes and checks uploads, fans out to the members, combines, encodes the answer."""

    def __init__(self, cfg: ServeConfig, model: ModelRef, members: list):
        self.cfg, self.members = cfg, members
        self.model = served(model, cfg.crf)
        self.update_error: dict | None = None  # the last version the alias pointed at that failed to load
        self.page = resources.files("pipelines").joinpath("static/index.html").read_text()
        alias = registry_alias(cfg.model_uri)
        self.updates = asyncio.get_running_loop().create_task(self.follow_alias(*alias)) if alias else None

    # ------------------------------------------------------------------ hot update
    async def follow_alias(self, name: str, alias: str) -> None:
        """Every `poll_s`: when the alias points at another version, warm the members up on it, then switch."""
        from pipelines import tracking

        failed = None
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            version = None
            try:
                client = await asyncio.to_thread(tracking.connect, self.cfg.tracking_uri)
                version = await asyncio.to_thread(tracking.alias_version, client, name, alias)
                if version is None or str(version) in (self.model.ref.version, failed):
                    continue
                ref = await asyncio.to_thread(
                    resolve_model, f"models:/{name}/{version}", self.cfg.tracking_uri
                )
                candidate = served(ref, self.cfg.crf)
                await asyncio.gather(
                    *[
                        self.members[i % len(self.members)].load.remote(ref.source, i)
                        for i in range(len(ref.spec.members))
                    ]
                )
                logger.info(
                    "%s@%s moved from version %s to %s: now serving it",
                    name,
                    alias,
                    self.model.ref.version,
                    ref.version,
                )
                self.model, self.update_error = candidate, None
            except Exception as err:  # a registry hiccup or a broken version must not stop the endpoint
                logger.exception(
                    "could not switch to %s@%s version %s; still serving version %s",
                    name,
                    alias,
                    version,
                    self.model.ref.version,
                )
                failed = str(version)
                cause = getattr(err, "cause", None) or err  # a member's own exception, not Ray's wrapper
                self.update_error = {"version": failed, "error": f"{type(cause).__name__}: {cause}"[:1000]}

    # ------------------------------------------------------------------ routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model.ref.spec.name, "version": self.model.ref.version}

    @api.get("/v1/model")
    async def model_info(self) -> dict:
        ref = self.model.ref
        spec = ref.spec
        return {
            "name": spec.name,
            "version": ref.version,
            "model_uri": self.cfg.model_uri,
            "classes": list(spec.classes),
            "palette": spec.palette,
            "metrics": spec.metrics,
            "members": [
                {"arch": m.arch, "model_args": m.model_args, "weight": w, "metrics": m.metrics}
                for m, w in zip(spec.members, self.model.weights, strict=True)
            ],
            "crf": self.model.crf_params is not None,
            "input_scale": spec.input_scale,
            "update_error": self.update_error,
        }

    @api.post("/v1/segment", openapi_extra=SEGMENT_BODY, responses=SEGMENT_RESPONSES, response_class=Response)
    async def segment(
        self, request: Request, fmt: Literal["png", "json", "overlay"] = Query("png", alias="format")
    ) -> Response:
        """Segment one JPEG/PNG image (raw body, or multipart field `file`)."""
        started = time.perf_counter()
        data = await read_upload(request, self.cfg.max_body_bytes)
        model = self.model  # the whole request uses the version current when it arrived
        try:
            return await asyncio.wait_for(self.answer(data, model, fmt, started), self.cfg.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                504,
                "timeout",
                f"not answered within {self.cfg.request_timeout_s} s "
                "(request_timeout_s): retry later or send a smaller image",
            ) from None
        except (BackPressureError, DeploymentUnavailableError) as err:
            raise ApiError(
                503, "overloaded", f"the model replicas are busy ({type(err).__name__}): retry later"
            ) from None
        except ApiError:
            raise
        except Exception as err:
            logger.exception("segmentation failed")
            raise ApiError(500, "internal", f"{type(err).__name__}: {err}") from None

    async def answer(self, data: bytes, model: Served, fmt: str, started: float) -> Response:
        image = await asyncio.to_thread(decode_upload, data, self.cfg.max_pixels)
        decoded = time.perf_counter()
        ref = model.ref
        labels = labels_only(model)
        calls = [
            self.members[i % len(self.members)].predict.remote(image, ref.source, i, labels)
            for i in range(len(ref.spec.members))
        ]
        outputs = await asyncio.gather(*calls)
        inferred = time.perf_counter()
        body, media = await asyncio.to_thread(
            render, image, outputs, model, fmt, {"decode": decoded - started, "inference": inferred - decoded}
        )
        headers = {"X-Model-Name": ref.spec.name, "X-Model-Version": ref.version}
        return Response(body, media_type=media, headers=headers)


# ---------------------------------------------------------------------------------------------- application
def build_app(cfg: ServeConfig):
    """The Serve application for `cfg`: one MemberModel deployment per member of the model, behind the ingress.

    Resolves and reads the model first, so a bad URI fails here with a UserError, before Serve starts.
    """
    from pipelines import tracking

    if not is_local_folder(cfg.model_uri):
        # Replicas run in other processes (and nodes): give them an absolute store, not "./mlruns".
        cfg = dataclasses.replace(cfg, tracking_uri=tracking.resolve_tracking_uri(cfg.tracking_uri))
    model = resolve_model(cfg.model_uri, cfg.tracking_uri)
    autoscaling = {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_requests,
        "upscale_delay_s": cfg.upscale_delay_s,
        "downscale_delay_s": cfg.downscale_delay_s,
        "look_back_period_s": cfg.look_back_period_s,
    }
    if cfg.look_back_period_s < 30:
        # Load is reported every 10 s by default: too coarse for a short look-back window.
        autoscaling["metrics_interval_s"] = cfg.look_back_period_s / 3
    actor = {"num_cpus": cfg.member_cpus, **({"num_gpus": cfg.member_gpus} if cfg.member_gpus else {})}
    slots = len(model.spec.members)
    members = [
        MemberModel.options(
            name=f"MemberModel_{k}",
            autoscaling_config=autoscaling,
            ray_actor_options=actor,
            # Room for a full batch in progress plus the next one forming.
            max_ongoing_requests=2 * cfg.max_batch_size,
            max_queued_requests=cfg.max_queued_requests,
        ).bind(cfg, model, k, slots)
        for k in range(slots)
    ]
    return SegmentationIngress.options(
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.ingress_cpus},
    ).bind(cfg, model, members)


def app(args: dict[str, Any]):
    """Serve's args builder: `serve run pipelines.serve:app model_uri=models:/NAME@champion max_replicas=4`."""
    return build_app(config_from_args(args))


_started_ray = False


def start_server(cfg: ServeConfig) -> str:
    """Deploy the endpoint on Ray ($RAY_ADDRESS's, the running one, or a new local one); returns its base URL."""
    global _started_ray
    import ray

    from pipelines.runtime import ensure_ray

    application = build_app(cfg)  # the model URI is checked before anything starts
    if not ray.is_initialized():
        check_port_free(cfg.host, cfg.port)
    _started_ray = ensure_ray() or _started_ray
    serve.start(
        http_options={
            "host": cfg.host,
            "port": cfg.port,
            "request_timeout_s": cfg.request_timeout_s + PROXY_TIMEOUT_MARGIN_S,
        }
    )
    serve.run(application, name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def stop_server() -> None:
    """Shut Serve down (applications and proxies), and Ray too when `start_server` started it."""
    global _started_ray
    import ray

    serve.shutdown()
    if _started_ray:
        ray.shutdown()
        _started_ray = False


def check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port") from None


def serve_forever(cfg: ServeConfig) -> None:
    """`segpipe serve`: start the endpoint, answer until SIGINT/SIGTERM, then shut Serve down cleanly."""
    import signal

    url = start_server(cfg)
    print(
        f"serving {cfg.model_uri} at {url}  (upload page {url}/, API docs {url}/docs); Ctrl-C stops",
        flush=True,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("shutting down", flush=True)
        stop_server()
