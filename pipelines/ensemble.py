"""Ensemble stage: greedy forward selection (with replacement) of candidate models on val mIoU.

Caruana et al.'s ensemble selection on averaged class probabilities: each round adds the candidate (possibly
one already chosen, which raises its weight) that most improves val mIoU; the best prefix wins, so the
ensemble never scores below its best member. An optional dense-CRF stage has its bilateral parameters
tuned on the same split and is kept only if it helps. The result is a self-describing model folder,
registered as a new version of the registered model with alias `challenger`.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.evaluate import InferenceSettings, metrics_json, predict_image

CRF_GRID = {"w1": (3.0, 5.0), "theta_alpha": (50.0, 80.0, 120.0), "theta_beta": (3.0, 5.0)}


@dataclass(frozen=True)
class EnsembleConfig:
    candidates: tuple[str, ...]
    data: str
    register_as: str = ""
    crf: bool = False
    split: str = "val"
    max_members: int = 5  # selection rounds
    max_images: int = 0  # 0 = the whole split
    tracking_uri: str = ""
    experiment: str = "segpipe"
    metric: str = "val_miou"
    settings: InferenceSettings = field(default_factory=InferenceSettings)


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


def miou_of(preds: list[np.ndarray], truths: list[np.ndarray], num_classes: int):
    import torch

    from segmodels.metrics import ConfusionMatrix

    cm = ConfusionMatrix(num_classes)
    for pred, truth in zip(preds, truths, strict=True):
        cm.update(torch.from_numpy(pred)[None].long(), torch.from_numpy(truth)[None].long())
    return cm


def greedy_select(
    probs: list[list[np.ndarray]], truths: list[np.ndarray], num_classes: int, rounds: int
) -> tuple[Counter, float, list[float]]:
    """probs[c][i]: candidate c's C,H,W probabilities for image i -> (counts per candidate, mIoU, history)."""
    sums = [np.zeros_like(p, dtype=np.float32) for p in probs[0]]
    counts: Counter = Counter()
    history, best = [], (Counter(), -1.0)
    for _ in range(rounds):
        scores = []
        for cand in probs:
            preds = [(s + p).argmax(0) for s, p in zip(sums, cand, strict=True)]
            scores.append(miou_of(preds, truths, num_classes).compute()["miou"])
        pick = int(np.nanargmax(scores))
        counts[pick] += 1
        sums = [s + p for s, p in zip(sums, probs[pick], strict=True)]
        history.append(float(scores[pick]))
        if scores[pick] > best[1] + 1e-9:  # ties keep the smaller ensemble
            best = (counts.copy(), float(scores[pick]))
    return best[0], best[1], history


def tune_crf(images, probs, truths, num_classes: int) -> tuple[dict[str, float] | None, float]:
    """Grid over the bilateral kernel on val; returns (best params, mIoU) or (None, -1) if nothing ran."""
    from segmodels.crf import CRFParams, dense_crf

    best: tuple[dict[str, float] | None, float] = (None, -1.0)
    for w1, alpha, beta in itertools.product(*CRF_GRID.values()):
        params = CRFParams(w1=w1, theta_alpha=alpha, theta_beta=beta)
        preds = [dense_crf(img, p, params).argmax(0) for img, p in zip(images, probs, strict=True)]
        score = miou_of(preds, truths, num_classes).compute()["miou"]
        if score > best[1]:
            best = (
                {
                    "w1": w1,
                    "theta_alpha": alpha,
                    "theta_beta": beta,
                    "iterations": 10,
                    "w2": 3.0,
                    "theta_gamma": 3.0,
                },
                score,
            )
    return best


def build_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Select, (optionally) add a tuned CRF, save, log and register the ensemble; returns the JSON result."""
    import tempfile

    from safetensors.torch import load_file

    from pipelines.dataset import decode_image, decode_mask, open_prepared
    from segmodels.artifact import MemberSpec, ModelSpec, load_model_dir, read_spec, save_model_dir

    data = open_prepared(cfg.data)
    if cfg.split not in data.manifest.splits:
        raise UserError(f"{cfg.data} has no split {cfg.split!r}")
    client = tracking.connect(cfg.tracking_uri)
    uris = expand_candidates(cfg, client)
    folders = [tracking.download_model(u, cfg.tracking_uri) for u in uris]
    specs = [read_spec(f) for f in folders]
    for uri, spec in zip(uris, specs, strict=True):
        if list(spec.classes) != list(data.classes):
            raise UserError(
                f"candidate {uri} predicts other classes than {cfg.data}; use models of this dataset"
            )
    rows = data.split(cfg.split).take(cfg.max_images or data.manifest.splits[cfg.split].rows)
    images = [decode_image(r["image"]) for r in rows]
    truths = [decode_mask(r["mask"]) for r in rows]
    started = time.perf_counter()
    plain = InferenceSettings(scales=cfg.settings.scales, flip=cfg.settings.flip, slide=cfg.settings.slide)
    probs = []
    for uri, folder in zip(uris, folders, strict=True):
        model = load_model_dir(folder)
        probs.append(
            [predict_image(model, img, plain).astype(np.float16).astype(np.float32) for img in images]
        )
        print(f"[segpipe] scored candidate {uri} on {len(images)} {cfg.split} images")
    counts, score, history = greedy_select(probs, truths, data.num_classes, cfg.max_members)
    chosen = sorted(counts)
    weights = [counts[c] / sum(counts.values()) for c in chosen]
    member_scores = {
        uris[c]: miou_of([p.argmax(0) for p in probs[c]], truths, data.num_classes).compute()["miou"]
        for c in range(len(uris))
    }
    final_probs = [
        sum(w * probs[c][i] for c, w in zip(chosen, weights, strict=True)) for i in range(len(images))
    ]
    cm = miou_of([p.argmax(0) for p in final_probs], truths, data.num_classes)
    crf_params = None
    if cfg.crf:
        crf_params, crf_score = tune_crf(images, final_probs, truths, data.num_classes)
        print(f"[segpipe] CRF on {cfg.split}: mIoU {crf_score:.4f} vs {score:.4f} without")
        if crf_score > score:
            from segmodels.crf import CRFParams, dense_crf

            cm = miou_of(
                [
                    dense_crf(img, p, CRFParams(**crf_params)).argmax(0)
                    for img, p in zip(images, final_probs, strict=True)
                ],
                truths,
                data.num_classes,
            )
        else:
            crf_params = None
    metrics = metrics_json(cm.compute(), list(data.classes))

    # Flatten: every chosen candidate's members, weights multiplied through.
    members, member_weights, states = [], [], []
    for c, w in zip(chosen, weights, strict=True):
        for m, mw in zip(specs[c].members, specs[c].ensemble_weights, strict=True):
            index = len(members)
            members.append(
                MemberSpec(
                    arch=m.arch,
                    num_classes=m.num_classes,
                    weights=f"member{index}.safetensors",
                    model_args=m.model_args,
                    config=m.config,
                    metrics=m.metrics,
                    source=uris[c],
                    input=m.input,
                )
            )
            member_weights.append(w * mw / sum(specs[c].ensemble_weights))
            states.append(load_file(str(folders[c] / m.weights)))
    name = cfg.register_as or "segpipe-ensemble"
    spec = ModelSpec(
        name=name,
        classes=list(data.classes),
        palette=[list(p) for p in data.palette],
        members=members,
        ensemble_weights=member_weights,
        mean=specs[0].mean,
        std=specs[0].std,
        crf=crf_params,
        metrics={f"{cfg.split}_{k}": v for k, v in metrics.items()},
        dataset_fingerprint=data.fingerprint,
    )
    run_id, _ = tracking.start_or_resume_run(client, cfg.experiment, "", tags={"segpipe.stage": "ensemble"})
    tracking.log_params(
        client,
        run_id,
        {
            "candidates": ",".join(uris),
            "members": ",".join(uris[c] for c in chosen),
            "weights": ",".join(f"{w:.3f}" for w in weights),
            "crf": crf_params,
            "dataset_fingerprint": data.fingerprint,
        },
    )
    for key, value in metrics.items():
        if key != "per_class_iou" and value is not None:
            client.log_metric(run_id, f"{cfg.split}_{key}", value)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_dir(Path(tmp) / "model", spec, states)
        if cfg.register_as:
            version = tracking.register_model_folder(
                client,
                cfg.register_as,
                folder,
                run_id=run_id,
                description=f"ensemble of {len(chosen)} candidate(s), {cfg.split} mIoU {metrics['miou']:.4f}",
                tags={f"{cfg.split}_miou": f"{metrics['miou']:.6f}", "dataset_fingerprint": data.fingerprint},
            )
            tracking.set_alias(client, cfg.register_as, "challenger", version.version)
            model_uri = f"models:/{cfg.register_as}/{version.version}"
        else:
            client.log_artifacts(run_id, str(folder), tracking.MODEL_ARTIFACT_PATH)
            model_uri = f"runs:/{run_id}/{tracking.MODEL_ARTIFACT_PATH}"
    client.set_terminated(run_id, status="FINISHED")
    return {
        "model_uri": model_uri,
        "run_id": run_id,
        "members": [
            {"uri": uris[c], "weight": w, "val_miou": member_scores[uris[c]]}
            for c, w in zip(chosen, weights, strict=True)
        ],
        "weights": weights,
        "crf": crf_params,
        "selection_history": history,
        "metrics": metrics,
        "candidates": member_scores,
        "seconds": time.perf_counter() - started,
    }
