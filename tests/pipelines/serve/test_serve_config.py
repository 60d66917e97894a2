"""Serving stage configuration: app args and their checks, the token file, replicas sized from the nodes
(of the cluster `segpipe serve` joins, not the machine it runs on), the cluster's Serve config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.errors import UserError
from pipelines.preflight import Capacity
from pipelines.runtime import free_port
from pipelines.serve import ServeConfig, config_from_args
from pipelines.serve.config import ReplicaSizing, replica_sizing

REPO = Path(__file__).resolve().parents[3]


def test_app_args_are_typed_and_checked():
    cfg = config_from_args(
        {"model_uri": "models:/m@champion", "max_replicas": "4", "crf": "true", "max_body_mb": "2.5"}
    )
    assert (cfg.max_replicas, cfg.crf, cfg.max_body_mb) == (4, True, 2.5)
    # The same coercion as every other segpipe config (pipelines.config): on/off are booleans.
    assert config_from_args({"model_uri": "x", "crf": "on"}).crf is True
    assert config_from_args({"model_uri": "x", "crf": "off"}).crf is False
    with pytest.raises(UserError, match="crf: input should be a valid boolean"):
        config_from_args({"model_uri": "x", "crf": "maybe"})
    with pytest.raises(UserError, match="unknown serve app args"):
        config_from_args({"model_uri": "x", "max_replica": 3})
    with pytest.raises(UserError, match="max_replicas: input should be a valid integer"):
        config_from_args({"model_uri": "x", "max_replicas": "many"})


def test_a_token_file_must_hold_a_usable_token(tmp_path):
    with pytest.raises(UserError, match="cannot read it"):
        config_from_args({"model_uri": "x", "auth_token_file": str(tmp_path / "missing")})
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(UserError, match="at least 16 characters"):
        config_from_args({"model_uri": "x", "auth_token_file": str(tmp_path / "short")})
    (tmp_path / "good").write_text("  " + "a" * 32 + "\n")
    assert config_from_args({"model_uri": "x", "auth_token_file": str(tmp_path / "good")}).auth_token_file
    with pytest.raises(UserError, match="min-replicas"):
        ServeConfig(model_uri="x", min_replicas=3, max_replicas=2)


@pytest.mark.parametrize(
    "node_cpus, nodes, crf, replicas, threads, cpus",
    [
        (2, 1, False, 1, 2, 1.75),  # this machine: both cores, the ingress's quarter left free
        (2, 1, True, 1, 2, 0.75),  # ... and a whole CPU for one CRF replica
        (8, 1, False, 2, 3, 3.0),  # 6 of 8 cores: one in eight for the proxy and ingress, 7 -> 2 x 3
        (16, 3, False, 12, 3, 3.0),  # 14 -> 4 x 3 per node, on each of three nodes
        (64, 1, False, 14, 4, 4.0),
        (1, 1, False, 1, 1, 0.75),
    ],
)
def test_replicas_and_threads_are_sized_from_the_nodes(node_cpus, nodes, crf, replicas, threads, cpus):
    capacity = Capacity(cpus=node_cpus * nodes, gpus=0, node_cpus=node_cpus, node_gpus=0)
    sizing = replica_sizing(ServeConfig(model_uri="x", crf=crf), capacity)
    assert (sizing.replicas, sizing.threads, sizing.cpus) == (replicas, threads, cpus)
    assert sizing.replicas * sizing.threads <= nodes * node_cpus
    assert sizing.replicas // nodes * sizing.cpus + 0.25 + crf <= node_cpus  # all of a node's set fits on it
    # What the config sets is kept; GPU replicas: as many as the GPUs hold, one torch thread each.
    set_by_hand = ServeConfig(model_uri="x", max_replicas=3, member_cpus=0.5)
    assert replica_sizing(set_by_hand, capacity) == ReplicaSizing(replicas=3, threads=1, cpus=0.5)
    gpus = Capacity(cpus=16, gpus=2, node_cpus=16, node_gpus=2)
    assert replica_sizing(ServeConfig(model_uri="x", member_gpus=0.5), gpus) == ReplicaSizing(4, 1, 1.0)


JOINED_CAPACITY = """
import sys
from pipelines.serve import server

class Sized(Exception):
    pass

def build_app(cfg):
    raise Sized(server.capacity())

server.build_app = build_app  # stop where the replicas are sized, before Serve starts
try:
    server.start_server(server.ServeConfig(model_uri=sys.argv[1], port=int(sys.argv[2])))
except Sized as sized:
    print("node_cpus", sized.args[0].node_cpus)
"""


def test_serve_on_a_running_cluster_sizes_replicas_from_its_nodes(ray_session, tmp_path):
    """`segpipe serve` with $RAY_ADDRESS (`ray job submit`'s driver, on a head that reserves no CPUs)
    joins the cluster first: the replicas are sized from its nodes, not from the driver's machine."""
    import ray

    address = ray.get_runtime_context().gcs_address
    node_cpus = max(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"])
    done = subprocess.run(
        [sys.executable, "-c", JOINED_CAPACITY, str(tmp_path), str(free_port())],
        env={**os.environ, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"node_cpus {node_cpus}" in done.stdout, (done.stdout + done.stderr)[-3000:]
    assert node_cpus != os.cpu_count()  # the session's node is declared larger than this machine


def test_the_cluster_serve_config_args_are_accepted(tmp_path):
    config = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "pipelines.serve:app"
    args = dict(application["args"])
    # The token file is the mounted Secret on a cluster; here a file of the same kind stands in for it.
    assert args["auth_token_file"] == "/etc/segpipe/serve-token/token"
    with pytest.raises(UserError, match="--auth-token-file .* cannot read it"):
        config_from_args(args)
    (tmp_path / "token").write_text("s3cret-token-of-32-characters-xx\n")
    cfg = config_from_args({**args, "auth_token_file": str(tmp_path / "token")})
    assert cfg.model_uri == application["args"]["model_uri"]


def test_cli_refuses_a_missing_model_before_starting_serve(tmp_path, capsys):
    assert main(["serve", "--model-uri", str(tmp_path / "nowhere")]) == 2
    assert "has no model.json" in capsys.readouterr().err
