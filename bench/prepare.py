"""Benchmark: `segpipe prepare` (Ray Data) against a plain single-process loop doing the same per-image work.

    .venv/bin/python bench/prepare.py [--num 500] [--size 375 500] [--num-cpus N]

Writes N synthetic VOC images (default 500 at 500x375, like VOC's), then times, in the same run:
- the Ray Data pipeline (`pipelines.data.prepare.prepare`: list, read, decode, validate, convert, encode,
  write parquet, manifest), after a small warm-up run so worker start-up is not counted;
- a serial loop calling the same per-sample function (`convert_sample`) and writing one parquet file;
- the same loop spread over `ProcessPoolExecutor(--num-cpus)`;
- with `--s3-latency-ms` (default 20): the images uploaded to a moto S3 server on 127.0.0.1 behind a
  loopback proxy that delays every request, then one conversion batch (`convert_batch`, the body of a
  prepare task) with its concurrent reads vs the same samples read one GET after another.
Prints images/s for each (best of --repeat runs), the ratios and the machine; `--json-out` saves them.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import logging
import os
import platform
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.data.dataset import COLUMNS, parquet_schema
from pipelines.data.layouts import get_layout
from pipelines.data.prepare import PrepareConfig, convert_batch, convert_sample, prepare
from pipelines.data.synth import SynthConfig, synthesize


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its descendants (Ray's raylet, GCS and workers), from
    /proc: unlike wall time, it does not depend on what else the machine is running."""
    tick, parents, cpu = os.sysconf("SC_CLK_TCK"), {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents[int(pid)], cpu[int(pid)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    mine, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine, grew = mine | new, bool(new)
    return sum(cpu[pid] for pid in mine)


def serial(root: str, out: Path) -> tuple[int, float]:
    """The same per-image work in one process: list, read, decode, validate, convert, encode, write."""
    start = time.perf_counter()
    layout = get_layout("voc")
    samples, _ = layout.list_split(root, "train")
    fs, _ = storage.filesystem(root)
    rows = [convert_sample(s, layout, fs, None) for s in samples]
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=parquet_schema())
    pq.write_table(table, out / "serial.parquet", compression="snappy", use_dictionary=False)
    return len(rows), time.perf_counter() - start


def _convert_chunk(args: tuple[str, list]) -> list[dict]:
    root, samples = args
    layout = get_layout("voc")
    fs, _ = storage.filesystem(root)
    return [convert_sample(s, layout, fs, None) for s in samples]


def process_pool(root: str, out: Path, workers: int) -> tuple[int, float]:
    """The serial loop's conversion spread over a process pool (chunks of 32), then one parquet file."""
    start = time.perf_counter()
    samples, _ = get_layout("voc").list_split(root, "train")
    chunks = [(root, samples[i : i + 32]) for i in range(0, len(samples), 32)]
    with ProcessPoolExecutor(workers) as pool:
        rows = [r for chunk in pool.map(_convert_chunk, chunks) for r in chunk]
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=parquet_schema())
    pq.write_table(table, out / "pool.parquet", compression="snappy", use_dictionary=False)
    return len(rows), time.perf_counter() - start


def delay_proxy(target: str, delay_s: float) -> ThreadingHTTPServer:
    """An HTTP proxy on 127.0.0.1 that waits `delay_s` before forwarding each request to `target`."""
    host, port = target.removeprefix("http://").split(":")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self) -> None:
            time.sleep(delay_s)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request(self.command, self.path, body=body, headers=dict(self.headers))
            response = conn.getresponse()
            data = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            # HEAD answers carry the object's size (S3 clients size their reads by it), not the empty body's.
            size = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", size or str(len(data)))
            self.end_headers()
            try:
                if self.command != "HEAD":
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on this response
                pass
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def s3_latency(src: Path, latency_ms: float, images: int, repeat: int) -> dict:
    """One conversion batch from moto S3 behind a `latency_ms` proxy: concurrent vs sequential reads."""
    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    boto3.client("s3").create_bucket(Bucket="bench")
    base = src / "VOCdevkit" / "VOC2012"
    for path in base.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"s3://bench/{path.relative_to(src).as_posix()}", path.read_bytes())
    proxy = delay_proxy(f"http://{host}:{port}", latency_ms / 1000)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.server_address[1]}"
    root = "s3://bench"
    samples, _ = get_layout("voc").list_split(root, "train")
    samples = samples[:images]
    batch = pa.Table.from_pylist([dataclasses.asdict(s) for s in samples])
    fs, _ = storage.filesystem(root)
    layout = get_layout("voc")
    concurrent = sequential = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows = convert_batch(batch, layout=get_layout("voc"), fs=fs, max_side=None)
        concurrent = min(concurrent, time.perf_counter() - t0)
        t0 = time.perf_counter()
        serial_rows = [convert_sample(s, layout, fs, None) for s in samples]
        sequential = min(sequential, time.perf_counter() - t0)
    assert rows.num_rows == len(serial_rows) == len(samples)
    assert isinstance(fs, pafs.S3FileSystem)
    proxy.shutdown()
    moto.stop()
    return {
        "latency_ms": latency_ms,
        "images": len(samples),
        "sequential_images_per_s": round(len(samples) / sequential, 1),
        "concurrent_images_per_s": round(len(samples) / concurrent, 1),
        "speedup": round(sequential / concurrent, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num", type=int, default=500, help="images (default: 500)")
    parser.add_argument("--size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray CPUs (default: all cores)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed runs of each; the best is kept (default: 3)"
    )
    parser.add_argument("--s3-latency-ms", type=float, default=20.0, help="0 skips the S3 case")
    parser.add_argument("--s3-images", type=int, default=64, help="samples in the S3 batch (default: 64)")
    parser.add_argument("--workdir", default="bench/out/prepare")
    parser.add_argument("--json-out", default="bench/out/prepare.json")
    args = parser.parse_args()

    import ray

    load = os.getloadavg()[0]  # other processes on the machine skew both sides; reported with the figures
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    src = synthesize(
        SynthConfig("voc", str(work / "src"), num_train=args.num, num_val=0, size=tuple(args.size))
    )
    warm = synthesize(SynthConfig("voc", str(work / "warm"), num_train=64, num_val=0, size=tuple(args.size)))

    t0 = time.perf_counter()
    # address="local": a fresh instance with exactly --num-cpus, even if one was started with `ray start`.
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - t0
    prepare(PrepareConfig("voc", str(warm), str(work / "warm-out"), splits=("train",), progress=False))

    # Best of --repeat for each side: the machine may be shared, and the minimum is the least disturbed run.
    ray_s = serial_s = pool_s = ray_cpu = serial_cpu = float("inf")
    for rep in range(args.repeat):
        cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
        result = prepare(
            PrepareConfig("voc", str(src), str(work / f"ray-out-{rep}"), splits=("train",), progress=False)
        )
        ray_s, ray_cpu = min(ray_s, time.perf_counter() - t0), min(ray_cpu, tree_cpu_seconds() - cpu0)
        cpu0 = time.process_time()
        count, seconds = serial(str(src), work)
        serial_s, serial_cpu = min(serial_s, seconds), min(serial_cpu, time.process_time() - cpu0)
        pool_s = min(pool_s, process_pool(str(src), work, args.num_cpus)[1])
        assert count == result.splits["train"].rows == args.num
    ray.shutdown()

    figures = {
        "images": args.num,
        "size": f"{args.size[1]}x{args.size[0]}",
        "cores": os.cpu_count(),
        "ray_cpus": args.num_cpus,
        "cpu": platform.processor() or platform.machine(),
        "serial_images_per_s": round(count / serial_s, 1),
        "ray_images_per_s": round(args.num / ray_s, 1),
        "speedup": round(serial_s / ray_s, 2),
        "process_pool_images_per_s": round(args.num / pool_s, 1),
        "speedup_vs_process_pool": round(pool_s / ray_s, 2),
        "serial_cpu_s": round(serial_cpu, 2),
        "ray_cpu_s": round(ray_cpu, 2),  # driver + raylet/GCS + workers
        "ray_start_s": round(ray_start, 1),
        "mb_written": result.mb_written,
        "load_average_1min_before": round(load, 2),
    }
    print(
        f"prepare {args.num} VOC-like images ({figures['size']}) on {figures['cores']} cores:\n"
        f"  single-process loop: {figures['serial_images_per_s']:8.1f} images/s\n"
        f"  Ray Data prepare   : {figures['ray_images_per_s']:8.1f} images/s  ({figures['speedup']:.2f}x; "
        "target >= 1.6x)\n"
        f"  CPU seconds: single process {figures['serial_cpu_s']}, Ray (driver, raylet, workers) "
        f"{figures['ray_cpu_s']}: on {args.num_cpus} idle cores at most "
        f"{args.num_cpus * serial_cpu / ray_cpu:.2f}x\n"
        f"  (best of {args.repeat}; Ray start-up {figures['ray_start_s']} s not counted; {figures['mb_written']} MB "
        f"written; load average before the run {figures['load_average_1min_before']})"
    )
    print(
        f"  ProcessPoolExecutor({args.num_cpus}): {figures['process_pool_images_per_s']:8.1f} images/s "
        f"(Ray Data {figures['speedup_vs_process_pool']:.2f}x of it)"
    )
    if args.s3_latency_ms:
        figures["s3"] = s3_latency(src, args.s3_latency_ms, args.s3_images, args.repeat)
        f = figures["s3"]
        print(
            f"  S3 (moto) + {f['latency_ms']:.0f} ms per request, one batch of {f['images']}: sequential GETs "
            f"{f['sequential_images_per_s']} images/s, concurrent {f['concurrent_images_per_s']} images/s -> "
            f"{f['speedup']:.2f}x (target >= 8x)"
        )
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
