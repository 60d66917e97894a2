"""Retraining stage: prepare -> tune -> ensemble -> promote, as one resumable, idempotent job.

A *cycle* is one pass over one version of the source data with one config: its id hashes the source
listing (paths and sizes) and the config. Each finished step's output is written to
`<state>/<cycle>/state.json`, so re-running after a crash continues from the first unfinished step (the
tune step itself resumes its Tuner), and re-running a finished cycle does nothing new. Prepare is skipped
when the source fingerprint matches the prepared dataset's. One MLflow parent run records every step,
its timing and the promotion decision; a serving app that follows `models:/NAME@champion` picks up the
new champion by itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Literal

from pipelines import storage, tracking
from pipelines.config import config_model, make_config, read_yaml
from pipelines.errors import UserError
from pipelines.jobs.lease import LEASE_NAME, Lease
from pipelines.jobs.state import StepState

STEPS = ("prepare", "tune", "ensemble", "promote")


@config_model
class SourceConfig:
    dataset: str
    root: str
    splits: str = "train,val"
    max_side: int = 0
    max_bad_fraction: float = 0.01
    classes: str = ""  # dataset folder: the classes file (default: the one in root)


@config_model
class RetrainConfig:
    """A `segpipe retrain` file (see cluster/retrain-*.yaml)."""

    name: str
    source: SourceConfig
    prepared: str  # where prepared shards go (folder or s3:// prefix)
    search: dict[str, Any]  # a `segpipe tune` file's body, without `data`
    register_as: str
    experiment: str = "segpipe"
    tracking_uri: str = ""
    storage: str = ""  # Ray Train/Tune checkpoints and step state; default: preflight.default_storage()
    state: str = ""  # step state; default <storage>/retrain-<name>
    margin: float = 0.0
    crf: bool = False
    crf_images: int = 100  # CRF search on this many val images (DeepLab's 100-image subset); 0 = all
    crf_grid: Literal["deeplab", "small"] = "deeplab"  # the CRF search space (crf_search.CRF_GRIDS)
    max_members: int = 5
    split: str = "val"


def load_retrain(path: str, **overrides: Any) -> RetrainConfig:
    """Read and fully validate a retrain file (source, search spaces) before any work starts."""
    from pipelines.train.tune import parse_search

    values = read_yaml(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = make_config(RetrainConfig, values, source=str(path))
    if "data" in cfg.search:
        raise UserError(f"{path}: search.data is set by retrain from `prepared`; remove it")
    parse_search({**cfg.search, "data": cfg.prepared}, source=f"{path}: search")
    return cfg


def source_fingerprint(root: str) -> str:
    """Hash of the source listing (relative path and size of every file): cheap, and changes with new data."""
    files = storage.list_files(root)
    if not files:
        raise UserError(f"source root {root} is empty or missing; check source.root in the retrain file")
    digest = hashlib.sha256()
    base = storage.fs_path(root)
    for path, size in sorted(files.items()):
        digest.update(f"{path.removeprefix(base)}\0{size}\n".encode())
    return digest.hexdigest()


def _prepare_step(cfg: RetrainConfig, fingerprint: str) -> dict[str, Any]:
    from pipelines.data.dataset import Manifest
    from pipelines.data.prepare import PrepareConfig, prepare

    src = cfg.source
    manifest_uri = storage.join(cfg.prepared, "manifest.json")
    marker = storage.join(cfg.prepared, "source_fingerprint.txt")
    if (
        storage.exists(manifest_uri)
        and storage.exists(marker)
        and storage.read_text(marker).strip() == fingerprint
    ):
        manifest = Manifest.load(manifest_uri)
        print(f"[segpipe] prepare skipped: source unchanged (fingerprint {fingerprint[:12]})")
        return {"skipped": True, "fingerprint": manifest.fingerprint}
    result = prepare(
        PrepareConfig(
            dataset=src.dataset,
            root=src.root,
            out=cfg.prepared,
            splits=tuple(src.splits.split(",")),
            max_side=src.max_side or None,
            max_bad_fraction=src.max_bad_fraction,
            classes=src.classes,
        )
    )
    storage.write_text(marker, fingerprint + "\n")
    rows = {split: summary.rows for split, summary in result.splits.items()}
    return {
        "skipped": False,
        "fingerprint": result.fingerprint,
        "rows": rows,
        "quarantined": result.quarantined,
    }


def _tune_step(cfg: RetrainConfig, cycle: str, parent_id: str) -> dict[str, Any]:
    from pipelines.train.tune import parse_search, tune_search

    body = {
        "experiment": cfg.experiment,
        "storage": cfg.storage,
        **cfg.search,
        "data": cfg.prepared,
        "tracking_uri": cfg.tracking_uri,
        "name": f"{cfg.name}-{cycle[:8]}",
    }
    search, archs = parse_search(body, source="search")
    summary = tune_search(search, archs, parent_run_id=parent_id)
    best = {a: s["best"]["model_uri"] for a, s in summary["architectures"].items() if s["best"]}
    if not best:
        raise RuntimeError("no trial of any architecture finished; see the tune run in MLflow")
    return {"best": best}


def retrain(cfg: RetrainConfig) -> dict[str, Any]:
    """Run (or resume) the cycle for the current source data; returns every step's output and the decision."""
    from pipelines.preflight import default_storage
    from pipelines.train.trainer import check_storage

    fingerprint = source_fingerprint(cfg.source.root)
    config_hash = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()
    cycle = hashlib.sha256(f"{fingerprint}{config_hash}".encode()).hexdigest()[:16]
    storage_uri = check_storage(cfg.storage or default_storage())
    cfg = dataclasses.replace(
        cfg, storage=storage_uri, tracking_uri=tracking.resolve_tracking_uri(cfg.tracking_uri)
    )
    base = cfg.state or storage.join(storage_uri, f"retrain-{cfg.name}")
    with Lease(storage.join(base, LEASE_NAME), cfg.name, cycle):  # one cycle of this retrain at a time
        return run_cycle(cfg, cycle, fingerprint, StepState(storage.join(base, cycle, "state.json")))


def run_cycle(cfg: RetrainConfig, cycle: str, fingerprint: str, state: StepState) -> dict[str, Any]:
    """The cycle's steps (those not yet recorded in `state`), under its MLflow parent run."""
    from pipelines.select.ensemble import EnsembleConfig, build_ensemble
    from pipelines.select.promote import PromoteConfig, promote

    tracking.check_server(cfg.tracking_uri)
    client = tracking.connect(cfg.tracking_uri)
    parent_id, resumed = tracking.start_or_resume_run(
        client,
        cfg.experiment,
        f"retrain-{cfg.name}-{cycle[:8]}",
        tags={"segpipe.stage": "retrain", "segpipe.cycle": cycle},
    )
    print(
        f"[segpipe] retrain {cfg.name} cycle {cycle} ({'resumed' if resumed else 'new'}; MLflow run {parent_id})"
    )
    tracking.log_params(
        client,
        parent_id,
        {
            "source_fingerprint": fingerprint,
            "register_as": cfg.register_as,
            "margin": cfg.margin,
            "prepared": cfg.prepared,
        },
    )
    runners = {
        "prepare": lambda: _prepare_step(cfg, fingerprint),
        "tune": lambda: _tune_step(cfg, cycle, parent_id),
        "ensemble": lambda: build_ensemble(
            EnsembleConfig(
                candidates=tuple(state.done("tune")["output"]["best"].values()),
                data=cfg.prepared,
                register_as=cfg.register_as,
                crf=cfg.crf,
                crf_images=cfg.crf_images,
                crf_grid=cfg.crf_grid,
                split=cfg.split,
                max_members=cfg.max_members,
                scratch=storage.join(cfg.storage, f"retrain-{cfg.name}", cycle, "ensemble"),
                tracking_uri=cfg.tracking_uri,
                experiment=cfg.experiment,
            )
        ),
        "promote": lambda: promote(
            PromoteConfig(
                name=cfg.register_as,
                data=cfg.prepared,
                margin=cfg.margin,
                split=cfg.split,
                tracking_uri=cfg.tracking_uri,
            )
        ),
    }
    try:
        for step in STEPS:
            if state.done(step):
                print(f"[segpipe] step {step}: already done in this cycle, skipped")
                continue
            started = time.perf_counter()
            print(f"[segpipe] step {step} ...", flush=True)
            output = runners[step]()
            seconds = time.perf_counter() - started
            state.record(step, output, seconds)
            client.log_metric(parent_id, f"step_{step}_s", seconds)
            client.log_dict(parent_id, output, f"steps/{step}.json")
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    decision = state.done("promote")["output"]
    client.set_tag(parent_id, "segpipe.decision", "promoted" if decision["promoted"] else "kept champion")
    client.set_terminated(parent_id, status="FINISHED")
    return {
        "cycle": cycle,
        "run_id": parent_id,
        "source_fingerprint": fingerprint,
        "steps": state.data["steps"],
        "promoted": decision["promoted"],
        "reason": decision["reason"],
        "champion": f"models:/{cfg.register_as}@champion",
        "champion_version": decision["champion_version"],
    }
