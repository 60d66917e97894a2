"""Preflight: requests the cluster cannot hold exit 2 in seconds; checkpoints default to durable storage;
trials stopped by the scheduler are recorded as KILLED whatever their dying worker reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from pipelines import preflight, tracking
from pipelines.errors import UserError
from pipelines.preflight import Capacity, check_shared_storage, check_training_resources, default_storage
from pipelines.train.tune import SearchConfig, _summarise

TWO_CPUS = Capacity(cpus=2, gpus=0, node_cpus=2, node_gpus=0)


def test_two_workers_on_two_cpus_name_the_numbers_and_the_fix():
    with pytest.raises(UserError) as err:
        check_training_resources(2, 1.0, False, capacity=TWO_CPUS)
    message = str(err.value)
    assert "2 worker(s) x 1 CPU + 1 CPU left for Ray Data = 3 CPUs" in message
    assert "has 2 CPU(s)" in message
    assert "--cpus-per-worker 0.5" in message and "--num-workers 1" in message
    check_training_resources(2, 0.5, False, capacity=TWO_CPUS)  # the named fix fits
    check_training_resources(1, 1.0, False, capacity=TWO_CPUS)


def test_gpus_nodes_and_autoscaling_limits():
    with pytest.raises(UserError, match="drop --use-gpu"):
        check_training_resources(1, 1.0, True, capacity=TWO_CPUS)
    gpu_nodes = Capacity(cpus=32, gpus=2, node_cpus=16, node_gpus=1)
    check_training_resources(2, 1.0, True, capacity=gpu_nodes)
    with pytest.raises(UserError, match="--num-workers 2"):
        check_training_resources(4, 1.0, True, capacity=gpu_nodes)
    with pytest.raises(UserError, match="largest node has 16"):
        check_training_resources(1, 20.0, False, capacity=gpu_nodes)
    scalable = Capacity(cpus=64, gpus=0, node_cpus=8, node_gpus=0, autoscaling=True)
    check_training_resources(8, 7.0, False, capacity=scalable)
    with pytest.raises(UserError, match="can scale to 64 CPU"):
        check_training_resources(16, 4.0, False, capacity=scalable)
    with pytest.raises(UserError, match=r"\+ 1 CPU for the trial driver"):
        check_training_resources(1, 1.0, False, extra_cpus=1.0, capacity=TWO_CPUS)


def test_capacity_reads_the_live_cluster(ray_session):
    cap = preflight.cluster_capacity()
    assert cap.cpus == ray_session.cluster_resources()["CPU"] and cap.node_cpus == cap.cpus
    with pytest.raises(UserError, match="Ray Data"):
        check_training_resources(int(cap.cpus), 1.0, False)


def test_oversubscribed_train_command_exits_2_in_seconds(prepared_voc, tmp_path):
    """The command a new user types on a small machine: one worker per core, 1 CPU each, nothing for Ray Data."""
    workers = os.cpu_count() or 2
    started = time.monotonic()
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pipelines.cli", "train", "--model", "unet", "--data", prepared_voc),
            *("--model-arg", "width=0.125", "--num-workers", str(workers), "--batch-size", "2"),
            *("--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(tmp_path / "ray")),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RAY_ADDRESS": ""},
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"= {workers + 1} CPUs" in proc.stderr and "--cpus-per-worker" in proc.stderr
    assert time.monotonic() - started < 120


def test_default_storage_is_durable_inside_a_ray_job(monkeypatch, tmp_path):
    for var in ("SEGPIPE_STORAGE", "RAY_STORAGE", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_storage() == str(tmp_path / "ray_results")
    job = {
        "runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"},
        "metadata": {"job_submission_id": "raysubmit_1"},
    }
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert preflight.job_submission_id() == "raysubmit_1"
    assert default_storage() == str(tmp_path / "home" / "ray_results")
    monkeypatch.setenv("RAY_STORAGE", "s3://cluster/ray")
    assert default_storage() == "s3://cluster/ray"
    monkeypatch.setenv("SEGPIPE_STORAGE", "s3://team/segpipe")
    assert default_storage() == "s3://team/segpipe"


def test_local_storage_on_several_nodes_must_be_shared(ray_session, monkeypatch, tmp_path):
    check_shared_storage(str(tmp_path))  # one node: nothing to prove
    check_shared_storage("s3://bucket/prefix")
    assert preflight.nodes_missing_path(str(tmp_path)) == []
    assert not list(tmp_path.glob(".segpipe-shared-*")), "the probe file must be removed"
    monkeypatch.setattr(preflight, "nodes_missing_path", lambda location: ["10.0.0.7"])
    with pytest.raises(UserError, match=r"10\.0\.0\.7 cannot see.*s3://bucket/prefix or a folder on NFS"):
        check_shared_storage(str(tmp_path))


def test_trials_stopped_by_the_scheduler_are_killed_whatever_their_worker_reported(tmp_path):
    client = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, _ = tracking.start_or_resume_run(client, "t", "search")

    def child(trial: str, status: str) -> str:
        run_id, _ = tracking.start_or_resume_run(client, "t", f"s-unet-{trial}", parent_run_id=parent)
        client.set_terminated(run_id, status=status)
        return run_id

    stopped, crashed, done = child("a", "FAILED"), child("b", "FAILED"), child("c", "FINISHED")
    grid = [
        SimpleNamespace(metrics={"trial_id": "a", "training_iteration": 1}, error=None),
        SimpleNamespace(metrics={"trial_id": "b", "training_iteration": 1}, error=RuntimeError("oom")),
        SimpleNamespace(metrics={"trial_id": "c", "training_iteration": 4}, error=None),
    ]
    search = SearchConfig(architectures={"unet": {}}, experiment="t")
    summary = _summarise(client, search, "s-unet", parent, grid)
    assert {t["trial_id"]: t["status"] for t in summary["trials"]} == {
        "a": "KILLED",
        "b": "FAILED",
        "c": "FINISHED",
    }
    assert MlflowClient(client.tracking_uri).get_run(stopped).info.status == "KILLED"
    assert client.get_run(crashed).info.status == "FAILED" and client.get_run(done).info.status == "FINISHED"
