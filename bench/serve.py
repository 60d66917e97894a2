"""Benchmark: `segpipe serve` against what a user would deploy instead, one uvicorn + FastAPI process.

    .venv/bin/python bench/serve.py [--cases fcn8s,deeplab,ensemble,ensemble_crf] [--seconds 8]
                                    [--soak 2000] [--json-out bench/out/serve.json]

Both sides hold the same model (random weights: the speed does not depend on them), answer the same real
HTTP requests (POST /v1/segment, a 500x375 JPEG, palette PNG back) and use the same cores: the baseline is
one uvicorn process (decode, forward, max over classes, PNG; dense CRF for the CRF case) with torch on every
core; Serve runs with its defaults on a local Ray of this machine's cores, model replicas and their torch
threads sized from the node (`replica_sizing`, printed). They are measured one after the other in
one run, at concurrency 1, 8 and 32 (closed-loop clients). Models: FCN-8s width 0.25, DeepLab-LargeFOV
width 0.5, the two as an ensemble, and the ensemble with the CRF. The soak sends `--soak` requests at
concurrency 16 to the last case (put `ensemble` last) and kills the model replica halfway: Serve must replace it, no request may
hang, and failures (503 JSON) must stay <= 1%. `--upscale` times Serve's default autoscaling: seconds from
the start of a load at concurrency 8 until a second FCN-8s replica is running. Every cell also reports
where the CPU went: CPU milliseconds per request of the clients, the baseline process, and each of
Serve's processes (proxy, ingress, model replica, controller, the rest of Ray), read from /proc.
"""

import argparse
import asyncio
import dataclasses
import io
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import segmodels
from pipelines.report import format_table
from segmodels.artifact import MemberSpec, ModelSpec, save_model_dir

CONCURRENCY = (1, 8, 32)
MEMBERS = {"fcn8s": ("fcn8s", {"width": 0.25}), "deeplab": ("deeplab_largefov", {"width": 0.5})}
CASES = {
    "fcn8s": (["fcn8s"], False),
    "deeplab": (["deeplab"], False),
    "ensemble_crf": (["fcn8s", "deeplab"], True),
    "ensemble": (["fcn8s", "deeplab"], False),
}


def model_folder(folder: Path, members: list[str]) -> Path:
    specs, states = [], []
    for i, key in enumerate(members):
        arch, args = MEMBERS[key]
        torch.manual_seed(i)
        states.append(segmodels.build_model(arch, 21, **args).state_dict())
        specs.append(MemberSpec(arch=arch, num_classes=21, weights=f"member{i}.safetensors", model_args=args))
    spec = ModelSpec(
        name="bench",
        classes=[f"c{i}" for i in range(21)],
        palette=[[(37 * i) % 256, (91 * i) % 256, (53 * i) % 256] for i in range(21)],
        members=specs,
        ensemble_weights=[1.0] * len(specs),
        mean=list(segmodels.IMAGENET_MEAN),
        std=list(segmodels.IMAGENET_STD),
    )
    return save_model_dir(folder, spec, states)


def picture(width: int, height: int) -> bytes:
    """A smooth picture with noise, as a JPEG (63 KB-ish at 500x375, like a VOC photo)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, rng.integers(0, 256, (height, width))], axis=2)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- baseline
def baseline_app(folder: str, crf: bool, device: str = "cpu"):
    """The plain FastAPI app a user would write: one process, the model in memory, the same work."""
    from fastapi import FastAPI, Request, Response

    from pipelines.inference.core import InferenceSettings, predict_batch
    from pipelines.report import palette_png
    from pipelines.serve.uploads import decode_upload
    from segmodels.artifact import load_model_dir
    from segmodels.crf import CRFParams, dense_crf

    model = load_model_dir(folder, device=device)
    torch.set_num_threads(os.cpu_count() or 1)
    api = FastAPI()

    def png(data: bytes) -> bytes:
        image = decode_upload(data, 4096 * 4096)
        probs = predict_batch(model, image[None], InferenceSettings())[0]
        if crf:
            probs = torch.from_numpy(
                dense_crf(image, probs.cpu().numpy(), CRFParams(**(model.spec.crf or {})))
            )
        return palette_png(probs.max(0).indices.to(torch.uint8).cpu().numpy(), model.spec.palette)

    @api.post("/v1/segment")
    async def segment(request: Request) -> Response:
        data = await request.body()
        return Response(await asyncio.to_thread(png, data), media_type="image/png")

    return api


def run_baseline(folder: str, port: int, crf: bool, device: str) -> None:
    import uvicorn

    uvicorn.run(baseline_app(folder, crf, device), host="127.0.0.1", port=port, log_level="warning")


def start_baseline(folder: Path, crf: bool, device: str = "cpu") -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, __file__, "--baseline", str(folder), "--port", str(port), "--device", device] + (
        ["--crf"] if crf else []
    )
    process = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/docs", timeout=2)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the baseline server did not start within 120 s")


# ---------------------------------------------------------------------------------------------- load
def summary(latencies: list[float], seconds: float, failures: int = 0) -> dict:
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(ms),
        "failures": failures,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "throughput_rps": len(ms) / seconds,
    }


def closed_loop(url: str, data: bytes, concurrency: int, seconds: float, warmup: int = 4) -> dict:
    """`concurrency` clients POSTing back to back for `seconds` after a warm-up; non-200 answers fail the run."""

    async def run() -> dict:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:

            async def call() -> None:
                reply = await client.post(
                    f"{url}/v1/segment", content=data, headers={"Content-Type": "image/jpeg"}
                )
                if reply.status_code != 200:
                    raise RuntimeError(f"{reply.status_code}: {reply.text[:300]}")

            await asyncio.gather(*(call() for _ in range(min(warmup, concurrency))))
            deadline, latencies = time.perf_counter() + seconds, []

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    await call()
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return summary(latencies, time.perf_counter() - started)

    return asyncio.run(run())


def soak(url: str, data: bytes, total: int, concurrency: int, kill_at: int | None, kill) -> dict:
    """`total` requests from `concurrency` clients; `kill()` runs when request `kill_at` is sent."""
    statuses: dict[int, int] = {}
    errors, latencies = [], []

    async def run() -> None:
        counter = iter(range(total))
        async with httpx.AsyncClient(timeout=120) as client:

            async def worker() -> None:
                for i in counter:
                    if i == kill_at:
                        threading.Thread(target=kill).start()
                    started = time.perf_counter()
                    try:
                        reply = await client.post(
                            f"{url}/v1/segment", content=data, headers={"Content-Type": "image/jpeg"}
                        )
                        status = reply.status_code
                        if status != 200:
                            errors.append(reply.text[:200])
                    except httpx.HTTPError as err:  # a hang (timeout) or a dropped connection
                        status = 0
                        errors.append(repr(err))
                    statuses[status] = statuses.get(status, 0) + 1
                    latencies.append(time.perf_counter() - started)

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    started = time.perf_counter()
    asyncio.run(run())
    result = summary(latencies, time.perf_counter() - started, total - statuses.get(200, 0))
    result.update(
        statuses={str(k): v for k, v in statuses.items()}, errors=errors[:5], max_ms=max(latencies) * 1000
    )
    return result


def kill_model_replica() -> None:
    import ray

    prefix = "SERVE_REPLICA::segpipe#SegmentationModel#"
    (name, *_) = [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    print(f"killed {name}", flush=True)


def running_model_replicas() -> int:
    from ray import serve

    from pipelines.serve import APP_NAME

    deployment = serve.status().applications[APP_NAME].deployments["SegmentationModel"]
    return sum(n for state, n in deployment.replica_states.items() if str(state).endswith("RUNNING"))


def upscale_reaction(folder: Path, data: bytes, concurrency: int = 8) -> dict:
    """Seconds from the start of a closed-loop load to a second model replica answering, with the
    default autoscaling knobs and room for two replicas (one torch thread each)."""
    from pipelines.serve import ServeConfig, start_server, stop_server

    cfg = ServeConfig(
        model_uri=str(folder), port=free_port(), max_replicas=2, replica_threads=1, member_cpus=0.5
    )
    url = start_server(cfg)
    try:
        closed_loop(url, data, 1, 1.0)  # warm, then idle: one replica
        load = threading.Thread(target=closed_loop, args=(url, data, concurrency, 40.0), daemon=True)
        started = time.perf_counter()
        load.start()
        seconds = None
        while load.is_alive():
            if running_model_replicas() >= 2:
                seconds = time.perf_counter() - started
                break
            time.sleep(0.2)
        load.join()
    finally:
        stop_server()
    return {
        "seconds_to_second_replica": None if seconds is None else round(seconds, 1),
        "upscale_delay_s": cfg.upscale_delay_s,
        "look_back_period_s": cfg.look_back_period_s,
        "target_ongoing_requests": cfg.target_ongoing_requests,
    }


# Processes of this bench, by what they do: the first label whose marker is in the command line.
CPU_GROUPS = (
    ("model replica", "SegmentationModel"),
    ("CRF replica", "CRFRefiner"),
    ("ingress", "SegmentationIngress"),
    ("proxy", "ProxyActor"),
    ("Serve controller", "ServeController"),
    ("baseline (uvicorn)", "--baseline"),
    ("Ray (GCS, raylet, dashboard, agents, idle workers)", ""),
)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (the clients) and each group of its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, usage = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        usage[int(entry)] = ((int(fields[11]) + int(fields[12])) / tick, cmdline)
    me, totals = os.getpid(), {"clients (this process)": usage[os.getpid()][0]}
    for pid, (seconds, cmdline) in usage.items():
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, me):
            ancestor = parents.get(ancestor)
        if ancestor == me:
            label = next(label for label, marker in CPU_GROUPS if marker in cmdline)
            totals[label] = totals.get(label, 0.0) + seconds
    return totals


def measured(url: str, data: bytes, concurrency: int, seconds: float) -> dict:
    """`closed_loop`, with the CPU seconds per answered request of each group of processes."""
    before = cpu_seconds()
    result = closed_loop(url, data, concurrency, seconds)
    after = cpu_seconds()
    requests = result["requests"] + min(4, concurrency)  # the warm-up's too
    result["cpu_ms_per_request"] = {
        label: round(1000 * (after[label] - before.get(label, 0.0)) / requests, 1) for label in after
    }
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------- main
def measure(args, workdir: Path, data: bytes) -> dict:
    import ray

    from pipelines.preflight import cluster_capacity
    from pipelines.serve import ServeConfig, start_server, stop_server
    from pipelines.serve.config import replica_sizing
    from pipelines.serve_proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    # A fresh local Ray (never another one running on this machine) with the machine's cores, as
    # `segpipe serve` starts it.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=True, logging_level=logging.WARNING)
    result = {}
    for case in args.cases:
        members, crf = CASES[case]
        folder = model_folder(workdir / case, members)
        process, url = start_baseline(folder, crf, args.device)
        try:
            for c in CONCURRENCY:
                result[f"{case}_baseline_c{c}"] = measured(url, data, c, args.seconds)
                print(case, "baseline", c, result[f"{case}_baseline_c{c}"], flush=True)
        finally:
            process.terminate()
            process.wait(30)
        gpu = {"member_gpus": 1.0} if args.device == "cuda" else {}  # one replica on the GPU
        cfg = ServeConfig(model_uri=str(folder), port=free_port(), crf=crf, request_timeout_s=120, **gpu)
        result[f"{case}_sizing"] = dataclasses.asdict(replica_sizing(cfg, cluster_capacity()))
        print(case, "model replicas", result[f"{case}_sizing"], flush=True)
        url = start_server(cfg)
        try:
            for c in CONCURRENCY:
                result[f"{case}_serve_c{c}"] = measured(url, data, c, args.seconds)
                print(case, "serve", c, result[f"{case}_serve_c{c}"], flush=True)
            if case == args.cases[-1] and args.soak:  # the ensemble when all cases run
                result["soak"] = soak(url, data, args.soak, 16, args.soak // 2, kill_model_replica)
                print("soak", result["soak"], flush=True)
        finally:
            stop_server()
    if args.upscale:
        result["upscale"] = upscale_reaction(model_folder(workdir / "upscale", ["fcn8s"]), data)
        print("upscale", result["upscale"], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per figure (default: 8)")
    parser.add_argument("--soak", type=int, default=2000, help="soak requests, 0 to skip (default: 2000)")
    parser.add_argument("--size", default="500x375", help="image WxH (default: 500x375)")
    parser.add_argument(
        "--upscale",
        action="store_true",
        help="also time how long Serve's default autoscaling takes to add a second model replica under load",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="cuda: the model on one GPU on both sides"
    )
    parser.add_argument("--json-out", default="bench/out/serve.json")
    parser.add_argument("--baseline", help=argparse.SUPPRESS)  # internal: run the baseline server
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--crf", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        run_baseline(args.baseline, args.port, args.crf, args.device)
        return
    args.cases = args.cases.split(",")
    width, height = (int(v) for v in args.size.split("x"))
    data = picture(width, height)
    load_before = [round(v, 2) for v in os.getloadavg()]
    result = measure(args, Path(tempfile.mkdtemp(prefix="segpipe-bench-serve-")), data)
    result.update(
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        image=f"{width}x{height} JPEG, {len(data)} bytes",
        load_average_before=load_before,
        load_average_after=[round(v, 2) for v in os.getloadavg()],
    )
    rows = []
    for case in args.cases:
        for c in CONCURRENCY:
            base, ours = result[f"{case}_baseline_c{c}"], result[f"{case}_serve_c{c}"]
            rows.append(
                [
                    case,
                    c,
                    round(base["p50_ms"], 1),
                    round(base["throughput_rps"], 2),
                    round(ours["p50_ms"], 1),
                    round(ours["throughput_rps"], 2),
                    f"{ours['throughput_rps'] / base['throughput_rps']:.2f}x",
                    round(ours["p50_ms"] - base["p50_ms"], 1),
                ]
            )
    sizing = result[f"{args.cases[0]}_sizing"]
    print(f"\n{result['machine']}; {result['image']}; {args.seconds:g} s per figure")
    print(f"Serve: up to {sizing['replicas']} model replica(s) x {sizing['threads']} torch threads")
    print(f"load average before {load_before}, after {result['load_average_after']}\n")
    headers = [
        "model",
        "concurrency",
        "baseline p50",
        "req/s",
        "Serve p50",
        "req/s",
        "ratio",
        "added p50 (ms)",
    ]
    print(format_table(headers, rows))
    for case in args.cases:
        for c in CONCURRENCY:
            for side in ("baseline", "serve"):
                cpu = result[f"{case}_{side}_c{c}"]["cpu_ms_per_request"]
                spent = ", ".join(
                    f"{label} {ms:g}" for label, ms in sorted(cpu.items(), key=lambda kv: -kv[1]) if ms
                )
                print(f"{case} c{c} {side}: CPU ms per request: {spent}")
    if "soak" in result:
        s = result["soak"]
        print(
            f"\nsoak: {s['requests']} requests at concurrency 16, model replica killed halfway: statuses {s['statuses']}"
        )
    if "upscale" in result:
        u = result["upscale"]
        print(
            f"\nupscale: a second model replica answered {u['seconds_to_second_replica'] or 'not within 40'} s "
            f"after load started at concurrency 8 (upscale_delay_s {u['upscale_delay_s']:g}, look_back_period_s "
            f"{u['look_back_period_s']:g}, target_ongoing_requests {u['target_ongoing_requests']:g})"
        )
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
