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
