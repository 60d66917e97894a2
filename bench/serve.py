"""Benchmark: the Ray Serve endpoint against the same model called in-process, and @serve.batch on and off.

    .venv/bin/python bench/serve.py [--size 128] [--seconds 8] [--json-out bench/out/serve.json]

One tiny FCN-8s (random weights; the network's speed does not depend on them) and one H x W PNG. In the
same run:
- in-process: threads calling what the endpoint does per request (decode, member forward pass, combine,
  palette PNG) at concurrency 1, 8 and 32;
- through Serve: real HTTP requests to POST /v1/segment at the same concurrency (proxy -> ingress ->
  member), so "added latency" is everything Serve, HTTP and the two hops cost;
- @serve.batch: throughput at concurrency 32 of the endpoint with dynamic batching (max_batch_size 8) and
  of an otherwise identical one without (max_batch_size 1), end to end and calling the member directly.
Prints p50/p99 latency (ms) and throughput (requests/s); `--json-out` saves the figures.
"""

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import segmodels
from pipelines.report import format_table
from pipelines.runtime import ensure_ray
from pipelines.serve import (
    MemberModel,
    ModelRef,
    ServeConfig,
    build_app,
    decode_upload,
    labels_only,
    render,
    served,
    start_server,
    stop_server,
)
from segmodels.artifact import MemberSpec, ModelSpec, read_spec, save_model_dir

CONCURRENCY = (1, 8, 32)


def tiny_model(folder: Path) -> Path:
    torch.manual_seed(0)
    net = segmodels.build_model("fcn8s", 21, width=0.0625)
    spec = ModelSpec(
        name="bench",
        classes=[f"c{i}" for i in range(21)],
        palette=[[(37 * i) % 256, (91 * i) % 256, (53 * i) % 256] for i in range(21)],
        members=[
            MemberSpec(
                arch="fcn8s", num_classes=21, weights="member0.safetensors", model_args={"width": 0.0625}
            )
        ],
        ensemble_weights=[1.0],
        mean=list(segmodels.IMAGENET_MEAN),
        std=list(segmodels.IMAGENET_STD),
    )
    return save_model_dir(folder, spec, [net.state_dict()])


def summary(latencies: list[float], seconds: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "throughput_rps": len(ms) / seconds,
    }


def in_process(folder: Path, data: bytes, concurrency: int, seconds: float) -> dict:
    """The endpoint's per-request work, called directly from `concurrency` threads for `seconds`."""
    ref = ModelRef(str(folder), "", read_spec(folder))
    member = MemberModel.func_or_class(ServeConfig(model_uri=str(folder)), ref, 0, 1)
    model = served(ref, crf=False)

    def one() -> float:
        started = time.perf_counter()
        image = decode_upload(data, 4096 * 4096)
        outputs = member.predict_batch([image], [ref.source], [0], [labels_only(model)])
        render(image, outputs, model, "png", {})
        return time.perf_counter() - started

    for _ in range(10):
        one()
    deadline = time.perf_counter() + seconds
    latencies, lock = [], threading.Lock()

    def worker() -> None:
        while time.perf_counter() < deadline:
            latency = one()
            with lock:
                latencies.append(latency)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return summary(latencies, time.perf_counter() - started)


async def closed_loop(call, concurrency: int, seconds: float, warmup: int = 20) -> dict:
    """`concurrency` clients each awaiting `call()` back to back for `seconds`, after a warm-up."""
    await asyncio.gather(*(call() for _ in range(warmup)))
    deadline = time.perf_counter() + seconds
    latencies = []

    async def client() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return summary(latencies, time.perf_counter() - started)


def over_http(url: str, data: bytes | None, concurrency: int, seconds: float) -> dict:
    """POST `data` to /v1/segment from `concurrency` clients; with no data, GET /healthz (no model work)."""

    async def run() -> dict:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:

            async def call() -> None:
                if data is None:
                    reply = await client.get(f"{url}/healthz")
                else:
                    reply = await client.post(
                        f"{url}/v1/segment", content=data, headers={"Content-Type": "image/png"}
                    )
                if reply.status_code != 200:
                    raise RuntimeError(f"{reply.status_code}: {reply.text}")

            return await closed_loop(call, concurrency, seconds)

    return asyncio.run(run())


def member_direct(
    app_name: str, image: np.ndarray | None, source: str, concurrency: int, seconds: float
) -> dict:
    """Calls straight to the member deployment through a DeploymentHandle: batching without HTTP or ingress.

    With no image, calls `load` on the loaded member instead: the cost of the hop alone.
    """
    from ray import serve

    handle = serve.get_deployment_handle("MemberModel_0", app_name=app_name)

    async def call() -> None:
        if image is None:
            await handle.load.remote(source, 0)
        else:
            await handle.predict.remote(image, source, 0, True)

    return asyncio.run(closed_loop(call, concurrency, seconds))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=int, default=128, help="square test image side in pixels (default: 128)"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per figure (default: 8)")
    parser.add_argument("--json-out", default="bench/out/serve.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a member replica with one CPU

    from ray import serve

    workdir = Path(tempfile.mkdtemp(prefix="segpipe-bench-serve-"))
    folder = tiny_model(workdir / "model")
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    data = buffer.getvalue()

    rows, result = (
        [],
        {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "image": f"{args.size}x{args.size} PNG",
            "model": "fcn8s width 0.0625",
        },
    )
    for c in CONCURRENCY:
        result[f"in_process_c{c}"] = in_process(folder, data, c, args.seconds)

    # Logical CPUs for both endpoints at once; they are measured one after the other.
    ensure_ray(num_cpus=4)
    common = {
        "model_uri": str(folder),
        "min_replicas": 1,
        "max_replicas": 1,
        "member_cpus": 1.0,
        "ingress_cpus": 0.5,
    }
    url = start_server(ServeConfig(port=free_port(), max_batch_size=8, **common))
    try:
        for c in CONCURRENCY:
            result[f"serve_c{c}"] = over_http(url, data, c, args.seconds)
        result["hop_http_healthz_c1"] = over_http(url, None, 1, args.seconds)
        result["hop_member_handle_c1"] = member_direct("segpipe", None, str(folder), 1, args.seconds)
        serve.run(
            build_app(ServeConfig(max_batch_size=1, **common)), name="unbatched", route_prefix="/unbatched"
        )
        result["unbatched_c32"] = over_http(f"{url}/unbatched", data, 32, args.seconds)
        image = decode_upload(data, 4096 * 4096)
        result["member_batched_c32"] = member_direct("segpipe", image, str(folder), 32, args.seconds)
        result["member_unbatched_c32"] = member_direct("unbatched", image, str(folder), 32, args.seconds)
    finally:
        stop_server()

    for c in CONCURRENCY:
        local, remote = result[f"in_process_c{c}"], result[f"serve_c{c}"]
        rows.append(
            [
                c,
                round(local["p50_ms"], 1),
                round(local["p99_ms"], 1),
                round(local["throughput_rps"], 1),
                round(remote["p50_ms"], 1),
                round(remote["p99_ms"], 1),
                round(remote["throughput_rps"], 1),
                round(remote["p50_ms"] - local["p50_ms"], 1),
            ]
        )
    result["added_p50_ms_c1"] = result["serve_c1"]["p50_ms"] - result["in_process_c1"]["p50_ms"]
    result["batch_speedup_http_c32"] = (
        result["serve_c32"]["throughput_rps"] / result["unbatched_c32"]["throughput_rps"]
    )
    result["batch_speedup_member_c32"] = (
        result["member_batched_c32"]["throughput_rps"] / result["member_unbatched_c32"]["throughput_rps"]
    )

    print(f"\n{result['machine']}; {result['image']}; {result['model']}; {args.seconds:g} s per figure\n")
    print(
        format_table(
            ["concurrency", "in-process p50", "p99", "req/s", "Serve p50", "p99", "req/s", "added p50 (ms)"],
            rows,
        )
    )
    print("\n@serve.batch at concurrency 32 (requests/s), batched (max 8) vs unbatched:")
    print(
        format_table(
            ["path", "batched", "unbatched", "speed-up"],
            [
                [
                    "HTTP end to end",
                    round(result["serve_c32"]["throughput_rps"], 1),
                    round(result["unbatched_c32"]["throughput_rps"], 1),
                    round(result["batch_speedup_http_c32"], 2),
                ],
                [
                    "member via handle",
                    round(result["member_batched_c32"]["throughput_rps"], 1),
                    round(result["member_unbatched_c32"]["throughput_rps"], 1),
                    round(result["batch_speedup_member_c32"], 2),
                ],
            ],
        )
    )
    print(
        f"\nServe's added p50 latency at concurrency 1: {result['added_p50_ms_c1']:.1f} ms (target <= 5 ms); "
        f"with no model work, HTTP -> proxy -> ingress takes {result['hop_http_healthz_c1']['p50_ms']:.1f} ms "
        f"and ingress -> member {result['hop_member_handle_c1']['p50_ms']:.1f} ms (p50)"
    )
    result["load_average"] = [round(v, 2) for v in os.getloadavg()]
    print(f"load average at the end (1, 5, 15 min): {result['load_average']} on {os.cpu_count()} cores")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
