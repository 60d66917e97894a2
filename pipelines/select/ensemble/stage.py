"""Ensemble stage: score candidates on the cluster, select greedily, tune a CRF, register the result.

The steps each stand alone: `scoring` writes the candidates' probabilities as shards, `selection` runs
Caruana et al.'s greedy selection as passes over them, `crf_search` tunes the optional dense CRF (kept only
if it helps) and `registration` writes the flattened model folder, registered as a new version with alias
`challenger`. The driver holds shard names and C x C matrices, never images or probability maps.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from pipelines import storage, tracking
from pipelines.errors import UserError


@dataclass(frozen=True)
class EnsembleConfig:
    candidates: tuple[str, ...]
    data: str
    register_as: str = ""
    crf: bool = False
    split: str = "val"
    max_members: int = 5  # selection rounds
    select: str = "greedy"  # greedy (Caruana et al.) | average (every candidate, equal weights: EDeconvNet)
    max_images: int = 0  # 0 = the whole split
    crf_images: int = 100  # CRF search on the first N images (DeepLab cross-validates on 100); 0 = all
    crf_grid: str = "deeplab"  # the search space: crf_search.CRF_GRIDS
    stride: int = 8  # selection grid: every stride-th pixel (the networks' output stride)
    images_per_shard: int = 8
    scratch: str = ""  # folder or s3:// prefix for the shards; default a local temporary folder
    tracking_uri: str = ""
    experiment: str = "segpipe"
    metric: str = "val_miou"
    parent_run_id: str = ""  # set by `segpipe reproduce`: the ensemble run is one of its stages

    def __post_init__(self) -> None:
        if self.stride < 1 or self.images_per_shard < 1 or self.max_members < 1 or self.crf_images < 0:
            raise UserError(
                "--stride, --max-members and images per shard must be >= 1 and --crf-images >= 0, got "
                f"{self.stride}, {self.max_members}, {self.images_per_shard}, {self.crf_images}"
            )
        from pipelines.select.ensemble.crf_search import crf_grid

        crf_grid(self.crf_grid)  # a UserError naming the valid grids
        if self.select not in ("greedy", "average"):
            raise UserError(f"--select {self.select!r}: choose greedy or average")


def best_per_arch(client, experiment: str, metric: str = "val_miou") -> list[str]:
    """Model URIs of the best finished training run of each architecture in `experiment`."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(
            f"no MLflow experiment {experiment!r} in {client.tracking_uri}; run `segpipe tune` first"
        )
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`segpipe.stage` = 'train' and attributes.status = 'FINISHED'",
        order_by=[f"metrics.{metric} DESC"],
    )
    best: dict[str, Any] = {}
    for run in runs:
        arch = run.data.tags.get("segpipe.model")
        if arch and arch not in best and metric in run.data.metrics:
            best[arch] = run
    if not best:
        raise UserError(f"experiment {experiment!r} has no finished training run with {metric}")
    return [f"runs:/{r.info.run_id}/{tracking.MODEL_ARTIFACT_PATH}" for r in best.values()]


def expand_candidates(cfg: EnsembleConfig, client) -> list[str]:
    uris: list[str] = []
    for c in cfg.candidates:
        if c.startswith("best-per-arch:"):
            uris += best_per_arch(client, c.removeprefix("best-per-arch:"), cfg.metric)
        else:
            uris.append(c)
    if not uris:
        raise UserError("no candidates: pass model URIs or best-per-arch:EXPERIMENT")
    return list(dict.fromkeys(uris))


def check_candidates(uris: list[str], specs, data, source: str) -> None:
    for uri, spec in zip(uris, specs, strict=True):
        if list(spec.classes) != list(data.classes):
            raise UserError(
                f"candidate {uri} predicts other classes than {source}; use models of this dataset"
            )


@dataclass(frozen=True)
class Chosen:
    """What scoring, selection and the CRF search decided, before anything is registered."""

    selection: Any  # selection.Selection: chosen candidates, weights, confusion, per-member mIoU
    crf: Any  # crf_search.CRFSearch, or None
    images: int  # images scored
    seconds: float


def build_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Score, select, (optionally) add a tuned CRF, then register the ensemble; returns the JSON result."""
    from contextlib import ExitStack

    from pipelines.data.dataset import open_prepared
    from pipelines.inference.evaluate import metrics_json
    from pipelines.model_uri import fetched_model
    from pipelines.select.ensemble.registration import flatten_members, register_ensemble
    from pipelines.select.ensemble.selection import confusion_scores
    from segmodels.artifact import read_spec

    data = open_prepared(cfg.data)
    if cfg.split not in data.manifest.splits:
        raise UserError(f"{cfg.data} has no split {cfg.split!r}; it has {', '.join(data.splits)}")
    client = tracking.connect(cfg.tracking_uri)
    uris = expand_candidates(cfg, client)
    with ExitStack() as downloads:  # every downloaded candidate is removed when the block ends
        folders = [downloads.enter_context(fetched_model(u, cfg.tracking_uri)) for u in uris]
        specs = [read_spec(f) for f in folders]
        check_candidates(uris, specs, data, cfg.data)
        chosen = choose_members(cfg, folders, data)
        members, member_weights, states = flatten_members(
            chosen.selection.chosen, chosen.selection.weights, uris, folders, specs
        )
    metrics = metrics_json(confusion_scores(chosen.selection.confusion), list(data.classes))
    spec = ensemble_spec(cfg, data, chosen, metrics, members, member_weights, specs[0])
    model_uri, run_id = register_ensemble(
        client,
        spec=spec,
        states=states,
        experiment=cfg.experiment,
        register_as=cfg.register_as,
        params=ensemble_params(cfg, data, chosen, uris),
        metrics={k: v for k, v in spec.metrics.items() if not isinstance(v, dict) and v is not None},
        description=f"ensemble of {len(chosen.selection.chosen)} candidate(s), {cfg.split} mIoU "
        f"{metrics['miou']:.4f}",
        tags={
            f"{cfg.split}_miou": f"{metrics['miou']:.6f}",
            "dataset_fingerprint": data.fingerprint,
        },
        parent_run_id=cfg.parent_run_id,
    )
    return ensemble_result(model_uri, run_id, uris, chosen, metrics)


def choose_members(cfg: EnsembleConfig, folders, data) -> Chosen:
    """Score the candidates into shards (removed afterwards), select members, search the CRF."""
    import tempfile

    from pipelines.select.ensemble.crf_search import search_crf
    from pipelines.select.ensemble.scoring import score_candidates
    from pipelines.select.ensemble.selection import average_all, greedy_select

    scratch = cfg.scratch or tempfile.mkdtemp(prefix="segpipe-ensemble-")
    shards_uri = storage.join(scratch, f"shards-{int(time.time() * 1000)}") if cfg.scratch else scratch
    started = time.perf_counter()
    try:
        shards = score_candidates(
            folders,
            data,
            cfg.split,
            shards_uri,
            stride=cfg.stride,
            max_images=cfg.max_images,
            images_per_shard=cfg.images_per_shard,
        )
        images = sum(s.images for s in shards)
        print(f"[segpipe] scored {len(folders)} candidate(s) on {images} {cfg.split} images")
        if cfg.select == "average":
            selection = average_all(shards, len(folders), data.num_classes)
        else:
            selection = greedy_select(shards, len(folders), data.num_classes, cfg.max_members)
        crf = None
        if cfg.crf:
            crf = search_crf(
                shards, selection.candidate_weights, data.num_classes, cfg.crf_images, cfg.crf_grid
            )
            print(
                f"[segpipe] CRF on {crf.images} {cfg.split} images: mIoU {crf.miou_with:.4f} vs "
                f"{crf.miou_without:.4f} without"
            )
    finally:
        storage.remove_tree(shards_uri)
    return Chosen(selection, crf, images, time.perf_counter() - started)


def ensemble_spec(cfg: EnsembleConfig, data, chosen: Chosen, metrics, members, member_weights, first):
    """The ensemble's model.json: the members, their weights, the CRF and the metrics on `cfg.split`."""
    from segmodels.artifact import ModelSpec

    spec_metrics = {f"{cfg.split}_{k}": v for k, v in metrics.items()}
    if chosen.crf is not None:
        spec_metrics[f"{cfg.split}_miou_crf"] = chosen.crf.miou_with
        spec_metrics[f"{cfg.split}_miou_no_crf"] = chosen.crf.miou_without
    return ModelSpec(
        name=cfg.register_as or "segpipe-ensemble",
        classes=list(data.classes),
        palette=[list(p) for p in data.palette],
        members=members,
        ensemble_weights=member_weights,
        mean=first.mean,
        std=first.std,
        crf=chosen.crf.params if chosen.crf is not None else None,
        metrics=spec_metrics,
        dataset_fingerprint=data.fingerprint,
    )


def ensemble_params(cfg: EnsembleConfig, data, chosen: Chosen, uris: list[str]) -> dict[str, Any]:
    """The MLflow params of the ensemble run: candidates, members, weights, CRF, how selection scored."""
    return {
        "candidates": ",".join(uris),
        "members": ",".join(uris[c] for c in chosen.selection.chosen),
        "weights": ",".join(f"{w:.3f}" for w in chosen.selection.weights),
        "crf": chosen.crf.params if chosen.crf is not None else None,
        "selection_images": chosen.images,
        "selection_stride": cfg.stride,
        "dataset_fingerprint": data.fingerprint,
    }


def ensemble_result(
    model_uri: str, run_id: str, uris: list[str], chosen: Chosen, metrics: dict[str, Any]
) -> dict[str, Any]:
    """The JSON `segpipe ensemble` writes (and retrain / reproduce record)."""
    selection, crf = chosen.selection, chosen.crf
    member_scores = dict(zip(uris, selection.member_miou, strict=True))
    return {
        "model_uri": model_uri,
        "run_id": run_id,
        "members": [
            {"uri": uris[c], "weight": w, "val_miou": member_scores[uris[c]]}
            for c, w in zip(selection.chosen, selection.weights, strict=True)
        ],
        "weights": selection.weights,
        "crf": crf.params if crf is not None else None,
        "crf_search": None if crf is None else dataclasses.asdict(crf),
        "selection_history": selection.history,
        "selection_images": chosen.images,
        "metrics": metrics,
        "candidates": member_scores,
        "seconds": chosen.seconds,
    }
