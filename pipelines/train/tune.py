"""Search stage: Ray Tune over the training stage, one search space per architecture, ASHA early stopping.

Each trial is a whole `pipelines.train.trainer.train` run (Ray Train workers, checkpoints, MLflow run nested under
one parent run); Ray Train's `TuneReportCallback` forwards every epoch's metrics to Tune so ASHA can stop
weak trials at its rungs. Every candidate configuration is validated (keys, distributions, model
arguments, dataset) before the first trial starts. Re-running the same search with the same storage
restores the unfinished Tuner instead of starting over.

Search file (flat per architecture):

    data: ./data/prepared
    name: voc-search           # Tune experiment and MLflow parent run name
    experiment: segpipe-voc    # MLflow experiment
    num_samples: 4             # trials per architecture
    architectures:
      pspnet:
        base: {epochs: 20, model_args: {backbone: resnet50}}   # TrainConfig values fixed for every trial
        space:                                                 # TrainConfig values sampled per trial
          lr: {loguniform: [0.001, 0.02]}
          weight_decay: {choice: [0.0001, 0.0005]}
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.config import TrainConfig, config_model, make_config, read_yaml
from pipelines.errors import UserError
from pipelines.runtime import tune_verbosity

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "grid")


@config_model
class SearchConfig:
    """A `segpipe tune` file: where the data is, how to search, and the per-architecture spaces."""

    architectures: dict[str, Any]
    data: str = ""
    name: str = "search"
    experiment: str = "segpipe"
    tracking_uri: str = ""
    storage: str = ""
    metric: str = "val_miou"
    num_samples: int = 4
    max_concurrent: int = 1
    scheduler: str = "asha"  # asha | none
    grace_period: int = 1
    reduction_factor: int = 2
    # What the trial driver itself holds; its Ray Train workers hold their own CPUs/GPUs. The driver only
    # waits on them, so no CPU by default (a CPU held here would starve Ray Data on a small machine); Ray
    # Tune refuses an empty request, hence the memory it does use.
    trial_cpus: float = 0.0
    trial_memory_mb: int = 256
    # CPUs per Ray Train worker of every trial, over each architecture's base (0: keep the base's / 1.0).
    cpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.scheduler not in ("asha", "none"):
            raise UserError(f"scheduler={self.scheduler!r}: choose asha or none")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise UserError("num_samples and max_concurrent must be >= 1")
        if self.cpus_per_worker < 0:
            raise UserError(f"cpus_per_worker={self.cpus_per_worker}: need > 0 (or 0 to keep each base's)")
        if self.trial_cpus < 0 or self.trial_memory_mb < 1:
            raise UserError(
                f"trial_cpus={self.trial_cpus}, trial_memory_mb={self.trial_memory_mb}: need "
                "trial_cpus >= 0 and trial_memory_mb >= 1"
            )
        if not isinstance(self.architectures, dict) or not self.architectures:
            raise UserError("`architectures` must map at least one model name to {base: ..., space: ...}")


@dataclass(frozen=True)
class ArchSearch:
    arch: str
    base: dict[str, Any]
    space: dict[str, dict[str, Any]] = field(default_factory=dict)


def _check_distribution(arch: str, key: str, spec: Any) -> None:
    where = f"architectures.{arch}.space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise UserError(
            f"{where}: expected one of {{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}}, got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise UserError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    if kind in ("loguniform", "uniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, int | float) for a in args) or not args[0] < args[1]:
            raise UserError(f"{where}.{kind}: expected [low, high] with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise UserError(f"{where}.loguniform: bounds must be > 0, got {args!r}")


def parse_search(values: dict[str, Any], source: str) -> tuple[SearchConfig, list[ArchSearch]]:
    """Validate a search file completely: unknown keys, distributions, and every architecture's base."""
    import segmodels

    search = make_config(SearchConfig, values, source=source)
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    archs = []
    for arch, body in search.architectures.items():
        if arch not in segmodels.MODELS:
            raise UserError(
                f"{source}: unknown architecture {arch!r}; choose from {', '.join(segmodels.MODELS)}"
            )
        body = body or {}
        extra = set(body) - {"base", "space"}
        if extra:
            raise UserError(
                f"{source}: architectures.{arch} has unknown key(s) {sorted(extra)}; use base and space"
            )
        base, space = dict(body.get("base") or {}), dict(body.get("space") or {})
        for key in [*base, *space]:
            if key in ("model", "data", "run_name", "parent_run_id"):
                raise UserError(
                    f"{source}: architectures.{arch}.{key} is set by `segpipe tune` itself; remove it"
                )
            if key not in train_keys:
                make_config(
                    TrainConfig, {key: 0}, source=f"{source}: architectures.{arch}"
                )  # raises, with a hint
        for key, spec in space.items():
            _check_distribution(arch, key, spec)
        archs.append(ArchSearch(arch=arch, base=base, space=space))
    return search, archs


def _tune_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        out[key] = {
            "loguniform": lambda a: tune.loguniform(*a),
            "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(a[0], a[1] + 1),
            "choice": tune.choice,
            "grid": tune.grid_search,
        }[kind](args)
    return out


def _first_sample(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A deterministic point of the space (lower bound / first choice), to validate before any trial."""
    return {k: next(iter(s.values()))[0] for k, s in space.items()}


def trial_config(
    search: SearchConfig,
    a: ArchSearch,
    sample: dict[str, Any],
    run_name: str,
    parent_run_id: str,
    storage: str,
) -> TrainConfig:
    values = {
        **a.base,
        **({"cpus_per_worker": search.cpus_per_worker} if search.cpus_per_worker else {}),
        **sample,
        "model": a.arch,
        "data": search.data,
        "run_name": run_name,
        "experiment": search.experiment,
        "tracking_uri": search.tracking_uri,
        "storage": storage,
        "parent_run_id": parent_run_id,
    }
    return make_config(TrainConfig, values, source=f"architectures.{a.arch}")


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one full training run, its epochs reported to Tune by Ray Train."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train.trainer import train

    trial_id = ray.tune.get_context().get_trial_id()
    sample = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = make_config(
        TrainConfig,
        {**config["_base"], **sample, "run_name": f"{config['_prefix']}-{trial_id}"},
        source="trial",
    )
    train(cfg, callbacks=[TuneReportCallback()])


def _tuner(
    search: SearchConfig, a: ArchSearch, *, epochs: int, parent_run_id: str, storage: str, tune_name: str
):
    """`epochs`: a trial's epochs (resolved: a max_iters base gives them only with the split's size)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = FIFOScheduler()
    if search.scheduler == "asha":
        # max_t one past the last epoch: ASHA stops any trial that reaches max_t the moment it reports, which
        # would kill a finished trial before it logs its model and closes its MLflow run.
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=epochs + 1,
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
        )
    base = trial_config(search, a, {}, "", parent_run_id, str(Path(storage) / "train")).to_dict()
    base = {k: v for k, v in base.items() if k not in a.space and k != "run_name"}
    trainable = tune.with_resources(
        run_trial, {"CPU": search.trial_cpus, "memory": search.trial_memory_mb * 2**20}
    )
    path = str(Path(storage) / tune_name)
    if tune.Tuner.can_restore(path):
        print(f"[segpipe] restoring search {tune_name} from {path}")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True)
    return tune.Tuner(
        trainable,
        param_space={**_tune_space(a.space), "_base": base, "_prefix": tune_name},
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode="max",
            scheduler=scheduler,
            num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent,
        ),
        run_config=tune.RunConfig(name=tune_name, storage_path=storage, verbose=tune_verbosity()),
    )


def _summarise(client, search: SearchConfig, tune_name: str, parent_id: str, grid) -> dict[str, Any]:
    """Every trial's MLflow run with Tune's iteration count; best = the finished trial with the top metric."""
    exp_id = tracking.experiment_id(client, search.experiment)
    tune_view = {r.metrics["trial_id"]: r for r in grid if r.metrics and "trial_id" in r.metrics}
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    trials, best = [], None
    for run in runs:
        name = run.info.run_name or ""
        if not name.startswith(f"{tune_name}-"):
            continue
        trial_id = name.removeprefix(f"{tune_name}-")
        result = tune_view.get(trial_id)
        status = run.info.status
        # Tune's view decides: a trial that did not finish and ended without an error of its own was stopped
        # by the scheduler (ASHA), whatever its dying Ray Train worker made `train` record (FAILED) on the way.
        stopped = status == "RUNNING" or (
            status != "FINISHED" and result is not None and result.error is None
        )
        if stopped:
            client.set_tag(run.info.run_id, "segpipe.early_stopped", "true")
            client.set_terminated(run.info.run_id, status="KILLED")
            status = "KILLED"
        entry = {
            "trial_id": trial_id,
            "run_id": run.info.run_id,
            "status": status,
            "iterations": int(result.metrics.get("training_iteration", 0)) if result else 0,
            # The score of the model the trial logged (its best epoch); the last epoch's for older runs.
            search.metric: run.data.metrics.get(
                f"model_{search.metric}", run.data.metrics.get(search.metric)
            ),
            "params": {
                k.removeprefix("cfg."): v
                for k, v in run.data.params.items()
                if k.removeprefix("cfg.")
                in search.architectures.get(run.data.tags.get("segpipe.model"), {}).get("space", {})
            },
        }
        if status == "FINISHED" and entry[search.metric] is not None:
            entry["model_uri"] = f"runs:/{run.info.run_id}/{tracking.MODEL_ARTIFACT_PATH}"
            if best is None or entry[search.metric] > best[search.metric]:
                best = entry
        trials.append(entry)
    return {"best": best, "trials": sorted(trials, key=lambda t: t["trial_id"])}


def tune_search(
    search: SearchConfig, archs: list[ArchSearch], parent_run_id: str | None = None
) -> dict[str, Any]:
    """Run (or resume) every architecture's search; returns the best trial and model URI per architecture.

    `parent_run_id`: nest the search's own MLflow run under this one (set by `segpipe retrain`).
    """
    from pipelines.preflight import check_shared_storage, check_training_resources, default_storage
    from pipelines.runtime import ensure_ray
    from pipelines.train.trainer import check_storage, resolve

    if not search.data:
        raise UserError("the search file needs `data:` (a prepared dataset folder or s3:// prefix)")
    storage = check_storage(search.storage or default_storage())
    # Every architecture's config, sampled at a corner, must resolve before any trial runs.
    corners = [
        resolve(trial_config(search, a, _first_sample(a.space), "validate", "", storage))[0] for a in archs
    ]
    uri = tracking.resolve_tracking_uri(search.tracking_uri)
    search = dataclasses.replace(search, tracking_uri=uri)
    ensure_ray()
    for cfg in corners:  # one trial at a time must fit, or every trial would wait forever
        check_training_resources(
            cfg.num_workers,
            cfg.cpus_per_worker,
            cfg.use_gpu,
            what=f"each {cfg.model} trial",
            extra_cpus=search.trial_cpus,
        )
    check_shared_storage(storage)
    client = tracking.connect(uri)
    # Tune state already in this storage means this search ran before: continue its MLflow run too, even
    # if that finished, so restored trials stay nested under the same parent.
    from ray import tune

    restorable = any(tune.Tuner.can_restore(str(Path(storage) / f"{search.name}-{a.arch}")) for a in archs)
    parent_id, resumed = tracking.start_or_resume_run(
        client,
        search.experiment,
        search.name,
        tags={"segpipe.stage": "tune"},
        parent_run_id=parent_run_id,
        reuse_finished=restorable,
    )
    print(f"[segpipe] {'resuming' if resumed else 'starting'} search {search.name} (MLflow run {parent_id})")
    tracking.log_params(
        client,
        parent_id,
        {
            "num_samples": search.num_samples,
            "scheduler": search.scheduler,
            "architectures": ",".join(a.arch for a in archs),
        },
    )
    summary: dict[str, Any] = {"parent_run_id": parent_id, "architectures": {}}
    try:
        for a, corner in zip(archs, corners, strict=True):
            started = time.perf_counter()
            tune_name = f"{search.name}-{a.arch}"
            tuner = _tuner(
                search, a, epochs=corner.epochs, parent_run_id=parent_id, storage=storage, tune_name=tune_name
            )
            grid = tuner.fit()
            arch_summary = _summarise(client, search, tune_name, parent_id, grid)
            arch_summary["seconds"] = time.perf_counter() - started
            summary["architectures"][a.arch] = arch_summary
            if arch_summary["best"]:
                client.log_metric(
                    parent_id, f"best_{search.metric}_{a.arch}", arch_summary["best"][search.metric]
                )
        client.log_dict(parent_id, summary, "search_summary.json")
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")
    return summary


def load_search(path: str, **overrides: Any) -> tuple[SearchConfig, list[ArchSearch]]:
    values = read_yaml(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return parse_search(values, source=str(path))
