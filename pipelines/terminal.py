"""What reaches the terminal of a `segpipe` command: its own lines, not Ray's internal chatter.

Ray's Python loggers are quieted where they are configured (`pipelines.runtime`), but some of what Ray
prints cannot be reached that way: its C++ core logs every ERROR-level record to the process's stderr as
well as to its log file (`core_worker.cc ... has constructor arguments in the object store`, a known
false alarm of Ray Data's actor pools, ray-project/ray#57733), and the workers' and Ray's own processes'
stderr is forwarded to the driver (`(pid=gcs_server) ... Failed to kill actor` at shutdown, the Serve
controller's and Ray Train's placement-group cleaner's notices about their own bookkeeping).

`filter_output()` makes file descriptors 1 and 2 pipes that threads copy to the real stdout and stderr,
leaving out the lines `NOISE` matches; those are appended to `noise_log()` instead, so nothing is lost.
`segpipe --verbose` does not install it. Everything else passes through unchanged and at once (progress
lines included); `sys.stdout` and `sys.stderr` still report whether the real ones are terminals.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import sys
import tempfile
import threading

_ANSI = r"(?:\x1b\[[0-9;]*m)?"
# Where a forwarded line comes from, when Ray labels it: "(pid=gcs_server)", "(ServeController pid=123)".
_SOURCE = rf"{_ANSI}\((?:pid=\w+|raylet|gcs_server|[\w.]+ pid=\d+(?:, ip=[\d.]+)?)\){_ANSI} "
# Ray's C++ log records below FATAL: "[2026-12-03 05:16:13,335 E 15579 15579] core_worker.cc:2465: ...".
_CPP_RECORD = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [IWE] \d+ \d+\] (?:\(\w+\) )?[\w./-]+\.(?:cc|h):\d+: "
# Notices of Ray's own bookkeeping that need no action (the work itself is unaffected):
_BOOKKEEPING = "|".join(
    (
        # Ray Train freeing the placement group of a run that finished or that Tune stopped early.
        r"placement_group_cleaner\.py:\d+ -- Detected that the Ray Train controller actor",
        # Serve's controller tidying up a deployment it already removed, at shutdown.
        r"controller \d+ -- Cannot deregister autoscaling state",
        # Serve's shutdown retrying the controller's last call after stopping it.
        r"Task ServeController\.graceful_shutdown failed",
    )
)
NOISE = re.compile(rf"^(?:{_SOURCE})?(?:{_CPP_RECORD}|.*(?:{_BOOKKEEPING}))")

_installed: dict = {}


def noise_log() -> str:
    """Where the left-out lines go (one file per user, appended)."""
    return os.path.join(tempfile.gettempdir(), f"segpipe-ray-stderr-{os.getuid()}.log")


class _Stream(io.TextIOWrapper):
    """`sys.stdout` / `sys.stderr` on a filtered fd that still says whether the real one is a terminal."""

    def __init__(self, fd: int, terminal: bool):
        super().__init__(io.FileIO(fd, "w", closefd=False), line_buffering=True, errors="backslashreplace")
        self._terminal = terminal

    def isatty(self) -> bool:
        return self._terminal


def _copy(read_fd: int, out_fd: int, log) -> None:
    """Copies `read_fd` to `out_fd` line by line, noise to `log`; a partial line that cannot be a Ray
    record (a progress line redrawn with \\r) is passed on at once."""
    pending = b""
    while chunk := os.read(read_fd, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            if NOISE.match(text):
                log.write(text + "\n")
                log.flush()
            else:
                os.write(out_fd, line + b"\n")
        if pending and not pending.lstrip(b"\r").startswith((b"[", b"(", b"\x1b", b"W", b"2")):
            os.write(out_fd, pending)
            pending = b""
    if pending:
        os.write(out_fd, pending)


def filter_output() -> None:
    """Install the filter on this process's stdout and stderr (once); undone at exit, after Ray's own
    shutdown. Ray relays its processes' lines to either."""
    if _installed:
        return
    log = open(noise_log(), "a", encoding="utf-8")  # noqa: SIM115 (open for the life of the process)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        stream.flush()
        terminal = os.isatty(fd)
        real = os.dup(fd)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, fd)
        os.close(write_fd)
        thread = threading.Thread(
            target=_copy, args=(read_fd, real, log), name=f"segpipe-{name}", daemon=True
        )
        thread.start()
        _installed[fd] = (name, real, thread, stream)
        setattr(sys, name, _Stream(fd, terminal))
    atexit.register(_restore)  # registered before ray.init, so it runs after Ray's atexit shutdown


def _restore() -> None:
    """Give the fds back to the real stdout and stderr and let the threads pass on what is left."""
    for fd, (name, real, thread, stream) in list(_installed.items()):
        try:
            getattr(sys, name).flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, fd)  # the pipe's last writer (this fd) closes: the thread reads to its end
        thread.join(timeout=2)
        setattr(sys, name, stream)
    _installed.clear()
