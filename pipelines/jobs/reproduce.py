"""Reproduce stage: one paper's training procedure as one resumable job (`segpipe reproduce RECIPE`).

A recipe (`pipelines/configs/reproduce/<name>.yaml`) chains the paper's stages: training stages, each
starting from the paper's recipe file for its architecture and dataset (`<arch>_<dataset>.yaml`) with the
stage's own values on top (in the references' units: `max_iters` optimiser steps of a global
`batch_size`) and, where the paper stages its training, the model of an earlier stage (`init_from`, e.g.
FCN-16s from FCN-32s); and ensemble stages (the plain average of earlier stages or of another recipe's
result, optionally with the dense CRF tuned on val). A recipe names the splits the paper trains and
scores on (`splits`, e.g. FCN's sbd_train / seg11valid) and its test-time procedure (`test`: PSPNet's
sliding window + flip, EDeconvNet's fixed CRF). Each stage is an MLflow child run of one parent run; each
finished stage is recorded in `<storage>/reproduce-<name>-<dataset>/<key>/state.json`, so re-running
continues from the first unfinished stage (a training stage also resumes its checkpoints). The last
stage's model is registered (alias `reproduced`), scored on the paper's split with its test-time
procedure, and reported beside the published number for that split. As in the papers, every training
stage keeps its final snapshot (`keep: final`): later stages start from it, ensembles average it and it
is what is scored; the last training stage's best epoch is reported beside it.

`--tiny` applies the recipe's `tiny` values (narrow networks, small crops, one epoch) to every training
stage: the whole procedure runs in minutes on a CPU, which is how the tests run it. A tiny run on a
dataset without the recipe's splits (a plain `--dataset voc`) uses train and val instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage, tracking
from pipelines.config import (
    CONFIG_DIR,
    TrainConfig,
    apply_overrides,
    config_model,
    make_config,
    read_yaml,
)
from pipelines.errors import UserError

RECIPE_DIR = CONFIG_DIR / "reproduce"
ALIAS = "reproduced"


@config_model
class Published:
    """A number the paper (or its reference implementation) reports."""

    miou: float  # mean IoU in percent
    split: str  # what it was measured on, e.g. "VOC2012 val (1,449 images)"
    model: str  # what was measured, e.g. "FCN-8s, staged"
    scored_on: str = ""  # the prepared split that is `split` (val, seg11valid); "" = a test-server split
    multi_scale: float | None = None  # the number with the paper's multi-scale test (PSPNet)


@config_model
class Splits:
    """The prepared splits a paper trains and scores on (`segpipe prepare --dataset voc_aug` writes them)."""

    train: str = "train"
    val: str = "val"


@config_model
class ScoringProcedure:
    """How the paper turns an image into its prediction when it reports its number."""

    # Sliding windows the size of the last stage's training crop, overlapping by `stride_rate`
    # (hszhao/semseg tool/test.py: test_h = train_h, stride = ceil(crop x 2/3)); False: the whole image.
    slide: bool = False
    stride_rate: float = 2 / 3
    flip: bool = False  # average with the horizontally flipped image (semseg's net_process, flip=True)
    multi_scale: tuple[float, ...] = ()  # the scales of `--multi-scale` (semseg's ms testing)
    crf: dict[str, float] = field(default_factory=dict)  # a fixed dense CRF (EDeconvNet's release)

    def describe(self, crop: int = 0, multi_scale: bool = False) -> str:
        parts = [f"slide {crop}/{window_stride(crop, self.stride_rate)}" if self.slide else "whole image"]
        parts += [f"scales {','.join(f'{s:g}' for s in self.multi_scale)}"] if multi_scale else []
        parts += ["flip"] if self.flip else []
        parts += [f"fixed CRF {self.crf}"] if self.crf else []
        return " + ".join(parts)


@config_model
class Stage:
    """One step of a paper's procedure: a training run (`train`) or an ensemble (`ensemble`)."""

    name: str
    train: str = ""  # architecture; its base recipe is pipelines/configs/<train>_<dataset>.yaml
    init_from: str = ""  # an earlier stage whose model's matching tensors start this one
    pretrained: bool = False  # the backbone starts from `--pretrained` (ImageNet) weights
    set: dict[str, Any] = field(default_factory=dict)  # TrainConfig values over the base recipe
    set_for: dict[str, dict[str, Any]] = field(default_factory=dict)  # dataset family -> values over `set`
    only: tuple[str, ...] = ()  # the dataset families this stage runs on (default: every one)
    tiny: dict[str, Any] = field(default_factory=dict)  # and over those with --tiny
    ensemble: tuple[str, ...] = ()  # members: earlier stages or "recipe:NAME" (that recipe's result)
    select: str = "average"  # average (the papers' plain mean) | greedy
    crf: bool = False  # tune the dense CRF on val and keep it (DeepLab section 4.2)
    crf_images: int = 100  # DeepLab cross-validates the CRF on 100 val images
    tiny_crf_images: int = 2  # with --tiny: the paper's grid on fewer images keeps the run short


@config_model
class Recipe:
    """A `pipelines/configs/reproduce/<name>.yaml` file."""

    paper: str
    stages: tuple[Stage, ...]
    published: dict[str, Published] = field(default_factory=dict)  # dataset family -> number
    splits: dict[str, Splits] = field(default_factory=dict)  # dataset family -> splits (default train/val)
    test: dict[str, ScoringProcedure] = field(default_factory=dict)  # dataset family -> test-time procedure
    tiny: dict[str, Any] = field(default_factory=dict)  # TrainConfig values of every stage with --tiny
    evaluate_instance: bool = False  # score the result instance-wise (DeconvNet; with --proposals)

    def stages_for(self, family: str) -> tuple[Stage, ...]:
        return tuple(s for s in self.stages if not s.only or family in s.only)


@config_model
class ReproduceConfig:
    recipe: str
    data: str
    tiny: bool = False
    multi_scale: bool = False  # score with the paper's multi-scale test (PSPNet) as well as its flip
    register_as: str = ""  # default reproduce-<recipe>-<dataset>
    pretrained: str = ""  # ImageNet backbone weights for the stages with `pretrained: true`
    proposals: str = ""  # proposals file for instance-wise scoring (see pipelines.inference.proposals)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE for every stage
    tracking_uri: str = ""
    experiment: str = "segpipe-reproduce"
    storage: str = ""


def window_stride(crop: int, stride_rate: float) -> int:
    """semseg's sliding-window stride: ceil(crop x stride_rate)."""
    return max(1, math.ceil(crop * stride_rate - 1e-9))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    """A recipe by name (or path), validated: stage kinds, references to earlier stages of each family."""
    path = Path(name) if name.endswith(".yaml") else RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"no recipe {name!r}; choose one of {', '.join(recipe_names())} (segpipe reproduce --list)"
        )
    recipe = make_config(Recipe, read_yaml(path), source=str(path))
    if len({stage.name for stage in recipe.stages}) != len(recipe.stages):
        raise UserError(f"{path}: stage names must be unique")
    families = {family for stage in recipe.stages for family in stage.only} | {"(any other)"}
    for family in sorted(families):
        seen: list[str] = []
        for stage in recipe.stages_for(family):
            where = f"{path}: stage {stage.name!r}"
            if bool(stage.train) == bool(stage.ensemble):
                raise UserError(f"{where}: give either `train: ARCH` or `ensemble: [members]`")
            refs = [stage.init_from] if stage.init_from else []
            refs += [m for m in stage.ensemble if not m.startswith("recipe:")]
            for ref in refs:
                if ref not in seen:
                    raise UserError(
                        f"{where}: {ref!r} is not an earlier stage on {family} ({', '.join(seen) or 'none'})"
                    )
            if stage.select not in ("average", "greedy"):
                raise UserError(f"{where}: select must be average or greedy, got {stage.select!r}")
            seen.append(stage.name)
    return recipe


def dataset_family(dataset: str) -> str:
    """The recipe files' dataset of a prepared dataset: voc_aug -> voc, coco_voc -> coco."""
    return dataset.split("_")[0]


def default_name(recipe: str, family: str) -> str:
    return f"reproduce-{recipe}-{family}"


def resolve_splits(recipe: Recipe, cfg: ReproduceConfig, family: str, available) -> tuple[Splits, str]:
    """The splits to train and score on (the paper's, or --set train_split / val_split) and, when --tiny
    had to fall back to train / val, a note saying so."""
    paper = recipe.splits.get(family, Splits())
    wanted = Splits(
        train=str(cfg.train_overrides.get("train_split", paper.train)),
        val=str(cfg.train_overrides.get("val_split", paper.val)),
    )
    missing = [split for split in (wanted.train, wanted.val) if split not in available]
    if not missing:
        return wanted, ""
    if cfg.tiny and {"train", "val"} <= set(available):
        return (
            Splits(),
            f"the paper's splits {wanted.train} / {wanted.val} are not in this dataset: --tiny used train / val",
        )
    raise UserError(
        f"recipe {cfg.recipe} trains on {wanted.train!r} and scores on {wanted.val!r}, as the paper does, but "
        f"{cfg.data} has no {', '.join(map(repr, missing))} (it has {', '.join(available)}): prepare the "
        "dataset with `segpipe prepare --dataset voc_aug` (train_aug, val, sbd_train, seg11valid), or pick "
        "splits it has with --set train_split=NAME --set val_split=NAME"
    )


def stage_config(
    recipe: Recipe,
    stage: Stage,
    cfg: ReproduceConfig,
    family: str,
    splits: Splits | None = None,
    **fixed: Any,
) -> TrainConfig:
    """The TrainConfig of a training stage: base recipe file <- splits <- stage.set <- stage.set_for[family]
    <- tiny <- --set <- `fixed`. `splits` default to the recipe's for the family."""
    base = CONFIG_DIR / f"{stage.train}_{family}.yaml"
    values = read_yaml(base) if base.is_file() else {"model": stage.train}
    splits = splits or recipe.splits.get(family, Splits())
    layers = [
        {"train_split": splits.train, "val_split": splits.val, "keep": "final"},
        stage.set,
        stage.set_for.get(family, {}),
    ]
    if cfg.tiny:
        layers += [recipe.tiny, stage.tiny]
    layers += [cfg.train_overrides, fixed]
    for layer in layers:
        apply_overrides(values, layer)
    if stage.pretrained and cfg.pretrained and not cfg.tiny:
        values["pretrained"] = cfg.pretrained
    return make_config(TrainConfig, values, source=f"recipe {cfg.recipe}: stage {stage.name}")


def run_key(cfg: ReproduceConfig, recipe: Recipe, fingerprint: str) -> str:
    """The run's identity: what trains (not how the result is scored, e.g. --multi-scale)."""
    body = json.dumps(
        {
            "cfg": {k: v for k, v in vars(cfg).items() if k not in ("tracking_uri", "multi_scale")},
            "recipe": repr(recipe),
            "data": fingerprint,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def check_stages(
    recipe: Recipe, cfg: ReproduceConfig, data, family: str, splits: Splits | None = None
) -> None:
    """Every training stage's config and model, checked before the first stage starts."""
    from pipelines.train.trainer import check_model

    for stage in recipe.stages_for(family):
        if not stage.train:
            continue
        stage_cfg = stage_config(recipe, stage, cfg, family, splits, data=cfg.data)
        check_model(stage_cfg, data.num_classes)
        if stage.pretrained and not cfg.tiny and not cfg.pretrained:
            raise UserError(
                f"stage {stage.name} starts from ImageNet weights, as the paper does: pass --pretrained "
                f"FILE (torchvision's {stage.train} backbone, .safetensors or .pth, or Caffe's "
                "VGG_ILSVRC_16_layers.caffemodel where the recipe sets input_convention caffe_bgr), or --tiny "
                "for a smoke run"
            )


def scoring_settings(recipe: Recipe, cfg: ReproduceConfig, family: str, splits: Splits, proposals, crf: bool):
    """The InferenceSettings of the paper's test-time procedure, and its description for the table."""
    from pipelines.inference.core import InferenceSettings

    procedure = recipe.test.get(family, ScoringProcedure())
    if cfg.multi_scale and not procedure.multi_scale:
        raise UserError(f"recipe {cfg.recipe} has no multi-scale test on {family}: drop --multi-scale")
    trained = [s for s in recipe.stages_for(family) if s.train]
    crop = stage_config(recipe, trained[-1], cfg, family, splits).crop if trained else 0
    settings = InferenceSettings(
        scales=procedure.multi_scale if cfg.multi_scale else (1.0,),
        flip=procedure.flip,
        slide=(crop, window_stride(crop, procedure.stride_rate)) if procedure.slide else None,
        crf=crf or bool(procedure.crf),
        crf_params=dict(procedure.crf),
        proposals=proposals,
    )
    described = procedure.describe(crop, cfg.multi_scale)
    described += " + instance-wise (proposals)" if proposals is not None else ""
    described += " + CRF tuned on val" if crf and not procedure.crf else ""
    return settings, described


def member_uri(ref: str, outputs: dict[str, dict[str, Any]], client, family: str) -> str:
    """An ensemble member: an earlier stage's model, or another recipe's registered result."""
    if not ref.startswith("recipe:"):
        return outputs[ref]["model_uri"]
    other = ref.removeprefix("recipe:")
    uri = f"models:/{default_name(other, family)}@{ALIAS}"
    try:
        tracking.model_version(client, uri)
    except UserError:
        raise UserError(
            f"this recipe averages its model with {other}'s result ({uri}), which is not registered in "
            f"{client.tracking_uri}: run `segpipe reproduce {other}` on the same data first"
        ) from None
    return uri


@dataclass(frozen=True)
class RecipeRun:
    """One run of a recipe on a dataset: what every stage needs to know."""

    cfg: ReproduceConfig
    recipe: Recipe
    family: str
    splits: Splits
    stages: tuple[Stage, ...]  # the recipe's stages for this dataset family
    tracking_uri: str
    storage: str
    prefix: str  # run names and scratch folders start with it
    parent_id: str
    client: Any
    register_as: str
    state: Any  # pipelines.jobs.state.StepState: the finished stages of this run
    proposals: Any = None  # object proposals for instance-wise scoring (DeconvNet), or None
    split_note: str = ""  # set when --tiny had to fall back to train / val


def best_epoch(client, run_id: str) -> dict[str, Any]:
    """A training run's best epoch by val mIoU, from the per-epoch history: {"miou", "epoch"} (1-based)."""
    history = client.get_metric_history(run_id, "val_miou")
    if not history:
        return {"miou": None, "epoch": None}
    best = max(history, key=lambda m: (m.value, -m.step))
    return {"miou": best.value, "epoch": best.step + 1}


def run_stage(stage: Stage, run: RecipeRun, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cfg = run.cfg
    if stage.train:
        from pipelines.train.trainer import train

        stage_cfg = stage_config(
            run.recipe,
            stage,
            cfg,
            run.family,
            run.splits,
            data=cfg.data,
            tracking_uri=run.tracking_uri,
            experiment=cfg.experiment,
            storage=run.storage,
            run_name=f"{run.prefix}-{stage.name}",
            parent_run_id=run.parent_id,
            init_from=outputs[stage.init_from]["model_uri"] if stage.init_from else "",
        )
        result = train(stage_cfg)
        return {
            "model_uri": result.model_uri,
            "run_id": result.run_id,
            "val_miou": result.metrics.get("val_miou"),  # the kept model's: the final snapshot
            "best_epoch": best_epoch(run.client, result.run_id),
        }
    from pipelines.select.ensemble import EnsembleConfig, build_ensemble

    members = [member_uri(ref, outputs, run.client, run.family) for ref in stage.ensemble]
    result = build_ensemble(
        EnsembleConfig(
            candidates=tuple(members),
            data=cfg.data,
            split=run.splits.val,
            register_as=run.register_as if stage is run.stages[-1] else "",
            crf=stage.crf,
            crf_images=stage.tiny_crf_images if cfg.tiny else stage.crf_images,
            select=stage.select,
            max_members=len(members),
            scratch=storage.join(run.storage, run.prefix, stage.name),
            tracking_uri=run.tracking_uri,
            experiment=cfg.experiment,
            parent_run_id=run.parent_id,
        )
    )
    return {
        "model_uri": result["model_uri"],
        "run_id": result["run_id"],
        "val_miou": result["metrics"]["miou"],
        "crf": result["crf"],
    }


def register_result(client, stage: Stage, output: dict[str, Any], name: str) -> str:
    """The final model as a version of `name` with alias `reproduced`; returns models:/NAME/VERSION."""
    from pipelines.model_uri import ModelUri

    if ModelUri.parse(output["model_uri"]).kind == "registry":  # an ensemble stage registered it already
        version = tracking.model_version(client, output["model_uri"]).version
    else:
        version = tracking.register_run_model(
            client, name, run_id=output["run_id"], description=f"segpipe reproduce, stage {stage.name}"
        ).version
    tracking.set_alias(client, name, ALIAS, str(version))
    return f"models:/{name}/{version}"


def reproduce(cfg: ReproduceConfig) -> dict[str, Any]:
    """Run (or resume) a recipe on a prepared dataset; returns the stages, the result and the table."""
    run = start_recipe_run(cfg)
    try:
        outputs = run_stages(run)
        model_uri, scores, settings, procedure = score_result(run, outputs)
    except BaseException:
        run.client.set_terminated(run.parent_id, status="FAILED")
        raise
    return finish_recipe_run(run, outputs, model_uri, scores, settings, procedure)


def start_recipe_run(cfg: ReproduceConfig) -> RecipeRun:
    """Check everything the run needs (recipe, splits, stages, tracking server, storage, other recipes'
    results) before any stage starts, then open or resume the parent MLflow run."""
    from pipelines.data.dataset import open_prepared
    from pipelines.jobs.state import StepState
    from pipelines.preflight import default_storage
    from pipelines.train.trainer import check_storage

    recipe = load_recipe(cfg.recipe)
    data = open_prepared(cfg.data)
    family = dataset_family(data.manifest.dataset)
    splits, split_note = resolve_splits(recipe, cfg, family, list(data.manifest.splits))
    if cfg.proposals and not recipe.evaluate_instance:
        raise UserError(
            f"recipe {cfg.recipe} scores whole images; --proposals is for instance-wise recipes (deconvnet)"
        )
    proposals = None
    if cfg.proposals:
        from pipelines.inference.proposals import load_proposals

        proposals = load_proposals(cfg.proposals)
    check_stages(recipe, cfg, data, family, splits)
    scoring_settings(recipe, cfg, family, splits, None, False)  # a bad --multi-scale fails now
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    tracking.check_server(tracking_uri)
    store = check_storage(cfg.storage or default_storage())
    key = run_key(cfg, recipe, data.fingerprint)
    client = tracking.connect(tracking_uri)
    stages = recipe.stages_for(family)
    for stage in stages:  # another recipe's result must exist before any stage starts
        for ref in stage.ensemble:
            if ref.startswith("recipe:"):
                member_uri(ref, {}, client, family)
    prefix = f"{default_name(cfg.recipe, family)}-{key[:8]}"
    parent_id, resumed = tracking.start_or_resume_run(
        client,
        cfg.experiment,
        prefix,
        tags={"segpipe.stage": "reproduce", "segpipe.recipe": cfg.recipe},
        reuse_finished=True,
    )
    print(
        f"[segpipe] reproduce {cfg.recipe} on {family}, {splits.train} -> {splits.val} "
        f"({'resumed' if resumed else 'new'}; MLflow run {parent_id})"
    )
    if split_note:
        print(f"[segpipe] note: {split_note}")
    return RecipeRun(
        cfg=cfg,
        recipe=recipe,
        family=family,
        splits=splits,
        stages=stages,
        tracking_uri=tracking_uri,
        storage=store,
        prefix=prefix,
        parent_id=parent_id,
        client=client,
        register_as=cfg.register_as or default_name(cfg.recipe, family),
        state=StepState(storage.join(store, default_name(cfg.recipe, family), key, "state.json")),
        proposals=proposals,
        split_note=split_note,
    )


def run_stages(run: RecipeRun) -> dict[str, dict[str, Any]]:
    """Each stage in order, skipping the ones the state file records as finished; their outputs by name."""
    outputs: dict[str, dict[str, Any]] = {}
    for number, stage in enumerate(run.stages, 1):
        done = run.state.done(stage.name)
        if done:
            outputs[stage.name] = done["output"]
            print(f"[segpipe] stage {number}/{len(run.stages)} {stage.name}: already done, skipped")
            continue
        print(f"[segpipe] stage {number}/{len(run.stages)} {stage.name} ...", flush=True)
        started = time.perf_counter()
        outputs[stage.name] = run_stage(stage, run, outputs)
        seconds = time.perf_counter() - started
        run.state.record(stage.name, outputs[stage.name], seconds)
        run.client.log_metric(run.parent_id, f"stage_{stage.name}_s", seconds)
    return outputs


def score_result(run: RecipeRun, outputs: dict[str, dict[str, Any]]):
    """Register the last stage's model (alias `reproduced`) and score it on the paper's split with its
    test-time procedure; returns (model URI, {miou, images}, settings, the procedure in words)."""
    from pipelines.inference.evaluate import EvalConfig, evaluate

    cfg, state, splits = run.cfg, run.state, run.splits
    final = outputs[run.stages[-1].name]
    if not state.done("register"):
        model_uri = register_result(run.client, run.stages[-1], final, run.register_as)
        state.record("register", {"model_uri": model_uri}, 0.0)
    model_uri = state.done("register")["output"]["model_uri"]
    settings, procedure = scoring_settings(
        run.recipe, cfg, run.family, splits, run.proposals, bool(final.get("crf"))
    )
    step = "evaluate-ms" if cfg.multi_scale else "evaluate"
    if not state.done(step):
        print(f"[segpipe] scoring {model_uri} on {splits.val}: {procedure} ...", flush=True)
        scores = evaluate(
            EvalConfig(
                model_uri=model_uri,
                data=cfg.data,
                split=splits.val,
                settings=settings,
                tracking_uri=run.tracking_uri,
            )
        )
        summary = {"miou": scores["metrics"]["miou"], "images": scores["images"]}
        state.record(step, summary, scores["seconds"])
    return model_uri, state.done(step)["output"], settings, procedure


def finish_recipe_run(
    run: RecipeRun, outputs: dict[str, dict[str, Any]], model_uri: str, scores, settings, procedure: str
) -> dict[str, Any]:
    """The table beside the published number, logged to the parent run, which is closed; the result."""
    client, parent_id = run.client, run.parent_id
    last_trained = [outputs[s.name] for s in run.stages if s.train][-1]
    table = result_table(
        run.recipe, run.cfg, run.family, run.splits, scores, procedure, last_trained, run.split_note
    )
    table["instance"], table["crf"] = run.proposals is not None, settings.crf
    client.log_dict(parent_id, table, "reproduce.json")
    if scores["miou"] is not None:
        client.log_metric(parent_id, "val_miou", scores["miou"])
    client.set_tag(parent_id, "segpipe.model_uri", model_uri)
    client.set_terminated(parent_id, status="FINISHED")
    seconds = {step: done["seconds"] for step, done in run.state.data["steps"].items()}
    return {
        "run_id": parent_id,
        "model_uri": model_uri,
        "stages": {s.name: run.state.done(s.name) for s in run.stages},
        "step_seconds": seconds,  # each stage's and the final scoring's, as recorded in the state file
        "seconds": sum(seconds.values()),
        "table": table,
    }


def percent(miou: float | None) -> float | None:
    return None if miou is None else round(100 * miou, 2)


def result_table(
    recipe: Recipe,
    cfg: ReproduceConfig,
    family: str,
    splits: Splits,
    scores: dict[str, Any],
    procedure: str,
    last_trained: dict[str, Any],
    note: str,
) -> dict[str, Any]:
    """The published number beside ours on the same split: the registered result (each training stage's
    final snapshot, as the papers report) scored with the paper's test-time procedure, and, as an extra
    column, the last training stage's best epoch in its training run's val pass."""
    published = recipe.published.get(family)
    trained = [s for s in recipe.stages_for(family) if s.train]
    keep = stage_config(recipe, trained[-1], cfg, family, splits).keep if trained else "final"
    best = last_trained.get("best_epoch") or {}
    same_split = published is not None and published.scored_on == splits.val
    if published is not None and not same_split:
        where = f"on {published.split}" if not published.scored_on else f"on {published.scored_on}"
        note = "; ".join(filter(None, [note, f"the published number is {where}, ours on {splits.val}"]))
    return {
        "recipe": cfg.recipe,
        "paper": recipe.paper,
        "published": None if published is None else published_entry(published, cfg.multi_scale),
        "ours": {
            "miou": percent(scores["miou"]),
            "split": f"{splits.val} ({scores['images']} images)",
            "test": procedure,
            "model": f"{'final snapshot' if keep == 'final' else 'best epoch'} of each training stage",
        },
        "best_epoch": {
            "miou": percent(best.get("miou")),
            "epoch": best.get("epoch"),
            "split": splits.val,
            "test": "whole image (the training run's val pass)",
        },
        "train_split": splits.train,
        "same_split": same_split,
        "note": note,
    }


def published_entry(published: Published, multi_scale: bool) -> dict[str, Any]:
    """The published number for the test run: the multi-scale one with --multi-scale."""
    entry = {k: v for k, v in vars(published).items() if k != "multi_scale"}
    if multi_scale and published.multi_scale is not None:
        entry.update(miou=published.multi_scale, model=f"{published.model}, multi-scale")
    return entry


TABLE_HEADERS = ["recipe", "published", "published on", "ours", "ours, best epoch", "split", "test-time"]


def table_row(table: dict[str, Any]) -> list[Any]:
    """One `segpipe reproduce` result line: published | ours (final snapshot, paper's test) | best epoch."""
    published = table["published"] or {}

    def number(value):
        return "-" if value is None else value

    return [
        table["recipe"],
        number(published.get("miou")),
        published.get("split", "-"),
        number(table["ours"]["miou"]),
        number(table["best_epoch"]["miou"]),
        f"{table['ours']['split']}{'' if table['same_split'] else ' (not the published split)'}",
        table["ours"]["test"],
    ]


def stage_summary(recipe: Recipe, stage: Stage, family: str) -> str:
    """`fcn32s 100k it x 1` (iterations x global batch) or `crf (ensemble, CRF)` for --list."""
    if not stage.train:
        return f"{stage.name} ({'CRF search' if stage.crf else 'ensemble'})"
    cfg = stage_config(recipe, stage, ReproduceConfig(recipe="list", data=""), family)
    length = f"{cfg.max_iters / 1000:g}k it" if cfg.max_iters else f"{cfg.epochs} ep"
    return f"{stage.name} {length} x {cfg.batch_size}"


def list_rows() -> list[list[Any]]:
    """`segpipe reproduce --list`: recipe | dataset | stages | splits | published number on that dataset."""
    rows = []
    for name in recipe_names():
        recipe = load_recipe(name)
        for family in recipe.published or {"voc": None}:
            splits = recipe.splits.get(family, Splits())
            published = recipe.published.get(family)
            rows.append(
                [
                    name,
                    family,
                    " -> ".join(stage_summary(recipe, s, family) for s in recipe.stages_for(family)),
                    f"{splits.train} -> {splits.val}",
                    "-" if published is None else f"{published.miou} ({published.model}; {published.split})",
                ]
            )
    return rows


LIST_HEADERS = ["recipe", "dataset", "stages (iterations x batch)", "splits", "published mIoU"]
