"""Serving stage: upload decoding and limits, the members' maths, and the live endpoint over real HTTP.

The slow tests share one Serve instance (module fixture `endpoint`) that follows `models:/tiny@champion`
in an embedded MLflow registry: images of many modes and sizes, every bad input followed by a good request,
a bounded concurrent load, autoscaling up and back down, a hot update under load, and the upload page in
headless Chromium. The last test runs `segpipe serve` itself, on its own Ray, and stops it with Ctrl-C.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import segmodels
from pipelines import tracking
from pipelines.errors import UserError
from pipelines.inference.core import InferenceSettings, predict_image
from pipelines.model_uri import fetched_model
from pipelines.runtime import free_port
from pipelines.serve import (
    APP_NAME,
    CRFRefiner,
    SegmentationModel,
    ServeConfig,
    build_app,
    start_server,
    stop_server,
)
from pipelines.serve.refs import ModelRef
from pipelines.serve.render import Dense
from pipelines.serve.uploads import ApiError, decode_upload
from pipelines.serve_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from segmodels.artifact import MemberSpec, ModelSpec, load_model_dir, read_spec, save_model_dir

# The tests shorten Serve's autoscaling metrics interval, a field Serve has deprecated but still honours.
pytestmark = pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
CLASSES = ["background", *(f"class{i}" for i in range(1, 21))]
PALETTE = [[(37 * i) % 256, (91 * i) % 256, (53 * i) % 256] for i in range(21)]
TINY = {"fcn8s": {"width": 0.0625}, "deeplab_largefov": {"width": 0.0625}}
# Serve's proxy answers its own errors (408, 503) as JSON through this hook, read when Ray starts: set at
# import, before the session's Ray starts, as `start_server` does when it starts Ray itself.
os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)


def tiny_model(folder: Path, archs: list[str], seed: int = 0) -> Path:
    """A model folder of random-weight tiny networks: serving does not care what they learned."""
    members, states = [], []
    for i, arch in enumerate(archs):
        torch.manual_seed(seed + i)
        states.append(segmodels.build_model(arch, len(CLASSES), **TINY[arch]).state_dict())
        members.append(
            MemberSpec(
                arch=arch, num_classes=len(CLASSES), weights=f"member{i}.safetensors", model_args=TINY[arch]
            )
        )
    spec = ModelSpec(
        name="tiny",
        classes=CLASSES,
        palette=PALETTE,
        members=members,
        ensemble_weights=[float(i + 1) for i in range(len(archs))],
        mean=list(segmodels.IMAGENET_MEAN),
        std=list(segmodels.IMAGENET_STD),
        metrics={"val_miou": 0.5},
    )
    return save_model_dir(folder, spec, states)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth random picture in `mode` (I;16 uses the full 16-bit range)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [
            xx * 255 // max(width - 1, 1),
            yy * 255 // max(height - 1, 1),
            rng.integers(0, 256, (height, width)),
        ],
        axis=2,
    ).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "I;16":
        return Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    return image.convert(mode)


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, followed by one row of pixel data only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(bytes(1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "I;16", "1", "CMYK"])
def test_every_image_mode_is_converted_to_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = photo(64, 48, mode)
    rgb = decode_upload(encode(image, fmt), max_pixels=10_000)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    if mode == "I;16":  # the top byte of each 16-bit value, in all three channels
        assert np.array_equal(rgb[:, :, 0], (np.asarray(image) >> 8).astype(np.uint8))
        assert np.array_equal(rgb[:, :, 0], rgb[:, :, 2])
    if mode == "RGB":
        assert np.array_equal(rgb, np.asarray(image))


def test_bad_uploads_are_refused_with_the_right_status():
    jpeg = encode(photo(64, 48), "JPEG")
    cases = {
        "random bytes": (np.random.default_rng(0).bytes(2000), 400, "bad_image"),
        "truncated JPEG": (jpeg[: len(jpeg) // 2], 400, "bad_image"),
        "GIF": (encode(photo(16, 16, "P"), "GIF"), 415, "unsupported_media_type"),
        "over max_pixels": (encode(photo(101, 100), "PNG"), 413, "image_too_large"),
        # 10^10 pixels claimed by a 33-byte file: refused from the header, before any decoding.
        "header-only bomb": (png_header_claiming(100_000, 100_000), 413, "image_too_large"),
        "header over max_pixels": (png_header_claiming(200, 200), 413, "image_too_large"),
    }
    for name, (data, status, error) in cases.items():
        with pytest.raises(ApiError) as caught:
            decode_upload(data, max_pixels=10_000)
        assert (caught.value.status, caught.value.error) == (status, error), name


# ---------------------------------------------------------------------------------------------- model
def model_replica(folder: Path, model_uri: str | None = None, version: str = "") -> SegmentationModel:
    """The model deployment's class, constructed in this process (no Serve)."""
    cfg = ServeConfig(model_uri=model_uri or str(folder))
    return SegmentationModel.func_or_class(cfg, ModelRef(str(folder), version, read_spec(folder)))


def test_the_model_replica_runs_the_whole_ensemble_in_one_pass(tmp_path):
    folder = tiny_model(tmp_path / "model", ["fcn8s", "deeplab_largefov"])
    replica = model_replica(folder)
    images = [np.asarray(photo(64, 48, seed=s)) for s in range(3)] + [np.asarray(photo(40, 32))]
    n, source = len(images), str(folder)
    probs = replica.predict_batch(images, [source] * n, [True] * n)
    labels = replica.predict_batch(images, [source] * n, [False] * n)

    model = load_model_dir(folder)
    for k, image in enumerate(images):
        expected = predict_image(model, image, InferenceSettings())  # the ensemble in this process
        assert probs[k].dtype == np.float16 and probs[k].shape == (21, *image.shape[:2])
        np.testing.assert_allclose(probs[k], expected, atol=2e-3)
        assert labels[k].dtype == np.uint8 and labels[k].shape == image.shape[:2]
        assert (labels[k] == expected.argmax(0)).mean() > 0.999  # float rounding may flip a near-tie


def test_the_model_replica_reconfigures_its_batching(tmp_path):
    replica = model_replica(tiny_model(tmp_path / "model", ["fcn8s"]))
    replica.reconfigure({"max_batch_size": 3, "batch_wait_timeout_s": "0.02"})
    assert (replica.knobs.max_batch_size, replica.knobs.batch_wait_timeout_s) == (3, 0.02)
    with pytest.raises(UserError, match="unknown key"):
        replica.reconfigure({"max_batch": 3})
    with pytest.raises(UserError, match="max_batch_size >= 1"):
        replica.reconfigure({"max_batch_size": 0})
    assert replica.knobs.max_batch_size == 3  # a refused config leaves the knobs as they were


def test_the_crf_pool_cleans_up_noisy_probabilities(tmp_path):
    folder = tiny_model(tmp_path / "model", ["fcn8s", "deeplab_largefov"])
    spec = read_spec(folder)
    # Left half dark background, right half bright class 1; the probabilities are noisy.
    picture = np.zeros((48, 64, 3), np.uint8)
    picture[:, 32:] = 255
    image = decode_upload(encode(Image.fromarray(picture), "PNG"), max_pixels=10_000)
    truth = (np.arange(64) >= 32)[None].repeat(48, 0)
    noisy = np.clip(
        np.where(truth, 0.65, 0.35) + np.random.default_rng(0).normal(0, 0.25, truth.shape), 0.01, 0.99
    )
    probs = np.zeros((21, 48, 64), np.float16)
    probs[1], probs[0] = noisy, 1 - noisy
    refiner = CRFRefiner.func_or_class()

    def errors() -> int:
        reply = refiner.refine_dense(Dense(image, probs, spec, "3", {}), "png")
        mask = np.asarray(Image.open(io.BytesIO(reply.body)))
        assert reply.media == "image/png" and mask.shape == truth.shape
        assert reply.headers["X-Model-Version"] == "3"
        return int((mask != truth).sum())

    without = int((probs.astype(np.float32).argmax(0) != truth).sum())
    assert errors() < without / 4
    # user_config overrides the model's CRF parameters live: no pairwise terms leaves the noise.
    refiner.reconfigure({"w1": 0, "w2": 0, "iterations": 1})
    assert errors() == without
    with pytest.raises(UserError, match="unknown key"):
        refiner.reconfigure({"theta": 3})
    with pytest.raises(UserError, match="iterations must be >= 1"):
        refiner.reconfigure({"iterations": 0})


def test_the_model_replica_loads_only_versions_of_the_served_model(tmp_path):
    folder = tiny_model(tmp_path / "model", ["fcn8s"])
    replica = model_replica(folder, model_uri="models:/tiny@champion", version="1")
    replica.check_source("models:/tiny/7")
    for source in ["/etc", "models:/other/1", "models:/tiny/1/../x", "runs:/abc/model"]:
        with pytest.raises(ValueError, match="refusing"):
            replica.check_source(source)
    # In a batch, a refused source fails its own requests only.
    image = np.asarray(photo(64, 48))
    good, bad = replica.predict_batch([image, image], [str(folder), "/etc"], [False, False])
    assert good.shape == (48, 64) and isinstance(bad, ValueError)


# ---------------------------------------------------------------------------------------------- live endpoint
def register(client, folder: Path, alias: str = "champion") -> str:
    run = client.create_run(tracking.experiment_id(client, "serve-test"))
    version = tracking.register_model_folder(client, "tiny", folder, run_id=run.info.run_id).version
    tracking.set_alias(client, "tiny", alias, version)
    return str(version)


@pytest.fixture(scope="module")
def endpoint(ray_session, tmp_path_factory):
    """Serve following models:/tiny@champion (version 1: a two-member ensemble), fast autoscaling and polling."""
    root = tmp_path_factory.mktemp("serve")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = tracking.connect(tracking_uri)
    assert register(client, tiny_model(root / "v1", ["fcn8s", "deeplab_largefov"])) == "1"
    cfg = ServeConfig(
        model_uri="models:/tiny@champion",
        tracking_uri=tracking_uri,
        port=free_port(),
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
        downscale_delay_s=3,
        look_back_period_s=2,
        member_cpus=0.25,
        ingress_cpus=0.25,
        max_body_mb=1,
        max_pixels=1_000_000,
        poll_s=1,
    )
    url = start_server(cfg)
    yield {"url": url, "client": client, "root": root}
    stop_server()


def post(
    url: str, data: bytes, content_type: str = "image/png", fmt: str = "png", **kwargs
) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/segment",
        params={"format": fmt},
        content=data,
        headers={"Content-Type": content_type, **kwargs.pop("headers", {})},
        timeout=60,
        **kwargs,
    )


def assert_serves(url: str) -> None:
    reply = post(url, encode(photo(64, 48), "PNG"))
    assert reply.status_code == 200, reply.text
    assert Image.open(io.BytesIO(reply.content)).size == (64, 48)


def load(
    url: str,
    bodies: list[tuple[str, bytes]],
    *,
    concurrency: int,
    total: int | None = None,
    stop: threading.Event | None = None,
) -> list[tuple[int, str]]:
    """POST bodies round-robin from `concurrency` clients: `total` requests, or until `stop` is set.

    Returns (status, model version or error text) per request; status 0 = no HTTP answer at all.
    """

    async def run() -> list[tuple[int, str]]:
        results, counter = [], itertools.count()
        async with httpx.AsyncClient(timeout=120) as client:

            async def worker() -> None:
                while True:
                    i = next(counter)
                    if (total is not None and i >= total) or (stop is not None and stop.is_set()):
                        return
                    content_type, data = bodies[i % len(bodies)]
                    try:
                        reply = await client.post(
                            f"{url}/v1/segment",
                            params={"format": "json"},
                            content=data,
                            headers={"Content-Type": content_type},
                        )
                        ok = reply.status_code == 200
                        results.append(
                            (reply.status_code, reply.json()["model"]["version"] if ok else reply.text)
                        )
                    except httpx.HTTPError as err:
                        results.append((0, repr(err)))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results

    return asyncio.run(run())


def running_replicas(deployment: str, app: str = APP_NAME) -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    status = serve.status().applications.get(app)  # absent, or without deployments, while it builds
    deployment_status = status.deployments.get(deployment) if status else None
    return deployment_status.replica_states.get(ReplicaState.RUNNING, 0) if deployment_status else 0


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,fmt,size",
    [
        ("RGB", "JPEG", (300, 200)),
        ("RGB", "PNG", (64, 48)),
        ("L", "PNG", (128, 96)),
        ("L", "JPEG", (97, 131)),
        ("RGBA", "PNG", (200, 150)),
        ("P", "PNG", (120, 80)),
        ("I;16", "PNG", (80, 60)),
    ],
)
def test_masks_have_the_input_size_and_the_palette(endpoint, mode, fmt, size):
    url, image = endpoint["url"], photo(*size, mode)
    data = encode(image, fmt)
    media = "image/jpeg" if fmt == "JPEG" else "image/png"
    reply = post(url, data, media)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png" and reply.headers["x-model-name"] == "tiny"
    mask = Image.open(io.BytesIO(reply.content))
    assert mask.mode == "P" and mask.size == size
    assert mask.getpalette()[: 3 * 21] == [c for rgb in PALETTE for c in rgb]
    assert np.asarray(mask).max() < 21

    summary = post(url, data, media, fmt="json").json()
    assert (summary["width"], summary["height"]) == size
    assert abs(sum(summary["class_fractions"].values()) - 1) < 1e-6
    assert set(summary["classes_present"]) == set(summary["class_fractions"]) and summary["classes_present"]
    assert set(summary["timing_ms"]) == {"decode", "inference", "postprocess"}

    overlay = post(url, data, media, fmt="overlay")
    assert overlay.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(overlay.content)).size == size
    # The legend of the answer: indices into the model's classes, the same classes the JSON names.
    present = [CLASSES[int(i)] for i in overlay.headers["x-classes-present"].split(",")]
    assert present == summary["classes_present"]

    upload = httpx.post(f"{url}/v1/segment", files={"file": (f"x.{fmt.lower()}", data, media)}, timeout=60)
    assert upload.status_code == 200 and Image.open(io.BytesIO(upload.content)).size == size


@pytest.mark.slow
def test_segpipes_metrics_reach_rays_metrics_port(endpoint):
    """Requests by route and status, latency, the version in service and the ingress's held requests, as
    Prometheus scrapes them from each node's Ray metrics port."""
    import ray

    url = endpoint["url"]
    assert post(url, encode(photo(32, 32), "PNG")).status_code == 200
    assert post(url, b"").status_code == 400
    node = next(n for n in ray.nodes() if n["Alive"])
    scrape = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = [
        re.compile(r'ray_segpipe_requests_total\{[^}]*route="/v1/segment"[^}]*status="200"[^}]*\} [1-9]'),
        re.compile(r'ray_segpipe_requests_total\{[^}]*route="/v1/segment"[^}]*status="400"'),
        re.compile(r'ray_segpipe_request_latency_ms_bucket\{[^}]*route="/v1/segment"'),
        re.compile(r'ray_segpipe_model_version\{[^}]*model="tiny"[^}]*\} [1-9]'),
        re.compile(r"ray_segpipe_ingress_requests\{"),
    ]
    text = ""

    def scraped() -> bool:
        nonlocal text
        text = httpx.get(scrape, timeout=10).text
        return all(w.search(text) for w in wanted)

    wait_until(scraped, 60, "segpipe's metrics on Ray's metrics port")


@pytest.mark.slow
def test_tricky_images_get_the_pyfunc_models_mask_over_http(endpoint, tricky_images, tmp_path):
    """16-bit grey, EXIF-rotated, CMYK and transparent-palette uploads: the served mask is the one the
    MLflow pyfunc model of the same version gives for the same bytes (and `segpipe predict` too, see
    tests/pipelines/inference), in the orientation a viewer shows."""
    import mlflow
    import pandas as pd

    served, versions = {}, set()
    for name, (data, shape) in tricky_images.items():
        reply = post(endpoint["url"], data, "image/png" if name.endswith(".png") else "image/jpeg")
        assert reply.status_code == 200, (name, reply.text)
        served[name] = np.asarray(Image.open(io.BytesIO(reply.content)))
        assert served[name].shape == shape, name
        versions.add(reply.headers["x-model-version"])
    (version,) = versions
    uri = f"sqlite:///{endpoint['root'] / 'mlflow.db'}"
    with fetched_model(f"models:/tiny/{version}", uri) as folder:
        pyfunc = mlflow.pyfunc.load_model(str(tracking.save_pyfunc(folder, tmp_path / "pyfunc")))
    frame = pyfunc.predict(pd.DataFrame({"image": [data for data, _ in tricky_images.values()]}))
    for name, mask in zip(tricky_images, frame["mask"], strict=True):
        np.testing.assert_array_equal(served[name], np.asarray(Image.open(io.BytesIO(mask))), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,request_kwargs,status,error",
    [
        ("empty body", {"data": b""}, 400, "empty_body"),
        ("random bytes", {"data": np.random.default_rng(1).bytes(5000)}, 400, "bad_image"),
        (
            "truncated JPEG",
            {"data": encode(photo(300, 200), "JPEG")[:3000], "content_type": "image/jpeg"},
            400,
            "bad_image",
        ),
        ("GIF bytes", {"data": encode(photo(32, 32, "P"), "GIF")}, 415, "unsupported_media_type"),
        (
            "text content type",
            {"data": b"hello", "content_type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        ("no content type", {"data": b"hello", "content_type": ""}, 415, "unsupported_media_type"),
        ("body over max_body_mb", {"data": b"\xff\xd8\xff" + bytes(2 * 2**20)}, 413, "payload_too_large"),
        (
            "2000x2000 zeros PNG",
            {"data": encode(Image.new("L", (2000, 2000)), "PNG")},
            413,
            "image_too_large",
        ),
        ("header-only bomb", {"data": png_header_claiming(100_000, 100_000)}, 413, "image_too_large"),
        ("multipart without file", {"files": {"other": ("a.png", b"x", "image/png")}}, 400, "bad_multipart"),
        ("unknown format", {"data": b"x", "fmt": "svg"}, 400, "bad_request"),
    ],
)
def test_bad_requests_get_json_errors_and_the_endpoint_keeps_serving(
    endpoint, name, request_kwargs, status, error
):
    url, kwargs = endpoint["url"], dict(request_kwargs)
    if "files" in kwargs:
        reply = httpx.post(f"{url}/v1/segment", files=kwargs["files"], timeout=60)
    else:
        reply = post(
            url, kwargs["data"], kwargs.get("content_type", "image/png"), fmt=kwargs.get("fmt", "png")
        )
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["error"] == error and body["detail"], body
    assert_serves(url)


@pytest.mark.slow
def test_model_health_and_docs(endpoint):
    url = endpoint["url"]
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    info = httpx.get(f"{url}/v1/model").json()
    assert (info["name"], info["classes"], info["model_uri"]) == ("tiny", CLASSES, "models:/tiny@champion")
    assert [m["arch"] for m in info["members"]] == ["fcn8s", "deeplab_largefov"]
    assert info["metrics"] == {"val_miou": 0.5} and info["version"] == "1"
    assert "swagger" in httpx.get(f"{url}/docs").text.lower()
    segment = httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/segment"]["post"]
    assert {"image/jpeg", "image/png", "multipart/form-data"} <= set(segment["requestBody"]["content"])
    # The one request parameter picks the answer's format; none names a path or a URL.
    assert [p["name"] for p in segment["parameters"]] == ["format"]
    assert httpx.get(f"{url}/no/such/page").json()["error"] == "not_found"


@pytest.mark.slow
def test_request_timeouts_answer_408_or_504(endpoint):
    from ray import serve

    url = endpoint["url"]
    data = encode(photo(300, 200), "PNG")
    # The proxy's own deadline (a client may shorten it with Serve's header): 408, as JSON too.
    reply = post(url, data, headers={"x-request-timeout-seconds": "0.001"})
    assert reply.status_code == 408 and reply.json()["error"] == "timeout", reply.text
    # The app's deadline on the model: 504 with a JSON body.
    quick = ServeConfig(
        model_uri=str(tiny_model(endpoint["root"] / "impatient", ["fcn8s"])),
        member_cpus=0.25,
        ingress_cpus=0.25,
        request_timeout_s=0.001,
    )
    serve.run(build_app(quick), name="impatient", route_prefix="/impatient")
    try:
        reply = post(f"{url}/impatient", data)
        assert reply.status_code == 504 and reply.json()["error"] == "timeout", reply.text
        assert httpx.get(f"{url}/impatient/healthz").status_code == 200
    finally:
        serve.delete("impatient")
    assert_serves(url)


@pytest.mark.slow
def test_full_queues_answer_503(endpoint):
    from ray import serve

    url = endpoint["url"]
    # The model replica takes two requests at a time and queues one more; the ingress admits 32 + 1.
    small = ServeConfig(
        model_uri=str(tiny_model(endpoint["root"] / "small", ["fcn8s"])),
        member_cpus=0.25,
        ingress_cpus=0.25,
        max_batch_size=1,
        max_queued_requests=1,
        max_replicas=1,
    )
    serve.run(build_app(small), name="small", route_prefix="/small")
    try:
        results = load(
            f"{url}/small", [("image/png", encode(photo(300, 200), "PNG"))], concurrency=48, total=96
        )
        assert sorted({status for status, _ in results}) == [200, 503], results
        rejected = [json.loads(text) for status, text in results if status == 503]
        # Every 503 is JSON, whether the model's queue or the ingress's admission limit was full.
        assert all(body["error"] == "overloaded" and body["detail"] for body in rejected), rejected
        assert httpx.get(f"{url}/small/healthz").status_code == 200
    finally:
        serve.delete("small")
    assert_serves(url)


@pytest.mark.slow
def test_bounded_concurrent_load_has_no_errors(endpoint):
    bodies = [
        ("image/png", encode(photo(64, 48, seed=1), "PNG")),
        ("image/jpeg", encode(photo(128, 96), "JPEG")),
        ("image/png", encode(photo(100, 75, "L"), "PNG")),
    ]
    started = time.perf_counter()
    results = load(endpoint["url"], bodies, concurrency=16, total=300)
    seconds = time.perf_counter() - started
    print(f"\n300 requests at concurrency 16: {300 / seconds:.1f} req/s")
    assert len(results) == 300
    assert [r for r in results if r[0] != 200] == []


@pytest.mark.slow
def test_members_scale_up_under_load_and_back_down(endpoint):
    url = endpoint["url"]
    wait_until(
        lambda: running_replicas("SegmentationModel") == 1, 120, "SegmentationModel to run one replica"
    )
    stop = threading.Event()
    results: list = []
    worker = threading.Thread(
        target=lambda: results.extend(
            load(url, [("image/png", encode(photo(128, 96), "PNG"))], concurrency=16, stop=stop)
        )
    )
    worker.start()
    try:
        wait_until(
            lambda: running_replicas("SegmentationModel") >= 2, 120, "a second SegmentationModel replica"
        )
    finally:
        stop.set()
        worker.join()
    assert results and [r for r in results if r[0] != 200] == []
    wait_until(
        lambda: running_replicas("SegmentationModel") == 1, 120, "SegmentationModel to scale back to 1"
    )
    assert_serves(url)


@pytest.mark.slow
def test_promoting_a_new_version_under_load_fails_no_request(endpoint):
    url, client = endpoint["url"], endpoint["client"]
    stop = threading.Event()
    results: list = []
    worker = threading.Thread(
        target=lambda: results.extend(
            load(url, [("image/png", encode(photo(96, 64), "PNG"))], concurrency=8, stop=stop)
        )
    )
    worker.start()
    try:
        time.sleep(1)
        # Version 2: a single network, so the members' layout changes too.
        assert register(client, tiny_model(endpoint["root"] / "v2", ["deeplab_largefov"], seed=7)) == "2"
        wait_until(
            lambda: httpx.get(f"{url}/v1/model").json()["version"] == "2", 60, "the endpoint to serve v2"
        )
        time.sleep(1)
    finally:
        stop.set()
        worker.join()
    assert [r for r in results if r[0] != 200] == []
    versions = [version for _, version in results]
    assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
    assert [m["arch"] for m in httpx.get(f"{url}/v1/model").json()["members"]] == ["deeplab_largefov"]
    assert_serves(url)


@pytest.mark.slow
def test_promoting_a_broken_version_keeps_the_current_one(endpoint):
    url, client = endpoint["url"], endpoint["client"]
    current = httpx.get(f"{url}/v1/model").json()["version"]
    broken = tiny_model(endpoint["root"] / "broken", ["fcn8s"])
    (broken / "member0.safetensors").write_bytes(b"not safetensors")
    version = register(client, broken)
    wait_until(
        lambda: (httpx.get(f"{url}/v1/model").json()["update_error"] or {}).get("version") == version,
        60,
        f"the endpoint to report that version {version} failed to load",
    )
    info = httpx.get(f"{url}/v1/model").json()
    assert info["version"] == current and info["update_error"]["error"].startswith("SafetensorError"), info
    assert_serves(url)


@pytest.mark.slow
def test_the_live_model_replica_takes_its_knobs_from_user_config(endpoint):
    from ray import serve

    # build_app passes the batching knobs as user_config: Serve calls reconfigure() with them, and the
    # torch threads replica_sizing chose (member_cpus 0.25: one).
    knobs = serve.get_deployment_handle("SegmentationModel", app_name=APP_NAME).describe.remote().result()
    assert (knobs["max_batch_size"], knobs["batch_wait_timeout_s"], knobs["threads"]) == (8, 0.005, 1), knobs


@pytest.mark.slow
def test_killing_the_model_replica_under_load_fails_no_request(endpoint):
    import ray
    from ray import serve

    url = f"{endpoint['url']}/mortal"
    cfg = ServeConfig(
        model_uri=str(tiny_model(endpoint["root"] / "mortal", ["fcn8s"])),
        member_cpus=0.25,
        ingress_cpus=0.25,
        max_replicas=1,
        request_timeout_s=20,  # under the proxy's deadline (the endpoint's 30 s + 5 s): the app answers first
    )
    serve.run(build_app(cfg), name="mortal", route_prefix="/mortal")

    def replicas() -> list[str]:
        actors = ray.util.list_named_actors(all_namespaces=True)
        return [a["name"] for a in actors if a["name"].startswith("SERVE_REPLICA::mortal#SegmentationModel#")]

    try:
        (victim,) = replicas()
        stop, results = threading.Event(), []
        body = [("image/png", encode(photo(64, 48), "PNG"))]
        worker = threading.Thread(target=lambda: results.extend(load(url, body, concurrency=8, stop=stop)))
        worker.start()
        try:
            time.sleep(2)
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            wait_until(lambda: replicas() not in ([], [victim]), 50, "Serve to start a new model replica")
            wait_until(
                lambda: running_replicas("SegmentationModel", "mortal") == 1, 50, "the new replica to run"
            )
            time.sleep(2)
        finally:
            stop.set()
            worker.join()
        failed = [(status, text) for status, text in results if status != 200]
        # No request hangs (status 0 would be a client timeout); a failure is a 503 JSON, and only requests that
        # were on the killed replica may fail (the bench's soak checks the <= 1% target over 2,000 requests).
        assert all(
            status == 503 and json.loads(text)["error"] in ("replica_lost", "overloaded")
            for status, text in failed
        ), failed
        assert len(failed) <= 8 and len(results) > len(failed), (len(failed), len(results))
        assert_serves(url)
    finally:
        serve.delete("mortal")


# ---------------------------------------------------------------------------------------------- browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """A minimal Chrome DevTools Protocol client: one page, one request at a time."""

    def __init__(self, socket):
        self.socket = socket
        self.ids = itertools.count(1)

    def __call__(self, method: str, **params) -> dict:
        request_id = next(self.ids)
        self.socket.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium-profile"
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 60, "Chromium to start")
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            page = next(t for t in json.load(reply) if t["type"] == "page")
        from websockets.sync.client import connect

        with connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
            yield DevTools(socket)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)"
)
def test_the_upload_page_shows_the_overlay_in_headless_chromium(endpoint, browser, tmp_path):
    picture = tmp_path / "street.jpg"
    photo(160, 120).save(picture)
    browser("Page.navigate", url=endpoint["url"] + "/")
    wait_until(lambda: browser.evaluate("document.readyState") == "complete", 30, "the page to load")
    wait_until(
        lambda: "Model tiny" in browser.evaluate("document.getElementById('model').textContent"),
        30,
        "the page to show the model",
    )
    root = browser("DOM.getDocument")["root"]["nodeId"]
    file_input = browser("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    browser("DOM.setFileInputFiles", nodeId=file_input, files=[str(picture)])
    browser.evaluate("document.getElementById('submit').click()")
    wait_until(
        lambda: browser.evaluate("document.getElementById('overlay').naturalWidth") > 0,
        60,
        "the overlay image",
    )
    size = browser.evaluate(
        "(o => [o.naturalWidth, o.naturalHeight, o.style.display])(document.getElementById('overlay'))"
    )
    assert size == [160, 120, "block"]
    assert "street.jpg" in browser.evaluate("document.getElementById('status').textContent")
    # The legend names the answer's classes with their palette colours.
    answer = httpx.post(endpoint["url"] + "/v1/segment?format=json", content=picture.read_bytes(),
                        headers={"Content-Type": "image/jpeg"}, timeout=60).json()  # fmt: skip
    items = browser.evaluate("[...document.querySelectorAll('#legend li')].map(li => li.textContent)")
    assert items == answer["classes_present"] and items
    colour = browser.evaluate("document.querySelector('#legend .swatch').style.background")
    assert colour == "rgb({}, {}, {})".format(*PALETTE[CLASSES.index(items[0])])


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_segpipe_serve_with_crf_answers_until_interrupted(tmp_path):
    """`segpipe serve --crf --auth-token-file`: 401 JSON without the token or with a wrong one, 200 with it,
    /healthz open, the token in no log; CRF answers; Ctrl-C stops it."""
    folder = tiny_model(tmp_path / "model", ["fcn8s"])
    token = "s3cr3t-" + os.urandom(12).hex()
    (tmp_path / "token").write_text(token + "\n")
    port, log = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, as from a terminal
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "serve",
                "--model-uri",
                str(folder),
                "--port",
                str(port),
                "--crf",
                "--auth-token-file",
                str(tmp_path / "token"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        wait_until(
            lambda: f"serving {folder} at {url}" in log.read_text() or process.poll() is not None,
            240,
            "segpipe serve to start",
        )
        assert process.poll() is None, log.read_text()[-3000:]
        assert httpx.get(f"{url}/healthz").status_code == 200  # open: for load balancers and probes
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": token}):
            refused = post(url, encode(photo(64, 48), "PNG"), headers=headers)
            assert refused.status_code == 401 and refused.json()["error"] == "unauthorized", refused.text
            assert refused.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(f"{url}/v1/model").status_code == 401
        assert httpx.get(f"{url}/v1/model", headers=auth).json()["crf"] is True
        reply = post(url, encode(photo(64, 48), "PNG"), headers=auth)
        assert reply.status_code == 200 and Image.open(io.BytesIO(reply.content)).size == (64, 48)
        # The answer was made in the CRF pool, after the model replica's inference.
        timing = post(url, encode(photo(64, 48), "PNG"), fmt="json", headers=auth).json()["timing_ms"]
        assert set(timing) == {"decode", "inference", "crf", "postprocess"}, timing
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    logs = [log, *Path("/tmp/ray/session_latest/logs").glob("serve/*.log")]
    assert not [p for p in logs if p.is_file() and token in p.read_text(errors="replace")]
    assert "shutting down" in log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=5)
