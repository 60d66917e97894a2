"""The retraining loop as one job: promotion, idempotence, no-promotion, `ray job submit`, stop and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import tracking
from pipelines.data.synth import FOLDER_CLASSES
from pipelines.jobs.lease import Lease
from pipelines.jobs.retrain import load_retrain, retrain
from pipelines.runtime import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
UNET = {
    "model_args": {"width": 0.125, "padding": "same"},
    "optimizer": "adamw",
    "lr_policy": "fixed",
    "crop": 64,
    "batch_size": 4,
    "epochs": 2,
    "scale_min": 0.75,
    "scale_max": 1.25,
    "num_overlays": 1,
}


@pytest.fixture(scope="module")
def voc_source(tmp_path_factory) -> Path:
    from pipelines.data.synth import SynthConfig, synthesize

    return synthesize(
        SynthConfig(
            layout="voc", out=str(tmp_path_factory.mktemp("retrain") / "voc"), num_train=32, num_val=8, seed=5
        )
    )


def retrain_file(folder: Path, voc_root: Path, **overrides) -> Path:
    body = {
        "name": "t",
        "source": {"dataset": "voc", "root": str(voc_root)},
        "prepared": str(folder / "prepared"),
        "storage": str(folder / "ray"),
        "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        "experiment": "retrain",
        "register_as": "retrained",
        "search": {"num_samples": 1, "scheduler": "none", "architectures": {"unet": {"base": UNET}}},
        **overrides,
    }
    path = folder / f"retrain-{len(list(folder.glob('retrain-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def training_runs(uri: str) -> int:
    client = tracking.connect(uri)
    exp = client.get_experiment_by_name("retrain")
    return len(client.search_runs([exp.experiment_id], filter_string="tags.`segpipe.stage` = 'train'"))


def test_ray_job_stopped_mid_cycle_resumes_then_idempotent_and_one_cycle_at_a_time(
    voc_source, tmp_path, ray_session, monkeypatch, capfd
):
    """`ray start --head` on 127.0.0.1 (token auth) and `ray job submit --working-dir`: the first job is
    stopped once its tune step is recorded (the driver killed mid-ensemble, as a preempted scheduled job);
    the same command submitted again continues from the finished steps, trains nothing, and promotes.
    Then, on this machine: the finished cycle run again does nothing, and a `segpipe retrain` started while
    another cycle of the same name holds the lease exits within seconds naming it (one cycle per name).

    The retrain file names no storage: inside a job the checkpoints and the step state must default to
    the user's ~/ray_results (HOME is a folder of this test), not to the job's temporary working_dir package.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    bin_dir = Path(sys.executable).parent
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_ADDRESS": "",
        "HOME": str(home),
    }
    for var in ("SEGPIPE_STORAGE", "RAY_STORAGE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    # The head and the Jobs CLI read the token from ~/.ray/auth_token: make one in this HOME.
    subprocess.run(
        [str(bin_dir / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True
    )
    token = (home / ".ray" / "auth_token").read_text().strip()
    gcs, dashboard, agent_http, agent_grpc, metrics = (free_port() for _ in range(5))
    temp = Path("/tmp") / f"rayjob-{os.getpid()}"  # short: Ray's unix socket paths have a length limit
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=3",
            f"--temp-dir={temp}",
            # Free ports for the node's job agent: the defaults may be held by the test session's own Ray.
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while (
            subprocess.run(
                [str(bin_dir / "ray"), "job", "list", "--address", address], env=env, capture_output=True
            ).returncode
            != 0
        ):
            assert time.monotonic() < deadline and head.poll() is None, "Ray head did not come up"
            time.sleep(1)
        config = retrain_file(tmp_path, voc_source, storage="")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        out = tmp_path / "job.json"
        runtime_env = {
            "working_dir": str(REPO),
            "excludes": [".venv", ".git", "demo", "mlruns", "ray_results", "*.egg-info"],
        }

        def submit(*options: str) -> subprocess.CompletedProcess:
            cmd = [
                str(bin_dir / "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--runtime-env-json",
                json.dumps(runtime_env),
                *options,
                "--",
                "python",
                "-m",
                "pipelines.cli",
                "retrain",
                "--config",
                str(config),
                "--json-out",
                str(out),
            ]
            # The Jobs API answers before the head's job agent has registered ("No available agent").
            for _ in range(30):
                job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                if "No available agent" not in job.stderr:
                    return job
                time.sleep(2)
            return job

        first = submit("--no-wait", "--submission-id", "retrain-stopped")
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        jobs = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        durable = home / "ray_results"
        deadline, state = time.monotonic() + 600, None
        while time.monotonic() < deadline:
            found = list((durable / "retrain-t").glob("*/state.json"))
            if found and "tune" in json.loads(found[0].read_text())["steps"]:
                state = found[0]
                break
            status = jobs.get_job_status("retrain-stopped")
            assert not status.is_terminal(), f"{status}: {jobs.get_job_logs('retrain-stopped')[-3000:]}"
            time.sleep(0.2)
        assert state is not None, "the job never finished its tune step"
        holder = json.loads((durable / "retrain-t" / "lease.json").read_text())["owner"]
        assert holder.endswith("(Ray job retrain-stopped)"), holder
        jobs.stop_job("retrain-stopped")
        while not jobs.get_job_status("retrain-stopped").is_terminal():
            assert time.monotonic() < deadline, "the stopped job never stopped"
            time.sleep(0.5)
        assert jobs.get_job_status("retrain-stopped") == JobStatus.STOPPED
        assert "promote" not in json.loads(state.read_text())["steps"]
        runs = training_runs(uri)

        job = submit()
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
        assert "step prepare: already done" in job.stdout and "step tune: already done" in job.stdout
        assert training_runs(uri) == runs  # nothing retrained
        result = json.loads(out.read_text())
        assert result["promoted"] and set(result["steps"]) == {"prepare", "tune", "ensemble", "promote"}
        client = tracking.connect(uri)
        assert tracking.alias_version(client, "retrained", "champion") == result["champion_version"] == "1"
        assert (durable / "retrain-t").is_dir(), sorted(p.name for p in home.rglob("*"))[:20]
        assert any(durable.rglob("checkpoint_epoch_*")), "no checkpoint under ~/ray_results"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    prepared = result["steps"]["prepare"]["output"]
    assert not prepared["skipped"] and prepared["quarantined"] == 0
    manifest = json.loads((Path(load_retrain(str(config)).prepared) / "manifest.json").read_text())
    assert prepared["rows"] == {split: info["rows"] for split, info in manifest["splits"].items()}
    assert all(prepared["rows"].values())
    parent = client.get_run(result["run_id"])
    assert parent.data.tags["segpipe.decision"] == "promoted"
    assert {f"step_{s}_s" for s in ("prepare", "tune", "ensemble", "promote")} <= set(parent.data.metrics)

    # The same cycle again, on this machine, with the job's storage: nothing is redone.
    monkeypatch.setenv("SEGPIPE_STORAGE", str(durable))
    capfd.readouterr()
    again = retrain(load_retrain(str(config)))
    assert again["cycle"] == result["cycle"] and again["champion_version"] == "1"
    assert training_runs(uri) == runs
    assert "step tune: already done in this cycle, skipped" in capfd.readouterr().out

    lease = durable / "retrain-t" / "lease.json"
    assert not lease.exists()  # each cycle released it at its end

    # A second `segpipe retrain` of the same name while a cycle holds the lease (as a second scheduled job
    # would): it stops within seconds, exit 2, naming the running cycle, and leaves that lease alone.
    started = time.monotonic()
    with Lease(str(lease), "t", "cycle-elsewhere", owner="node-9:99"):
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "retrain", "--config", str(config)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env={**os.environ, "RAY_ADDRESS": "", "SEGPIPE_STORAGE": str(durable)},
        )  # fmt: skip
        assert json.loads(lease.read_text())["owner"] == "node-9:99"
    assert (
        proc.returncode == 2 and "'t' is already running: cycle cycle-elsewhere by node-9:99" in proc.stderr
    )
    assert time.monotonic() - started < 30, proc.stderr
    assert not lease.exists()
    # (A challenger that does not beat the champion by the margin: tests/pipelines/select/test_selection.py.)


def test_bad_retrain_file_fails_before_any_work(voc_source, tmp_path):
    from pipelines.errors import UserError

    with pytest.raises(UserError, match="did you mean 'margin'"):
        load_retrain(str(retrain_file(tmp_path, voc_source, margni=0.1)))
    with pytest.raises(UserError, match="search.data is set by retrain"):
        load_retrain(
            str(retrain_file(tmp_path, voc_source, search={"data": "x", "architectures": {"unet": {}}}))
        )
    bad_source = retrain_file(tmp_path, voc_source, source={"dataset": "voc", "root": str(tmp_path / "none")})
    with pytest.raises(UserError, match="empty or missing"):
        retrain(load_retrain(str(bad_source)))
    assert not (tmp_path / "prepared").exists()


def test_demo_runs_the_whole_mission(tmp_path):
    """`segpipe demo` end to end (fewer epochs than `make demo`): a team's own data (images/, masks/,
    classes.yaml) through every stage, real HTTP at the end, its own class names in every answer; the
    terminal shows segpipe's lines and progress lines, none of Ray's warnings or errors."""
    port = free_port()
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "demo",
            "--workdir",
            str(tmp_path / "demo"),
            "--epochs",
            "2",
            "--trials",
            "1",
            "--num-train",
            "8",
            "--num-val",
            "4",
            "--port",
            str(port),
            "--json-out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in (
        "Endpoint:  http://127.0.0.1",
        "MLflow UI: mlflow ui",
        "Overlays:  open ",
        "Promotion: no champion yet",
        "Champion:  models:/segpipe-demo@champion (version 1): val mIoU ",
    ):
        assert text in proc.stdout
    summary = json.loads(out.read_text())
    assert f"val mIoU {summary['champion_miou']:.3f} (target >= 0.5: " in proc.stdout
    assert summary["champion_miou"] == summary["retrain"]["steps"]["promote"]["output"]["challenger"]["miou"]
    # The terminal: progress lines, no Ray chatter (its token notice, core_worker.cc records, Tune's boxes,
    # forwarded warnings of Ray's own actors, shutdown records).
    for line in ("prepare: 12/12 samples (100%), ", "candidates on val: 4/4 images (100%), ",
                 "CRF search, 13 settings: ", "evaluate val: 4/4 images (100%), "):  # fmt: skip
        assert line in proc.stderr, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    for chatter in ("Token authentication", ".cc:", "Configuration for experiment", "View detailed results",
                    "WARNING", "Cannot deregister", "PlacementGroupCleaner", "Progress bars"):  # fmt: skip
        assert chatter not in terminal, terminal[-3000:]
    assert len(summary["answers"]) == 4 and all(a["classes_present"] for a in summary["answers"])
    assert {c for a in summary["answers"] for c in a["classes_present"]} <= set(FOLDER_CLASSES)
    assert len(list(Path(summary["overlays"]).glob("*-overlay.jpg"))) == 4
    # The registered champion carries the folder's classes and colours: model.json and the pyfunc metadata.
    import mlflow

    # Explicit URIs (no process-wide mlflow.set_tracking_uri / registry URI that other tests would inherit).
    uri = f"sqlite:///{tmp_path / 'demo' / 'mlruns' / 'mlflow.db'}"
    version = tracking.model_version(tracking.connect(uri), summary["retrain"]["champion"])
    model = mlflow.artifacts.download_artifacts(
        artifact_uri=version.source, dst_path=str(tmp_path / "champion"), tracking_uri=uri
    )
    metadata = yaml.safe_load((Path(model) / "MLmodel").read_text())["metadata"]
    colours = yaml.safe_load((tmp_path / "demo" / "folder" / "classes.yaml").read_text())["classes"]
    assert metadata["segpipe.classes"] == list(FOLDER_CLASSES)
    assert metadata["segpipe.palette"] == [c["color"] for c in colours]


def test_demo_refuses_bad_sizes_before_any_work(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["demo", "--workdir", str(tmp_path / "d"), "--num-val", "2"]) == 2
    assert "at least 8 training images (two batches) and 4 val images" in capsys.readouterr().err
    assert main(["demo", "--workdir", str(tmp_path / "d"), "--epochs", "0"]) == 2
    assert not (tmp_path / "d").exists()
