"""One retrain cycle at a time per retrain name: a lease object beside the cycles' state.

    <state>/lease.json = {"owner", "cycle", "started", "heartbeat", "host", "pid", "nonce"}   (local or s3://)

Taking the lease is an atomic create (a local file opened with O_EXCL; on S3 a conditional put,
`If-None-Match: *`), so of two cycles started together exactly one proceeds; the other stops within seconds
naming the running cycle. The holder rewrites the heartbeat every `heartbeat_s` (on S3 only while the object
is still the one it wrote: `If-Match` on its ETag). A lease whose heartbeat is older than `stale_after_s`
belongs to a cycle that died without releasing it (a killed pod, a lost node): the next cycle takes it over,
again atomically (a rename of the local file; on S3 a put conditional on the stale object's ETag), and says
so. A lease whose holder ran on this host and whose process is gone (a stopped Ray job's driver, SIGKILLed
before it could release it) is taken over the same way at once, without waiting for it to go stale.
SIGTERM (a stopped Ray job, a deleted pod) releases the lease before the process ends when it can.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipelines import storage
from pipelines.errors import UserError

LEASE_NAME = "lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats


class LeaseHeld(UserError):
    """Another cycle of the same retrain holds the lease."""


def ray_job_id() -> str:
    """The submission id of the Ray job this driver runs as (`ray job submit` puts it in the driver's job
    config), or ''."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except json.JSONDecodeError:
        return ""
    return str((config.get("metadata") or {}).get("job_submission_id") or "")


def owner_name() -> str:
    job = ray_job_id()
    return f"{socket.gethostname()}:{os.getpid()}" + (f" (Ray job {job})" if job else "")


def holder_gone(lease: dict) -> bool:
    """True when the lease's process ran on this host and no longer exists."""
    pid = lease.get("pid")
    if lease.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------ the two stores: atomic create, read, replace
class LocalStore:
    def __init__(self, uri: str):
        self.path = storage.fs_path(uri)

    def create(self, body: dict) -> Any:
        """Write `body` if no lease exists; its version token, or None when one exists."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
        return body["nonce"]

    def read(self) -> tuple[dict | None, Any]:
        try:
            with open(self.path) as f:
                body = json.load(f)
        except FileNotFoundError:
            return None, None
        except json.JSONDecodeError:  # a lease being written this instant: read it as a live one
            return {"owner": "?", "cycle": "?", "started": time.time(), "heartbeat": time.time()}, None
        return body, body.get("nonce")

    def replace(self, body: dict, token: Any) -> Any:
        """Overwrite the lease if it is still version `token`; the new token, or None if it changed."""
        current, current_token = self.read()
        if current is None or current_token != token:
            return None
        temporary = f"{self.path}.{uuid.uuid4().hex}"
        with open(temporary, "w") as f:
            json.dump(body, f)
        os.replace(temporary, self.path)
        return body["nonce"]

    def take_over(self, body: dict, token: Any) -> Any:
        """Replace the stale lease of version `token`: the rename lets exactly one of several contenders
        win; a lease renamed that is not the stale one (taken over meanwhile) is put back."""
        moved = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return None
        try:
            with open(moved) as f:
                renamed = json.load(f).get("nonce")
        except json.JSONDecodeError:
            renamed = None
        if renamed != token:
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
            os.remove(moved)
            return None
        os.remove(moved)
        return self.create(body)

    def delete(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


class S3Store:
    def __init__(self, uri: str):
        import boto3

        self.bucket, _, self.key = storage.fs_path(uri).partition("/")
        self.client = boto3.client("s3")

    def _put(self, body: dict, **condition: str) -> Any:
        from botocore.exceptions import ClientError

        try:
            reply = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=json.dumps(body).encode(), **condition
            )
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "NoSuchKey"):
                return None
            raise
        return reply["ETag"]

    def create(self, body: dict) -> Any:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> tuple[dict | None, Any]:
        from botocore.exceptions import ClientError

        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        return json.loads(reply["Body"].read()), reply["ETag"]

    def replace(self, body: dict, token: Any) -> Any:
        return self._put(body, IfMatch=token)

    def take_over(self, body: dict, token: Any) -> Any:
        return self._put(body, IfMatch=token)

    def delete(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


# ------------------------------------------------------------------ the lease
@dataclass
class Lease:
    """`with Lease(uri, retrain, cycle):` holds the retrain's lease for the block, heartbeating."""

    uri: str  # the lease object: <state folder>/lease.json
    retrain: str  # the retrain's name, for messages
    cycle: str
    heartbeat_s: float = HEARTBEAT_S
    stale_after_s: float = STALE_AFTER_S
    owner: str = field(default_factory=owner_name)
    took_over: dict | None = None  # the stale lease this one replaced
    _token: Any = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _previous_sigterm: Any = None

    def __post_init__(self) -> None:
        self.store = S3Store(self.uri) if storage.is_s3(self.uri) else LocalStore(self.uri)

    def body(self, started: float) -> dict:
        now = time.time()
        return {"owner": self.owner, "cycle": self.cycle, "started": started, "heartbeat": now,
                "host": socket.gethostname(), "pid": os.getpid(), "nonce": uuid.uuid4().hex}  # fmt: skip

    def acquire(self) -> None:
        """Take the lease, or take over a stale one; LeaseHeld names the running cycle."""
        self.started = time.time()
        for _ in range(3):  # a lease released or replaced between two calls: look again
            self._token = self.store.create(self.body(self.started))
            if self._token is not None:
                return
            current, token = self.store.read()
            if current is None:
                continue
            age = time.time() - float(current.get("heartbeat", 0))
            gone = holder_gone(current)
            if age < self.stale_after_s and not gone:
                raise LeaseHeld(
                    f"retrain {self.retrain!r} is already running: cycle {current.get('cycle')} by "
                    f"{current.get('owner')}, started {when(float(current.get('started', 0)))}, last heartbeat "
                    f"{age:.0f} s ago ({self.uri}). Wait for it to finish; a cycle that died without releasing "
                    f"the lease is taken over once its heartbeat is {self.stale_after_s:.0f} s old"
                )
            self._token = self.store.take_over(self.body(self.started), token)
            if self._token is not None:
                self.took_over = current
                why = (
                    f"its process (pid {current.get('pid')} on this host) is gone"
                    if gone
                    else f"no heartbeat for {age:.0f} s (over {self.stale_after_s:.0f} s)"
                )
                print(
                    f"[segpipe] took over the lease of cycle {current.get('cycle')} by {current.get('owner')}: {why}"
                )
                return
        raise LeaseHeld(f"retrain {self.retrain!r}: the lease {self.uri} keeps changing hands; try again")

    def beat(self) -> bool:
        """Rewrite the heartbeat; False when the lease is no longer this cycle's."""
        token = self.store.replace(self.body(self.started), self._token)
        if token is None:
            return False
        self._token = token
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.beat():
                    print(
                        f"[segpipe] warning: the lease {self.uri} was taken over by another cycle", flush=True
                    )
                    return
            except Exception as err:  # a storage hiccup: try again at the next beat
                print(f"[segpipe] warning: heartbeat of {self.uri} failed: {err}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current, token = self.store.read()
        if current is not None and token == self._token:
            self.store.delete()

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="segpipe-lease", daemon=True)
        self._thread.start()
        if threading.current_thread() is threading.main_thread():
            # A stopped Ray job or a deleted pod gets SIGTERM, then SIGKILL seconds later: leave cleanly.
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._exit_on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self.release()

    def _exit_on_sigterm(self, signum, frame) -> None:
        """Release first (Ray's job stop SIGKILLs 3 s after its SIGTERM), then unwind the cycle."""
        try:
            self.release()
        except Exception as err:  # the next cycle takes it over as gone or stale
            print(f"[segpipe] warning: could not release {self.uri}: {err}", flush=True)
        raise SystemExit(128 + signum)
