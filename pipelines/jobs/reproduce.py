"""Reproduce stage: one paper's training procedure as one resumable job (`segpipe reproduce RECIPE`).

A recipe (`pipelines/configs/reproduce/<name>.yaml`) chains the paper's stages: training stages, each
starting from the paper's recipe file for its architecture and dataset (`<arch>_<dataset>.yaml`) with the
stage's own values on top and, where the paper stages its training, the model of an earlier stage
(`init_from`, e.g. FCN-16s from FCN-32s); and ensemble stages (the plain average of earlier stages or of
another recipe's result, optionally with the dense CRF tuned on val). Each stage is an MLflow child run of
one parent run; each finished stage is recorded in `<storage>/reproduce-<name>-<dataset>/<key>/state.json`,
so re-running continues from the first unfinished stage (a training stage also resumes its checkpoints).
The last stage's model is registered (alias `reproduced`), scored on the val split, and reported beside
the paper's published number.

`--tiny` applies the recipe's `tiny` values (narrow networks, small crops, one epoch) to every training
stage: the whole procedure runs in minutes on a CPU, which is how the tests run it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import field
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
    """A number the paper reports."""

    miou: float  # mean IoU in percent
    split: str  # e.g. "VOC2012 test"
    model: str  # what was measured, e.g. "FCN-8s, staged"


@config_model
class Stage:
    """One step of a paper's procedure: a training run (`train`) or an ensemble (`ensemble`)."""

    name: str
    train: str = ""  # architecture; its base recipe is pipelines/configs/<train>_<dataset>.yaml
    init_from: str = ""  # an earlier stage whose model's matching tensors start this one
    pretrained: bool = False  # the backbone starts from `--pretrained` (ImageNet) weights
    set: dict[str, Any] = field(default_factory=dict)  # TrainConfig values over the base recipe
    tiny: dict[str, Any] = field(default_factory=dict)  # and over those with --tiny
    ensemble: tuple[str, ...] = ()  # members: earlier stages or "recipe:NAME" (that recipe's result)
    select: str = "average"  # average (the papers' plain mean) | greedy
    crf: bool = False  # tune the dense CRF on val and keep it (DeepLab section 4.2)
    crf_images: int = 100  # DeepLab cross-validates the CRF on 100 val images


@config_model
class Recipe:
    """A `pipelines/configs/reproduce/<name>.yaml` file."""

    paper: str
    stages: tuple[Stage, ...]
    published: dict[str, Published] = field(default_factory=dict)  # dataset family -> number
    tiny: dict[str, Any] = field(default_factory=dict)  # TrainConfig values of every stage with --tiny
    evaluate_instance: bool = False  # score the result instance-wise (DeconvNet; with --proposals)


@config_model
class ReproduceConfig:
    recipe: str
    data: str
    tiny: bool = False
    register_as: str = ""  # default reproduce-<recipe>-<dataset>
    pretrained: str = ""  # ImageNet backbone weights for the stages with `pretrained: true`
    proposals: str = ""  # proposals file for instance-wise scoring (see pipelines.inference.proposals)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE for every stage
    tracking_uri: str = ""
    experiment: str = "segpipe-reproduce"
    storage: str = ""


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    """A recipe by name (or path), validated: stage kinds, references to earlier stages."""
    path = Path(name) if name.endswith(".yaml") else RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"no recipe {name!r}; choose one of {', '.join(recipe_names())} (segpipe reproduce --list)"
        )
    recipe = make_config(Recipe, read_yaml(path), source=str(path))
    seen: set[str] = set()
    for stage in recipe.stages:
        where = f"{path}: stage {stage.name!r}"
        if bool(stage.train) == bool(stage.ensemble):
            raise UserError(f"{where}: give either `train: ARCH` or `ensemble: [members]`")
        if stage.name in seen:
            raise UserError(f"{where}: stage names must be unique")
        refs = [stage.init_from] if stage.init_from else []
        refs += [m for m in stage.ensemble if not m.startswith("recipe:")]
        for ref in refs:
            if ref not in seen:
                raise UserError(f"{where}: {ref!r} is not an earlier stage ({', '.join(seen) or 'none'})")
        if stage.select not in ("average", "greedy"):
            raise UserError(f"{where}: select must be average or greedy, got {stage.select!r}")
        seen.add(stage.name)
    return recipe


def dataset_family(dataset: str) -> str:
    """The recipe files' dataset of a prepared dataset: voc_aug -> voc, coco_voc -> coco."""
    return dataset.split("_")[0]


def default_name(recipe: str, family: str) -> str:
    return f"reproduce-{recipe}-{family}"


def stage_config(
    recipe: Recipe, stage: Stage, cfg: ReproduceConfig, family: str, **fixed: Any
) -> TrainConfig:
    """The TrainConfig of a training stage: base recipe file <- stage.set <- tiny <- --set <- `fixed`."""
    base = CONFIG_DIR / f"{stage.train}_{family}.yaml"
    values = read_yaml(base) if base.is_file() else {"model": stage.train}
    layers = [stage.set]
    if cfg.tiny:
        layers += [recipe.tiny, stage.tiny]
    layers += [cfg.train_overrides, fixed]
    for layer in layers:
        apply_overrides(values, layer)
    if stage.pretrained and cfg.pretrained and not cfg.tiny:
        values["pretrained"] = cfg.pretrained
    return make_config(TrainConfig, values, source=f"recipe {cfg.recipe}: stage {stage.name}")


def run_key(cfg: ReproduceConfig, recipe: Recipe, fingerprint: str) -> str:
    body = json.dumps(
        {
            "cfg": {k: v for k, v in vars(cfg).items() if k != "tracking_uri"},
            "recipe": repr(recipe),
            "data": fingerprint,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def check_stages(recipe: Recipe, cfg: ReproduceConfig, data, family: str) -> None:
    """Every training stage's config and model, checked before the first stage starts."""
    from pipelines.train.trainer import check_model

    for stage in recipe.stages:
        if not stage.train:
            continue
        stage_cfg = stage_config(recipe, stage, cfg, family, data=cfg.data)
        check_model(stage_cfg, data.num_classes)
        if stage.pretrained and not cfg.tiny and not cfg.pretrained:
            raise UserError(
                f"stage {stage.name} starts from ImageNet weights, as the paper does: pass --pretrained "
                f"FILE (torchvision's {stage.train} backbone, .safetensors or .pth), or --tiny for a smoke run"
            )


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


def run_stage(stage: Stage, ctx: dict[str, Any], outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cfg, recipe, family, final = ctx["cfg"], ctx["recipe"], ctx["family"], ctx["final"]
    if stage.train:
        from pipelines.train.trainer import train

        stage_cfg = stage_config(
            recipe,
            stage,
            cfg,
            family,
            data=cfg.data,
            tracking_uri=ctx["tracking_uri"],
            experiment=cfg.experiment,
            storage=ctx["storage"],
            run_name=f"{ctx['prefix']}-{stage.name}",
            parent_run_id=ctx["parent_id"],
            init_from=outputs[stage.init_from]["model_uri"] if stage.init_from else "",
        )
        result = train(stage_cfg)
        return {
            "model_uri": result.model_uri,
            "run_id": result.run_id,
            "val_miou": result.metrics.get("val_miou"),
        }
    from pipelines.select.ensemble import EnsembleConfig, build_ensemble

    members = [member_uri(ref, outputs, ctx["client"], family) for ref in stage.ensemble]
    result = build_ensemble(
        EnsembleConfig(
            candidates=tuple(members),
            data=cfg.data,
            register_as=ctx["register_as"] if stage.name == final else "",
            crf=stage.crf,
            crf_images=stage.crf_images,
            select=stage.select,
            max_members=len(members),
            scratch=storage.join(ctx["storage"], ctx["prefix"], stage.name),
            tracking_uri=ctx["tracking_uri"],
            experiment=cfg.experiment,
            parent_run_id=ctx["parent_id"],
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
    if output["model_uri"].startswith("models:/"):  # an ensemble stage registered it already
        version = tracking.model_version(client, output["model_uri"]).version
    else:
        version = tracking.register_run_model(
            client, name, run_id=output["run_id"], description=f"segpipe reproduce, stage {stage.name}"
        ).version
    tracking.set_alias(client, name, ALIAS, str(version))
    return f"models:/{name}/{version}"


def reproduce(cfg: ReproduceConfig) -> dict[str, Any]:
    """Run (or resume) a recipe on a prepared dataset; returns the stages, the result and the table."""
    from pipelines.data.dataset import open_prepared
    from pipelines.inference.core import InferenceSettings
    from pipelines.inference.evaluate import EvalConfig, evaluate
    from pipelines.jobs.retrain import StepState
    from pipelines.preflight import default_storage
    from pipelines.train.trainer import check_storage

    recipe = load_recipe(cfg.recipe)
    data = open_prepared(cfg.data)
    if "val" not in data.manifest.splits:
        raise UserError(
            f"{cfg.data} has no val split to score the result on; prepare it with --splits train,val"
        )
    family = dataset_family(data.manifest.dataset)
    proposals = None
    if cfg.proposals and not recipe.evaluate_instance:
        raise UserError(
            f"recipe {cfg.recipe} scores whole images; --proposals is for instance-wise recipes (deconvnet)"
        )
    if cfg.proposals:
        from pipelines.inference.proposals import load_proposals

        proposals = load_proposals(cfg.proposals)
    check_stages(recipe, cfg, data, family)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    tracking.check_server(tracking_uri)
    store = check_storage(cfg.storage or default_storage())
    name = cfg.register_as or default_name(cfg.recipe, family)
    key = run_key(cfg, recipe, data.fingerprint)
    prefix = f"{default_name(cfg.recipe, family)}-{key[:8]}"
    state = StepState(storage.join(store, default_name(cfg.recipe, family), key, "state.json"))
    client = tracking.connect(tracking_uri)
    for stage in recipe.stages:  # another recipe's result must exist before any stage starts
        for ref in stage.ensemble:
            if ref.startswith("recipe:"):
                member_uri(ref, {}, client, family)
    parent_id, resumed = tracking.start_or_resume_run(
        client,
        cfg.experiment,
        prefix,
        tags={"segpipe.stage": "reproduce", "segpipe.recipe": cfg.recipe},
        reuse_finished=True,
    )
    print(
        f"[segpipe] reproduce {cfg.recipe} on {family} ({'resumed' if resumed else 'new'}; MLflow run {parent_id})"
    )
    ctx = {
        "cfg": cfg,
        "recipe": recipe,
        "family": family,
        "final": recipe.stages[-1].name,
        "tracking_uri": tracking_uri,
        "storage": store,
        "prefix": prefix,
        "parent_id": parent_id,
        "client": client,
        "register_as": name,
    }
    outputs: dict[str, dict[str, Any]] = {}
    try:
        for number, stage in enumerate(recipe.stages, 1):
            done = state.done(stage.name)
            if done:
                outputs[stage.name] = done["output"]
                print(f"[segpipe] stage {number}/{len(recipe.stages)} {stage.name}: already done, skipped")
                continue
            print(f"[segpipe] stage {number}/{len(recipe.stages)} {stage.name} ...", flush=True)
            started = time.perf_counter()
            outputs[stage.name] = run_stage(stage, ctx, outputs)
            seconds = time.perf_counter() - started
            state.record(stage.name, outputs[stage.name], seconds)
            client.log_metric(parent_id, f"stage_{stage.name}_s", seconds)
        if not state.done("register"):
            model_uri = register_result(client, recipe.stages[-1], outputs[ctx["final"]], name)
            state.record("register", {"model_uri": model_uri}, 0.0)
        model_uri = state.done("register")["output"]["model_uri"]
        spec_crf = bool(outputs[ctx["final"]].get("crf"))
        if not state.done("evaluate"):
            print(f"[segpipe] scoring {model_uri} on val ...", flush=True)
            settings = InferenceSettings(crf=spec_crf, proposals=proposals)
            scores = evaluate(
                EvalConfig(
                    model_uri=model_uri,
                    data=cfg.data,
                    split="val",
                    settings=settings,
                    tracking_uri=tracking_uri,
                )
            )
            summary = {"miou": scores["metrics"]["miou"], "images": scores["images"]}
            state.record("evaluate", summary, scores["seconds"])
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    scores = state.done("evaluate")["output"]
    ours = scores["miou"]
    published = recipe.published.get(family)
    table = {
        "recipe": cfg.recipe,
        "paper": recipe.paper,
        "published": None if published is None else vars(published),
        "ours": {
            "miou": None if ours is None else round(100 * ours, 2),
            "split": f"{family} val ({scores['images']} images)",
        },
        "instance": proposals is not None,
        "crf": spec_crf,
    }
    client.log_dict(parent_id, table, "reproduce.json")
    if ours is not None:
        client.log_metric(parent_id, "val_miou", ours)
    client.set_tag(parent_id, "segpipe.model_uri", model_uri)
    client.set_terminated(parent_id, status="FINISHED")
    seconds = {step: done["seconds"] for step, done in state.data["steps"].items()}
    return {
        "run_id": parent_id,
        "model_uri": model_uri,
        "stages": {s.name: state.done(s.name) for s in recipe.stages},
        "step_seconds": seconds,  # each stage's and the final scoring's, as recorded in the state file
        "seconds": sum(seconds.values()),
        "table": table,
    }


def list_rows() -> list[list[Any]]:
    """`segpipe reproduce --list`: recipe | paper | stages | published number per dataset."""
    rows = []
    for name in recipe_names():
        recipe = load_recipe(name)
        stages = " -> ".join(s.name for s in recipe.stages)
        numbers = "; ".join(
            f"{family}: {p.miou} ({p.model}, {p.split})" for family, p in recipe.published.items()
        )
        rows.append([name, recipe.paper, stages, numbers or "-"])
    return rows
