"""Training stage: learning, MLflow records, resume, worker faults, bad input, a real tracking server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from pipelines.cli import main
from pipelines.errors import UserError
from pipelines.model_uri import fetched_model
from pipelines.runtime import free_port
from pipelines.train.trainer import resolve, train

pytestmark = pytest.mark.slow
EPOCH_METRICS = (
    "train_loss",
    "val_miou",
    "val_pixel_acc",
    "val_mean_acc",
    "val_fwiou",
    "images_per_s",
    "epoch_time_s",
)


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_tiny_model_learns_and_everything_is_logged(tiny_config, mlflow_uri, tmp_path, capfd):
    cfg = tiny_config(epochs=16, lr_policy="fixed", run_name="learn")
    result = train(cfg)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert steps(client, result.run_id, key) == list(range(16)), key
    assert any(k.startswith("val_iou_") for k in run.data.metrics)
    assert run.data.params["cfg.model"] == "unet"
    assert len(run.data.params["dataset_fingerprint"]) >= 16
    losses = [
        m.value for m in sorted(client.get_metric_history(result.run_id, "train_loss"), key=lambda m: m.step)
    ]
    mious = [
        m.value for m in sorted(client.get_metric_history(result.run_id, "val_miou"), key=lambda m: m.step)
    ]
    print(
        f"\nlearning curve: loss {[round(v, 3) for v in losses]}\n                val mIoU {[round(v, 3) for v in mious]}"
    )
    assert losses[-1] < losses[0]
    # 21 VOC classes: predicting only background scores 0.056 on this split; chance is lower still.
    assert result.metrics["val_miou"] > 0.10
    # The logged model is the best epoch's checkpoint, and the run says which one and what it scored.
    assert run.data.metrics["model_val_miou"] == pytest.approx(max(mious)) == result.metrics["val_miou"]
    assert mious[int(run.data.metrics["model_epoch"])] == pytest.approx(max(mious))

    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"overlays", "confusion_matrix.png"} <= names
    # An MLflow 3 LoggedModel of the run: a pyfunc model wrapping the segpipe folder (model.json + weights),
    # found by search_logged_models with the kept epoch's scores linked to it.
    (logged,) = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{result.run_id}' AND metrics.model_val_miou > 0",
    )
    assert logged.name == "model" and logged.status == LoggedModelStatus.READY
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["model_val_miou"] == pytest.approx(result.metrics["val_miou"])
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert "MLmodel" in files
    assert {a.path for a in client.list_logged_model_artifacts(logged.model_id, "artifacts/model")} == {
        "artifacts/model/model.json",
        "artifacts/model/member0.safetensors",
    }
    assert len(client.list_artifacts(result.run_id, "overlays")) == 2
    # MLflow system metrics while it trained, and the prepared dataset as the run's input.
    assert client.get_metric_history(result.run_id, "system/cpu_utilization_percentage")
    (dataset,) = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in dataset.tags}
    fingerprint = json.loads((Path(cfg.data) / "manifest.json").read_text())["fingerprint"]
    assert tags["segpipe.fingerprint"] == fingerprint and tags["mlflow.data.context"] == "training"
    assert json.loads(tags["segpipe.splits"]) == {"train": 64, "val": 12}
    assert dataset.dataset.name == "voc" and dataset.dataset.source_type == "local"

    from segmodels.artifact import load_model_dir

    with fetched_model(result.model_uri, mlflow_uri) as folder:
        model = load_model_dir(folder)
    assert model.spec.members[0].arch == "unet"
    assert model.spec.classes[0] == "background" and len(model.spec.classes) == 21
    assert Path(result.checkpoint).name.startswith("checkpoint_epoch_")

    # The same run name again with one more epoch: it resumes from the last checkpoint, trains that epoch,
    # and logs nothing twice. keep: final logs the last epoch's model (the papers' final snapshot),
    # whichever epoch scored best.
    capfd.readouterr()
    again = train(tiny_config(epochs=17, lr_policy="fixed", run_name="learn", keep="final"))
    assert "resuming learn from epoch 16 checkpoint" in capfd.readouterr().out
    assert again.run_id == result.run_id
    for key in ("train_loss", "val_miou"):
        assert steps(client, again.run_id, key) == list(range(17))
    assert Path(again.checkpoint).name == "checkpoint_epoch_0016"
    assert client.get_run(again.run_id).data.metrics["model_epoch"] == 16


def _train_worker_pids() -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline:
            pids.append(proc.pid)
    return pids


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """`mlflow server` on 127.0.0.1 (sqlite store, artifacts proxied into `folder`); yields its URI."""
    from pipelines.errors import UserError
    from pipelines.tracking import check_server

    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                check_server(uri)
                break
            except UserError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_killed_worker_restarts_from_checkpoint_logging_to_a_real_mlflow_server(tiny_config, tmp_path):
    """Two workers, one killed after the first checkpoint: the run restarts from it and finishes, every epoch
    logged once, through a real `mlflow server` (metrics over HTTP, the model proxied to its artifact store)."""
    with mlflow_server(tmp_path) as uri:
        cfg = tiny_config(
            epochs=4, run_name="fault", num_workers=2, batch_size=4, cpus_per_worker=0.5, tracking_uri=uri
        )
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=train(cfg)), daemon=True)
        thread.start()
        first_checkpoint = tmp_path / "ray" / "fault" / "checkpoint_epoch_0000"
        deadline = time.monotonic() + 300
        while not first_checkpoint.exists() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.2)
        assert first_checkpoint.exists(), "no checkpoint within 300 s"
        victims = _train_worker_pids()
        assert victims, "no Ray Train worker process found to kill"
        os.kill(victims[-1], signal.SIGKILL)
        thread.join(timeout=600)
        assert not thread.is_alive() and "result" in outcome
        client = MlflowClient(uri)
        run_id = outcome["result"].run_id
        assert client.get_run(run_id).info.status == "FINISHED"
        for key in ("train_loss", "val_miou"):
            assert steps(client, run_id, key) == [0, 1, 2, 3]
        assert any((tmp_path / "server-artifacts").rglob("member0.safetensors"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "segformer"], "unknown model 'segformer'"),
        (["--data", "{tmp}/nowhere"], "nowhere"),
        (["--data", "{tmp}"], "manifest"),
        (["--model-arg", "num_classes=5"], "disagrees with the dataset manifest (21 classes)"),
        (["--model-arg", "widht=0.5"], "cannot build deeplab_largefov"),
        (["--use-gpu"], "GPU"),
        (["--pretrained", "{tmp}/vgg16.pth"], "does not exist"),
        (["--storage", "/proc/segpipe-cannot-write"], "not writable"),
        (["--batch-size", "100"], "lower --batch-size"),
        (["--batch-size", "6", "--num-workers", "4"], "does not split into num_workers=4 x iter_size=1"),
        (["--max-iters", "10"], "epochs=1 and max_iters=10 disagree"),
    ],
)
def test_bad_input_fails_before_any_worker(args, message, prepared_voc, mlflow_uri, tmp_path, capsys):
    argv = [
        "train",
        "--model",
        "deeplab_largefov",
        "--data",
        prepared_voc,
        "--tracking-uri",
        mlflow_uri,
        "--storage",
        str(tmp_path / "ray"),
        "--model-arg",
        "width=0.125",
        "--crop",
        "64",
        "--epochs",
        "1",
    ]
    code = main(argv + [a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").rglob("checkpoint_*"))


def test_unreachable_tracking_server_is_a_clear_error(prepared_voc, tmp_path, capsys):
    port = free_port()
    code = main(
        [
            "train",
            "--model",
            "deeplab_largefov",
            "--data",
            prepared_voc,
            "--tracking-uri",
            f"http://127.0.0.1:{port}",
            "--storage",
            str(tmp_path / "ray"),
        ]
    )
    assert code == 2
    assert "does not answer" in capsys.readouterr().err


MULTINODE = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from pipelines.config import TrainConfig
from pipelines.train.trainer import train

cfg = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
cluster.add_node(num_cpus=3)
ray.init(address=cluster.address)
cluster.wait_for_nodes()
result = train(TrainConfig(**cfg))
print("RESULT", json.dumps({"result": result.to_json(), "nodes": len(ray.nodes())}))
ray.shutdown()
cluster.shutdown()
"""


def test_two_workers_on_two_nodes(tiny_config, tmp_path, mlflow_uri):
    """A 2-node ray.cluster_utils.Cluster (in its own process) with 3 CPUs per node and 2 CPUs per worker:
    two workers cannot share a node, so DDP (gloo) runs across both; the spare CPU feeds Ray Data."""
    cfg = tiny_config(epochs=1, run_name="multinode", num_workers=2, batch_size=4, cpus_per_worker=2.0)
    proc = subprocess.run(
        [sys.executable, "-c", MULTINODE, json.dumps(cfg.to_dict())],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(line.removeprefix("RESULT "))
    assert payload["nodes"] == 2
    client = MlflowClient(mlflow_uri)
    run = client.get_run(payload["result"]["run_id"])
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "val_miou") == [0]


def test_split_options_name_the_prepared_splits(tiny_config):
    """train_split / val_split choose the prepared splits (voc_aug: train_aug/val, sbd_train/seg11valid); a
    split the dataset lacks fails before any worker starts, naming the option."""
    with pytest.raises(UserError, match=r"has no 'train_aug' split \(has train, val\): set train_split"):
        resolve(tiny_config(train_split="train_aug"))
    with pytest.raises(UserError, match=r"has no 'seg11valid' split \(has train, val\): set val_split"):
        resolve(tiny_config(val_split="seg11valid"))


def test_a_relative_data_path_reaches_the_workers_absolute(tiny_config, prepared_voc, monkeypatch):
    """Ray Train workers run in Ray's working directory: `--data prepared/x` is resolved in the driver."""
    from pipelines.train.trainer import resolve

    prepared = Path(prepared_voc)
    monkeypatch.chdir(prepared.parent)
    resolved, _, _ = resolve(tiny_config(data=prepared.name))
    assert resolved.data == str(prepared.resolve())
