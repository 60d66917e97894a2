"""Full-size rehearsal: generated Cityscapes at 2048x1024 through every stage, within this machine's memory.

    .venv/bin/python bench/fullsize.py [--train 32] [--val 8] [--crf-images 4] [--json-out bench/out/fullsize.json]

Starts a Ray head on 127.0.0.1 (as a cluster would have) and runs each stage as its own `segpipe` command
against it, the way `ray job submit` runs a driver: synth -> prepare -> train two models one epoch at crop
713 (FCN-8s with its 100-pixel pad, DeepLab-LargeFOV) -> evaluate (sliding 713, flip, scales 0.75/1/1.25)
-> ensemble of the two with a CRF search on `--crf-images` images -> predict with the CRF; then lists a
COCO-size annotation file (`bench/coco_listing.py`) in its own process.

A sampler reads every process's resident memory every 0.25 s and the object store's usage from the
raylet, and the bench prints, per stage, the wall time and the peak RSS of each process kind: the driver
(the `segpipe` command), train workers, model actors (Ray Data map workers), tasks (other Ray workers, e.g.
the CRF), Ray's own processes, their sum, and the object store's peak. Networks run at width 1/8: what is
rehearsed is what full-size images cost in buffers, feeds and transfers, not the networks' arithmetic.
The machine must not swap: the bench fails when swap use grows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEGPIPE = str(BIN / "segpipe")
KINDS = ("driver", "train workers", "model actors", "tasks", "ray system", "all processes")
GB = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kind_of(cmd: list[str], parent: int, ray_root: str, raylets: set[int]) -> str | None:
    """Which kind of process of this rehearsal's Ray head a command line is, or None when it is not one.

    Workers rename themselves `ray::...` and keep no arguments, so they are told apart from other Ray
    instances' workers (a test suite running beside the bench) by their parent: this head's raylet.
    """
    head = cmd[0] if cmd else ""
    if parent in raylets:
        if "RayTrainWorker" in head:
            return "train workers"
        if "MapWorker" in head:
            return "model actors"
        return "tasks"  # Ray Data tasks, CRF tasks, idle workers
    if any(ray_root in part for part in cmd):
        return "ray system"
    return None


class Sampler(threading.Thread):
    """Peak RSS per process kind and the object store's peak, for the stage currently running."""

    def __init__(self, gcs_address: str, ray_root: str):
        super().__init__(daemon=True)
        self.gcs_address, self.ray_root = gcs_address, ray_root
        self.drivers: set[int] = set()
        self.peaks: dict[str, float] = defaultdict(float)
        self.store_peak = 0.0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.raylets: set[int] = set()  # this head's raylet: every Ray worker is its child

    def reset(self) -> dict[str, float]:
        with self.lock:
            peaks = {**self.peaks, "object store": self.store_peak}
            self.peaks, self.store_peak = defaultdict(float), 0.0
        return peaks

    def store_bytes(self, state) -> float:
        from ray._private.internal_api import get_memory_info_reply

        try:
            return float(get_memory_info_reply(state, timeout_seconds=5).store_stats.object_store_bytes_used)
        except Exception:  # the raylet is busy or restarting: skip this sample
            return 0.0

    def run(self) -> None:
        from ray._private.internal_api import get_state_from_address

        state = get_state_from_address(self.gcs_address)
        tick = 0
        while not self.done.wait(0.25):
            totals: dict[str, float] = defaultdict(float)
            peaks: dict[str, float] = {}
            for proc in psutil.process_iter(["name", "ppid", "cmdline"]):
                info = proc.info
                if proc.pid in self.drivers:
                    kind = "driver"
                else:
                    kind = kind_of(info["cmdline"] or [], info["ppid"], self.ray_root, self.raylets)
                    if kind == "ray system" and (info["name"] or "") == "raylet":
                        self.raylets.add(proc.pid)
                if kind is None:
                    continue
                try:
                    rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                totals[kind] += rss
                peaks[kind] = max(peaks.get(kind, 0.0), rss)
            store = self.store_bytes(state) if tick % 4 == 0 else 0.0
            tick += 1
            with self.lock:
                for kind, rss in peaks.items():
                    self.peaks[kind] = max(self.peaks[kind], rss)
                self.peaks["all processes"] = max(self.peaks["all processes"], sum(totals.values()))
                self.store_peak = max(self.store_peak, store)


class RayHead:
    """`ray start --head --block` on 127.0.0.1 in its own session, stopped by killing that session."""

    def __init__(self, cpus: int):
        self.root = tempfile.mkdtemp(prefix="rayfs-", dir="/tmp")  # short: unix socket paths are limited
        self.port, dashboard = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.proc = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--num-cpus={cpus}",
                f"--temp-dir={self.root}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.address = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while not list(Path(self.root).glob("session_*/sockets/raylet")):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the Ray head did not come up within 120 s")
            time.sleep(0.5)
        time.sleep(3)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for proc in psutil.process_iter():  # daemons the head started in their own sessions
            try:
                if any(self.root in part for part in proc.cmdline()):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass


def run_stage(name: str, argv: list[str], sampler: Sampler, env: dict[str, str], results: list) -> dict:
    """One `segpipe` command as the driver; its time and the peaks it caused. Fails loudly on exit != 0."""
    print(f"[fullsize] {name}: segpipe {' '.join(argv)}", flush=True)
    sampler.reset()
    started = time.perf_counter()
    proc = subprocess.Popen([SEGPIPE, *argv], env=env, cwd=REPO)
    sampler.drivers.add(proc.pid)
    code = proc.wait()
    seconds = time.perf_counter() - started
    time.sleep(0.5)
    peaks = sampler.reset()
    sampler.drivers.discard(proc.pid)
    if code != 0:
        raise SystemExit(f"[fullsize] {name} exited {code}")
    row = {"stage": name, "seconds": round(seconds, 1), **{k: round(v / GB, 2) for k, v in peaks.items()}}
    results.append(row)
    print(f"[fullsize] {name}: {seconds:.0f} s, peaks (GB) {row}", flush=True)
    return row


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=32, help="training images (default: 32)")
    parser.add_argument("--val", type=int, default=8, help="val images (default: 8)")
    parser.add_argument("--crf-images", type=int, default=4, help="images of the CRF search (default: 4)")
    parser.add_argument("--width", type=float, default=0.125, help="network width (default: 1/8)")
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--crf-grid", default="small", help="CRF search space (default: small, 12 + 6)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the Ray head")
    parser.add_argument("--skip-coco", action="store_true", help="leave out the COCO listing")
    parser.add_argument("--workdir", default="", help="keep the files here (default: a temporary folder)")
    parser.add_argument("--json-out", default="bench/out/fullsize.json")
    args = parser.parse_args()

    # Token authentication, as a cluster runs it: the head, every stage and the sampler share one token.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    swap_before = psutil.swap_memory().used
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segpipe-fullsize-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    head = RayHead(args.cpus)
    sampler = Sampler(head.address, head.root)
    sampler.start()
    env = {**os.environ, "RAY_ADDRESS": head.address, "PYTHONWARNINGS": "ignore"}
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    common = ["--tracking-uri", tracking]
    results: list[dict] = []
    started = time.perf_counter()
    try:
        src, prepared = work / "cityscapes", work / "prepared"
        run_stage(
            "synth",
            ["synth", "--layout", "cityscapes", "--out", str(src), "--num-train", str(args.train),
             "--num-val", str(args.val), "--size", *map(str, args.size)],
            sampler, env, results,
        )  # fmt: skip
        run_stage(
            "prepare",
            ["prepare", "--dataset", "cityscapes", "--root", str(src), "--out", str(prepared), "--no-progress"],
            sampler, env, results,
        )  # fmt: skip
        uris = []
        for arch in ("fcn8s", "deeplab_largefov"):
            out = work / f"train-{arch}.json"
            run_stage(
                f"train {arch}",
                ["train", "--config", f"pipelines/configs/{arch}_cityscapes.yaml", "--data", str(prepared),
                 "--model-arg", f"width={args.width}", "--epochs", "1", "--crop", "713", "--batch-size", "2",
                 "--num-workers", "2", "--cpus-per-worker", "0.5", "--lr", "1e-4",
                 "--storage", str(work / "ray_results"), "--run-name", f"fullsize-{arch}", *common,
                 "--json-out", str(out)],
                sampler, env, results,
            )  # fmt: skip
            uris.append(read_json(out)["model_uri"])
        evaluation = work / "evaluate.json"
        run_stage(
            "evaluate (slide 713, flip, 3 scales)",
            ["evaluate", "--model-uri", uris[0], "--data", str(prepared), "--slide", "713", "476", "--flip",
             "--tta", "0.75,1,1.25", *common, "--json-out", str(evaluation)],
            sampler, env, results,
        )  # fmt: skip
        ensemble = work / "ensemble.json"
        run_stage(
            f"ensemble of 2 + CRF search on {args.crf_images}",
            ["ensemble", "--candidates", *uris, "--data", str(prepared), "--crf", "--crf-images",
             str(args.crf_images), "--crf-grid", args.crf_grid, "--register-as", "fullsize",
             "--scratch", str(work / "scratch"), *common, "--json-out", str(ensemble)],
            sampler, env, results,
        )  # fmt: skip
        run_stage(
            "predict + CRF",
            ["predict", "--model-uri", read_json(ensemble)["model_uri"], "--input", f"{prepared}:val", "--out",
             str(work / "predicted"), "--crf", *common, "--json-out", str(work / "predict.json")],
            sampler, env, results,
        )  # fmt: skip
        if not args.skip_coco:
            run_stage_coco(sampler, env, work, results)
    finally:
        sampler.done.set()
        head.stop()
    swap_grew = psutil.swap_memory().used - swap_before
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / GB:.0f} GiB",
        "images": {
            "train": args.train,
            "val": args.val,
            "size": f"{args.size[1]}x{args.size[0]}",
            "crf_images": args.crf_images,
            "crf_grid": args.crf_grid,
        },
        "width": args.width,
        "stages": results,
        "wall_s": round(time.perf_counter() - started, 1),
        "swap_grew_mb": round(swap_grew / (1 << 20), 1),
    }
    print_table(summary)
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    if swap_grew > 64 << 20:
        raise SystemExit(f"[fullsize] swap use grew by {swap_grew / (1 << 20):.0f} MB: not within memory")


def run_stage_coco(sampler: Sampler, env: dict[str, str], work: Path, results: list) -> None:
    """bench/coco_listing.py in its own process (the driver of a COCO prepare lists the annotations)."""
    print("[fullsize] COCO listing: bench/coco_listing.py", flush=True)
    sampler.reset()
    out = work / "coco.json"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "coco_listing.py"), "--json-out", str(out)],
        env=env, cwd=REPO,
    )  # fmt: skip
    sampler.drivers.add(proc.pid)
    if proc.wait() != 0:
        raise SystemExit("[fullsize] COCO listing failed")
    peaks = sampler.reset()
    row = {
        "stage": "COCO listing (118k images)",
        "seconds": round(time.perf_counter() - started, 1),
        **{k: round(v / GB, 2) for k, v in peaks.items()},
        "listing": read_json(out),
    }
    results.append(row)


def print_table(summary: dict) -> None:
    sys.path.insert(0, str(REPO))
    from pipelines.report import format_table

    columns = [*KINDS, "object store"]
    rows = [
        [r["stage"], f"{r['seconds']:.0f}", *(f"{r[k]:.2f}" if r.get(k) else "-" for k in columns)]
        for r in summary["stages"]
    ]
    print(f"\nFull-size rehearsal on {summary['machine']} ({summary['images']}), peaks in GB:")
    print(format_table(["stage", "s", *columns], rows))
    print(f"total {summary['wall_s']:.0f} s; swap grew by {summary['swap_grew_mb']} MB")


if __name__ == "__main__":
    main()
