"""The HTTP front: FastAPI routes, limits and errors; one hop to the model deployment per request.

    HTTP -> Serve proxy -> SegmentationIngress --encoded upload--> SegmentationModel (all members, batched)
                                             [--> CRFRefiner (with --crf; the model's probabilities go
                                                  to it directly, not through the ingress)]

The ingress reads the body within its limits and forwards the encoded bytes; the replica that computes the
mask renders the answer, so the ingress only relays a finished body. It admits `max_ongoing_requests +
max_queued_requests` requests at a time and answers 503 JSON beyond (the proxy's own plain-text 503 is
never reached), 504 JSON past `request_timeout_s`. With `models:/NAME@ALIAS` it polls the alias; when it
moves, the model deployment loads the new version and only then does the ingress switch. A request keeps
the version it started with, so none fails during an update.
"""

import asyncio
import functools
import hmac
import logging
import time
from http import HTTPStatus
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

from pipelines.model_uri import ModelUri
from pipelines.serve.config import ServeConfig, read_token
from pipelines.serve.refs import ModelRef, resolve_model
from pipelines.serve.render import Reply
from pipelines.serve.uploads import ApiError, read_upload

logger = logging.getLogger("ray.serve")

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
            (401, "missing or wrong `Authorization: Bearer <token>` (endpoints started with a token)"),
            (413, "body or image dimensions over the limit"),
            (415, "not a JPEG or PNG"),
            (503, "overloaded: retry later"),
            (504, "not answered in time"),
        ]
    },
}


# Registered before @serve.ingress(api) below, which takes the app as it is then.
@api.exception_handler(ApiError)
async def api_error(request: Request, err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="segpipe"'} if err.status == 401 else None
    return JSONResponse({"error": err.error, "detail": err.detail}, status_code=err.status, headers=headers)


ROUTES = ("/v1/segment", "/v1/model", "/healthz", "/")
LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


@functools.cache
def metrics():
    """segpipe's own Prometheus metrics, on Ray's metrics port of each node (made in the replica process:
    Serve adds the deployment, replica and application tags)."""
    from ray.serve import metrics as serve_metrics

    return {
        "requests": serve_metrics.Counter(
            "segpipe_requests_total",
            description="Answered requests by route and status.",
            tag_keys=("route", "status"),
        ),
        "latency": serve_metrics.Histogram(
            "segpipe_request_latency_ms",
            description="Time from the request reaching the ingress to its answer.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("route",),
        ),
        "version": serve_metrics.Gauge(
            "segpipe_model_version",
            description="Registered version in service (0: a run or a folder).",
            tag_keys=("model",),
        ),
        "held": serve_metrics.Gauge(
            "segpipe_ingress_requests", description="Requests this ingress replica holds: working and queued."
        ),
    }


class CountRequests:
    """ASGI middleware: every answer, errors included (the exception handlers run inside it), counted by
    route and status, and timed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def note_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, note_status)
        finally:
            path, root = scope.get("path", ""), scope.get("root_path", "")
            path = path[len(root) :] if root and path.startswith(root) else path
            route = path if path in ROUTES else "other"
            metrics()["requests"].inc(tags={"route": route, "status": str(status[0])})
            metrics()["latency"].observe((time.perf_counter() - started) * 1000, tags={"route": route})


api.add_middleware(CountRequests)


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
    """HTTP front: checks and reads uploads, sends them to the model deployment, relays the answer."""

    def __init__(self, cfg: ServeConfig, model: ModelRef, segmenter, refiner=None):
        self.cfg, self.segmenter, self.refiner = cfg, segmenter, refiner
        self.ref = model
        self.active = 0  # requests this replica holds (admission control: 503 JSON beyond cfg.admitted)
        self.update_error: dict | None = None  # the last version the alias pointed at that failed to load
        self.page = resources.files("pipelines").joinpath("static/index.html").read_text()
        self.token = read_token(cfg.auth_token_file).encode() if cfg.auth_token_file else None
        self.show_version()
        followed = ModelUri.parse(cfg.model_uri)
        self.updates = (
            asyncio.get_running_loop().create_task(self.follow_alias(followed.name, followed.alias))
            if followed.is_alias
            else None
        )

    # ------------------------------------------------------------------ hot update
    async def follow_alias(self, name: str, alias: str) -> None:
        """Every `poll_s`: when the alias points at another version, load it in the model deployment, then switch."""
        from pipelines import tracking

        failed = None
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            version = None
            try:
                client = await asyncio.to_thread(tracking.connect, self.cfg.tracking_uri)
                version = await asyncio.to_thread(tracking.alias_version, client, name, alias)
                if version is None or str(version) in (self.ref.version, failed):
                    continue
                ref = await asyncio.to_thread(
                    resolve_model, f"models:/{name}/{version}", self.cfg.tracking_uri
                )
                await self.segmenter.load.remote(ref.source)
                logger.info(
                    "%s@%s moved from version %s to %s: now serving it",
                    name,
                    alias,
                    self.ref.version,
                    ref.version,
                )
                self.ref, self.update_error = ref, None
                self.show_version()
            except Exception as err:  # a registry hiccup or a broken version must not stop the endpoint
                logger.exception(
                    "could not switch to %s@%s version %s; still serving version %s",
                    name,
                    alias,
                    version,
                    self.ref.version,
                )
                failed = str(version)
                cause = getattr(err, "cause", None) or err  # the replica's own exception, not Ray's wrapper
                self.update_error = {"version": failed, "error": f"{type(cause).__name__}: {cause}"[:1000]}

    def show_version(self) -> None:
        metrics()["version"].set(int(self.ref.version or 0), tags={"model": self.ref.spec.name})

    def authorize(self, request: Request) -> None:
        """401 unless the request carries the endpoint's token (compared in constant time; never logged)."""
        if self.token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token):
            raise ApiError(
                401, "unauthorized", "this endpoint needs its token: send `Authorization: Bearer <token>`"
            )

    # ------------------------------------------------------------------ routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.ref.spec.name, "version": self.ref.version}

    @api.get("/v1/model")
    async def model_info(self, request: Request) -> dict:
        self.authorize(request)
        ref = self.ref
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
                for m, w in zip(spec.members, spec.ensemble_weights, strict=True)
            ],
            "crf": self.refiner is not None,
            "input_scale": spec.input_scale,
            "update_error": self.update_error,
        }

    @api.post("/v1/segment", openapi_extra=SEGMENT_BODY, responses=SEGMENT_RESPONSES, response_class=Response)
    async def segment(
        self, request: Request, fmt: Literal["png", "json", "overlay"] = Query("png", alias="format")
    ) -> Response:
        """Segment one JPEG/PNG image (raw body, or multipart field `file`)."""
        self.authorize(request)
        admitted = self.cfg.admitted
        if admitted is not None and self.active >= admitted:
            raise ApiError(
                503,
                "overloaded",
                f"{self.active} requests are already being answered or queued here "
                "(max_ongoing_requests + max_queued_requests): retry later",
            )
        self.active += 1
        metrics()["held"].set(self.active)
        try:
            data = await read_upload(request, self.cfg.max_body_bytes)
            ref = self.ref  # the whole request uses the version current when it arrived
            lost: list = []  # set by answer() when a model replica died under this request
            reply = await asyncio.wait_for(self.answer(data, ref, fmt, lost), self.cfg.request_timeout_s)
        except TimeoutError:
            if lost:
                raise ApiError(
                    503, "replica_lost", "the model replica died and no replacement answered in time: retry"
                ) from None
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
        except RayActorError as err:
            raise ApiError(
                503,
                "replica_lost",
                f"the model replica died twice while answering ({type(err).__name__}): retry",
            ) from None
        except ApiError:
            raise
        except Exception as err:
            logger.exception("segmentation failed")
            raise ApiError(500, "internal", f"{type(err).__name__}: {err}") from None
        finally:
            self.active -= 1
            metrics()["held"].set(self.active)
        return Response(reply.body, status_code=reply.status, media_type=reply.media, headers=reply.headers)

    async def answer(self, data: bytes, ref: ModelRef, fmt: str, lost: list) -> Reply:
        """One hop to the model (and one on to the CRF pool); retried once if the model replica dies."""
        for attempt in (1, 2):
            response = self.segmenter.segment.remote(
                data, ref.source, ref.version, fmt, self.refiner is not None
            )
            if self.refiner is not None:
                response = self.refiner.refine.remote(response, fmt)
            try:
                return await response
            except RayActorError:
                lost.append(attempt)
                if attempt == 2:
                    raise
                logger.warning("a model replica died while answering; retrying the request once")
        raise AssertionError("unreachable")
