"""The progress line (live on a terminal, every 10 % elsewhere) and the terminal's filter of Ray's chatter.
The stages' own lines are checked where they run: predict on a pseudo-terminal (tests/pipelines/inference),
the demo's whole terminal (tests/pipelines/jobs/test_retrain.py)."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import textwrap

from pipelines.progress import Progress, duration
from pipelines.terminal import NOISE


def read_all(fd: int) -> str:
    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        out += os.read(fd, 65536)
    return out.decode()


def test_a_terminal_gets_one_line_redrawn_in_place():
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = Progress("predict", 40, stream=tty)
        for _ in range(40):
            bar.advance()
        bar.close()
        drawn = read_all(master)
    os.close(master)
    assert bar.live
    # Redrawn with a carriage return (at most every 0.25 s), ended by one newline with the totals.
    assert drawn.count("\n") == 1 and drawn.endswith("\n")
    assert drawn.startswith("\rpredict: ") and "\rpredict: 40/40 images (100%), " in drawn
    assert "took 0:00" in drawn


def test_a_log_gets_a_plain_line_about_every_ten_percent():
    out = io.StringIO()
    with Progress("CRF search, 19 settings", 1000, "images", stream=out) as bar:
        for _ in range(100):
            bar.advance(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("CRF search, 19 settings: 100/1000 images (10%), ") and "ETA " in lines[0]
    assert lines[-1].startswith("CRF search, 19 settings: 1000/1000 images (100%)")
    stopped = io.StringIO()
    with Progress("evaluate val", 50, stream=stopped) as bar:  # stopped short: where it stopped is logged
        bar.advance(12)
        bar.advance(3)
    lines = stopped.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "evaluate val: 12/50 images (24%)",
        "evaluate val: 15/50 images (30%)",
    ]
    assert duration(3725) == "1:02:05" and duration(65) == "1:05"


def test_rays_chatter_is_recognised_and_nothing_else():
    noise = [
        "[2026-12-03 05:16:13,335 E 15579 15579] core_worker.cc:2465: Actor with class name: "
        "'MapWorker(MapBatches(Segmenter))' and ID: '4a9e' has constructor arguments in the object store",
        "\x1b[36m(pid=gcs_server)\x1b[0m [2026-12-03 05:16:49,371 E 15580 15580] (gcs_server) "
        "gcs_actor_scheduler.cc:538: Failed to kill actor 23e6, return status: Invalid",
        "(raylet) [2026-12-03 05:16:49,371 E 15580 15580] (raylet) node_manager.cc:1234: graceful_shutdown failed",
        "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite retries",
        "\x1b[36m(ServeController pid=4242)\x1b[0m WARNING 2026-12-03 05:16:49,371 controller 4242 -- "
        "Cannot deregister autoscaling state",
        "WARNING 2026-12-03 05:41:47,737 controller 9765 -- Cannot deregister autoscaling state for deployment",
        "2026-12-03 05:40:31,577\tWARNING placement_group_cleaner.py:120 -- Detected that the Ray Train "
        "controller actor (68a8) is dead. Cleaning up placement group",
    ]
    kept = [
        "segpipe predict: error: --input 'x' is neither a folder ...",
        "predict: 4/4 images (100%), 3.1 images/s, took 0:01",
        "(SegmentationModel pid=12) Traceback (most recent call last):",
        "\x1b[36m(RayTrainWorker pid=77)\x1b[0m [segpipe] epoch 2/6 loss 0.41 val mIoU 0.38",
        "[2026-12-03 05:16:13,335 F 1 1] core_worker.cc:1: a fatal error stays visible",
        "2026-12-03 05:31:30,198\tWARNING resource_manager.py:818 -- Cluster resources are not enough to run "
        "any task from TaskPoolMapOperator[ReadParquet]. The job may hang forever",
    ]
    assert all(NOISE.match(line) for line in noise)
    assert not any(NOISE.match(line) for line in kept)


def test_the_filter_passes_everything_else_through_at_once(tmp_path):
    """A `segpipe`-like process: Ray-style records written straight to fd 2 (as C++ does) are left out
    (and logged), its own lines and a progress line without a newline come through unchanged."""
    script = textwrap.dedent(
        """
        import os, sys
        from pipelines.terminal import filter_output, noise_log
        filter_output()
        os.write(2, b"[2026-12-03 05:16:13,335 E 1 1] core_worker.cc:2465: has constructor arguments\\n")
        print("segpipe demo: error: something the user must see", file=sys.stderr)
        sys.stderr.write("\\rprepare: 3/8 samples (37%)")
        sys.stderr.write("\\rprepare: 8/8 samples (100%)\\n")
        os.write(1, b"\\x1b[33m(raylet)\\x1b[0m Task ServeController.graceful_shutdown failed.\\n")
        print(noise_log())
        """
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (  # bytes: a text-mode pipe would turn the \r into newlines
        b"segpipe demo: error: something the user must see\n\rprepare: 3/8 samples (37%)"
        b"\rprepare: 8/8 samples (100%)\n"
    )
    log = open(proc.stdout.decode().strip()).read()
    assert "core_worker.cc:2465" in log and "graceful_shutdown" in log
