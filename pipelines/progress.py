"""One progress line per long stage: prepare, evaluate, predict, ensemble scoring, the CRF search.

On a terminal the line is rewritten in place (done/total, percent, rate, ETA) a few times a second and
ends with a newline; anywhere else (a log file, `ray job logs`, CI) it is printed as a plain line about
every 10 %, so logs stay readable. It goes to stderr: stdout keeps the results.

Work counted in the driver calls `advance`; work counted in Ray tasks sends its counts to a `Counter`
actor that `follow` polls while the driver waits on a blocking call (prepare's shard writing).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

REDRAW_S = 0.25  # at most this often on a terminal
STEPS = 10  # plain lines per run when not on a terminal (every 10 %)


def duration(seconds: float) -> str:
    """`1:02:03` or `2:03`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`what: done/total unit (pct%), rate unit/s, ETA m:ss` for `total` units of work."""

    def __init__(self, what: str, total: int, unit: str = "images", stream: TextIO | None = None):
        self.what, self.total, self.unit = what, max(0, int(total)), unit
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.started = 0, time.monotonic()
        self.shown_step, self.shown_done, self.drawn_at, self.closed = 0, 0, 0.0, False
        self.lock = threading.Lock()

    def line(self) -> str:
        seconds = time.monotonic() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        text = f"{self.what}: {self.done}/{self.total} {self.unit}"
        if self.total:
            text += f" ({100 * self.done // self.total}%)"
        text += f", {rate:.1f} {self.unit}/s"
        if self.done >= self.total:
            return text + f", took {duration(seconds)}"
        eta = (self.total - self.done) / rate if rate > 0 else None
        return text + (f", ETA {duration(eta)}" if eta is not None else ", ETA ?")

    def advance(self, n: int = 1) -> None:
        with self.lock:
            self.done = min(self.total, self.done + int(n)) if self.total else self.done + int(n)
            self._show(final=False)

    def set(self, done: int) -> None:
        """The count so far, as a counter elsewhere reports it."""
        with self.lock:
            if done != self.done:
                self.done = min(self.total, int(done)) if self.total else int(done)
                self._show(final=False)

    def close(self) -> None:
        with self.lock:
            if not self.closed and self.total:
                self._show(final=True)
            self.closed = True

    def _show(self, final: bool) -> None:
        if not self.total:
            return
        if self.live:
            now = time.monotonic()
            if final or now - self.drawn_at >= REDRAW_S:
                self.stream.write("\r" + self.line() + "\x1b[K" + ("\n" if final else ""))
                self.stream.flush()
                self.drawn_at = now
            return
        step = STEPS * self.done // self.total
        if step > self.shown_step or (final and self.done != self.shown_done):  # and where it stopped
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.shown_step, self.shown_done = step, self.done

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def progress(what: str, total: int, unit: str = "images", enabled: bool = True) -> Iterator[Progress]:
    """A `Progress` closed at the end of the block (a disabled one counts but prints nothing)."""
    import io

    bar = Progress(what, total, unit, stream=None if enabled else io.StringIO())
    try:
        yield bar
    finally:
        bar.close()


class Counter:
    """A Ray actor the tasks of a stage add their finished units to (`counter.add.remote(n)`)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += int(n)

    def value(self) -> int:
        return self.count


def remote_counter():
    """A new `Counter` actor: no CPU, gone with its handle."""
    import ray

    return ray.remote(num_cpus=0)(Counter).remote()


@contextlib.contextmanager
def follow(bar: Progress, counter, every_s: float = 0.5) -> Iterator[None]:
    """Polls `counter` into `bar` from a thread while the block runs (a blocking Ray Data write)."""
    import ray

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a poll lost at shutdown is not an error
                bar.set(ray.get(counter.value.remote(), timeout=10))

    thread = threading.Thread(target=poll, name="segpipe-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        with contextlib.suppress(Exception):
            bar.set(ray.get(counter.value.remote(), timeout=10))
