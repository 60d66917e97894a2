"""One retrain cycle at a time: the lease on a local folder and on S3 (moto), taken, refused, heartbeated,
taken over when stale, released."""

from __future__ import annotations

import json
import time

import pytest

from pipelines import storage
from pipelines.jobs.lease import Lease, LeaseHeld


@pytest.fixture(params=["local", "s3"])
def lease_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "retrain-nightly" / "lease.json")
    bucket = request.getfixturevalue("s3")
    return f"{bucket}/retrain-nightly/lease.json"


def test_one_holder_a_clear_refusal_and_release(lease_uri):
    first = Lease(lease_uri, "nightly", "cycle-a", owner="node-1:11")
    first.acquire()
    second = Lease(lease_uri, "nightly", "cycle-b", owner="node-2:22")
    started = time.perf_counter()
    with pytest.raises(
        LeaseHeld, match=r"'nightly' is already running: cycle cycle-a by node-1:11, started 20"
    ):
        second.acquire()
    assert time.perf_counter() - started < 5
    held = json.loads(storage.read_text(lease_uri))
    assert held["owner"] == "node-1:11" and held["heartbeat"] >= held["started"]
    assert first.beat() and json.loads(storage.read_text(lease_uri))["heartbeat"] >= held["heartbeat"]
    second.release()  # not its lease: left alone
    assert storage.exists(lease_uri)
    first.release()
    assert not storage.exists(lease_uri)
    with Lease(lease_uri, "nightly", "cycle-b", owner="node-2:22", heartbeat_s=0.05) as lease:
        time.sleep(0.3)  # the heartbeat thread keeps it fresh
        # Read it as the lease does (one GET on S3): a reader that HEADs then GETs may meet two versions.
        assert time.time() - lease.store.read()[0]["heartbeat"] < 1
        assert lease.took_over is None
    assert not storage.exists(lease_uri)


def test_a_stale_lease_is_taken_over_and_its_holder_notices(lease_uri, capsys):
    crashed = Lease(lease_uri, "nightly", "cycle-a", owner="node-1:11")
    crashed.acquire()
    stale = {**json.loads(storage.read_text(lease_uri)), "heartbeat": time.time() - 3600}
    storage.write_text(lease_uri, json.dumps(stale))  # its heartbeat stopped an hour ago
    crashed._token = crashed.store.read()[1]
    taker = Lease(lease_uri, "nightly", "cycle-b", owner="node-2:22", stale_after_s=600)
    taker.acquire()
    assert taker.took_over["cycle"] == "cycle-a"
    assert (
        "took over the lease of cycle cycle-a by node-1:11: no heartbeat for 3600 s"
        in capsys.readouterr().out
    )
    assert json.loads(storage.read_text(lease_uri))["owner"] == "node-2:22"
    assert not crashed.beat()  # the old holder, if it was only paused, learns it lost the lease
    crashed.release()
    assert json.loads(storage.read_text(lease_uri))["owner"] == "node-2:22"
    taker.release()


def test_a_lease_whose_process_on_this_host_is_gone_is_taken_over_at_once(lease_uri, capsys):
    """A stopped Ray job's driver SIGKILLed before it released its lease: the heartbeat is fresh, but its
    process is gone from this host, so the next cycle need not wait for it to go stale."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = Lease(lease_uri, "nightly", "cycle-a", owner="job-driver")
    killed.acquire()
    storage.write_text(lease_uri, json.dumps({**json.loads(storage.read_text(lease_uri)), "pid": dead.pid}))
    elsewhere = {**json.loads(storage.read_text(lease_uri)), "host": "another-node"}
    taker = Lease(lease_uri, "nightly", "cycle-b", owner="next-driver")
    taker.acquire()
    assert taker.took_over["cycle"] == "cycle-a"
    assert f"its process (pid {dead.pid} on this host) is gone" in capsys.readouterr().out
    taker.release()
    # The same pid on another host says nothing about that process: refused while its heartbeat is fresh.
    storage.write_text(lease_uri, json.dumps(elsewhere))
    with pytest.raises(LeaseHeld, match="cycle cycle-a by job-driver"):
        Lease(lease_uri, "nightly", "cycle-b", owner="next-driver").acquire()


def test_sigterm_releases_the_lease_before_the_process_unwinds(tmp_path):
    """A stopped Ray job gets SIGTERM, then SIGKILL 3 s later: the lease goes first, then the cycle unwinds."""
    import signal
    import subprocess
    import sys

    uri = tmp_path / "lease.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipelines.jobs.lease import Lease\n"
         f"with Lease({str(uri)!r}, 'nightly', 'cycle-a'):\n    try:\n        print('held', flush=True)\n"
         "        time.sleep(60)\n    finally:\n        time.sleep(30)  # a slow unwind\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held" and uri.exists()
    holder.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while uri.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not uri.exists() and holder.poll() is None  # released while the process still unwinds
    holder.kill()
    holder.wait()
