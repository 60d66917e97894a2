"""`segpipe reproduce`: every paper's procedure end to end with --tiny on the session's generated VOC data."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.cli import main
from pipelines.errors import UserError
from pipelines.jobs.reproduce import (
    ReproduceConfig,
    check_stages,
    list_rows,
    load_recipe,
    recipe_names,
    reproduce,
    stage_config,
)

VAL_IMAGES = 6
RECIPES = ["deconvnet", "deeplab", "dilation", "fcn", "fcn_atonce", "pspnet", "unet"]


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory, ray_session) -> str:
    """A smaller VOC than the session's (16 train, 6 val): a recipe chains up to five training stages."""
    from pipelines.data.prepare import PrepareConfig, prepare
    from pipelines.data.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("reproduce")
    src = synthesize(
        SynthConfig(layout="voc", out=str(root / "src"), num_train=16, num_val=VAL_IMAGES, seed=3)
    )
    out = str(root / "prepared")
    prepare(PrepareConfig(dataset="voc", root=str(src), out=out))
    return out


class FakeData:
    num_classes = 21


def test_every_recipe_and_its_tiny_variant_validate_without_training() -> None:
    assert recipe_names() == RECIPES
    rows = {row[0]: row for row in list_rows()}
    assert "voc: 62.2 (FCN-8s, staged, VOC2012 test)" in rows["fcn"][3]
    assert rows["deconvnet"][2] == "stage1 -> stage2 -> edeconvnet"
    assert "voc: 71.6" in rows["deeplab"][3] and "cityscapes: 67.1" in rows["dilation"][3]
    for name in RECIPES:
        recipe = load_recipe(name)
        check_stages(recipe, ReproduceConfig(recipe=name, data="d", tiny=True), FakeData, "voc")
        if any(stage.pretrained for stage in recipe.stages):
            with pytest.raises(UserError, match="starts from ImageNet weights, as the paper does"):
                check_stages(recipe, ReproduceConfig(recipe=name, data="d"), FakeData, "voc")
    fcn = load_recipe("fcn")
    staged = [stage_config(fcn, s, ReproduceConfig(recipe="fcn", data="d"), "voc") for s in fcn.stages]
    assert [(c.model, c.lr, c.loss_reduction, c.batch_size, c.momentum) for c in staged] == [
        ("fcn32s", 1e-10, "sum", 1, 0.99),
        ("fcn16s", 1e-12, "sum", 1, 0.99),
        ("fcn8s", 1e-14, "sum", 1, 0.99),
    ]
    assert staged[2].model_args == {"at_once": False, "fixed_upsampling": True}
    atonce = load_recipe("fcn_atonce")
    (single,) = [
        stage_config(atonce, s, ReproduceConfig(recipe="fcn_atonce", data="d"), "voc") for s in atonce.stages
    ]
    assert (
        single.model_args == {"at_once": True, "fixed_upsampling": True} and single.loss_reduction == "mean"
    )
    with pytest.raises(
        UserError, match="stage fcn32s starts from ImageNet weights, as the paper does: pass --pretrained"
    ):
        check_stages(fcn, ReproduceConfig(recipe="fcn", data="d"), FakeData, "voc")


def test_list_prints_every_recipe_with_its_stages_and_published_number(capsys) -> None:
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    lines = {
        line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in RECIPES
    }
    assert sorted(lines) == RECIPES
    assert "fcn32s -> fcn16s -> fcn8s" in lines["fcn"] and "62.2" in lines["fcn"]
    assert "72.5" in lines["deconvnet"] and "85.4" in lines["pspnet"] and "92.03" in lines["unet"]

    assert main(["reproduce", "fcn"]) == 2
    assert "give a RECIPE and --data PREPARED" in capsys.readouterr().err


def tiny(name: str, data, mlflow_uri, tmp_path, **values) -> ReproduceConfig:
    return ReproduceConfig(
        recipe=name,
        data=data,
        tiny=True,
        tracking_uri=mlflow_uri,
        storage=str(tmp_path / "ray"),
        train_overrides={"val_batch_size": 6},
        **values,
    )


def children(client: MlflowClient, run_id: str) -> dict[str, object]:
    exp = client.get_run(run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    return {r.data.tags.get("mlflow.runName", r.info.run_name): r for r in runs}


@pytest.mark.slow
def test_fcn_staged_then_edeconvnet_on_proposals(small_voc, mlflow_uri, tmp_path, capsys) -> None:
    """FCN 32s -> 16s -> 8s, each from the last; then DeconvNet stage 1 -> stage 2 -> EDeconvNet with the
    FCN result, scored instance-wise; re-running a finished recipe does nothing new."""
    client = tracking.connect(mlflow_uri)  # a bare MlflowClient would take another test's registry
    args = [
        "--tiny",
        "--data",
        small_voc,
        "--tracking-uri",
        mlflow_uri,
        "--storage",
        str(tmp_path / "ray"),
    ]
    assert main(["reproduce", "deconvnet", *args]) == 2  # EDeconvNet needs the FCN result: refused up front
    assert "run `segpipe reproduce fcn` on the same data first" in capsys.readouterr().err
    assert (
        main(
            ["reproduce", "fcn", *args, "--set", "val_batch_size=6", "--json-out", str(tmp_path / "fcn.json")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "62.2" in out and "VOC2012 test" in out
    fcn = json.loads((tmp_path / "fcn.json").read_text())
    assert set(fcn["stages"]) == {"fcn32s", "fcn16s", "fcn8s"}  # (the JSON file sorts its keys)
    assert fcn["model_uri"] == "models:/reproduce-fcn-voc/1"
    assert fcn["table"]["published"] == {"miou": 62.2, "split": "VOC2012 test", "model": "FCN-8s, staged"}
    assert (
        0 <= fcn["table"]["ours"]["miou"] <= 100
        and fcn["table"]["ours"]["split"] == f"voc val ({VAL_IMAGES} images)"
    )
    runs = children(client, fcn["run_id"])
    stage_runs = [runs[n] for n in sorted(runs) if n.endswith(("fcn32s", "fcn16s", "fcn8s"))]
    assert len(stage_runs) == 3
    by_model = {r.data.tags["segpipe.model"]: r for r in stage_runs}
    # Each later stage starts from the one before: everything but its new score layers is copied.
    assert by_model["fcn16s"].data.params["cfg.init_from"] == fcn["stages"]["fcn32s"]["output"]["model_uri"]
    assert by_model["fcn16s"].data.params["init_from.kept"] == "4"  # score_pool4 w+b, upscore2, upscore16
    assert by_model["fcn8s"].data.params["init_from.kept"] == "4"  # score_pool3 w+b, upscore_pool4, upscore8
    assert by_model["fcn8s"].data.params["cfg.loss_reduction"] == "sum"
    assert str(client.get_model_version_by_alias("reproduce-fcn-voc", "reproduced").version) == "1"

    # A finished recipe re-run: every stage, the registration and the score come from its state.
    again = reproduce(tiny("fcn", small_voc, mlflow_uri, tmp_path))
    assert again["model_uri"] == fcn["model_uri"] and again["table"] == fcn["table"]
    assert "fcn32s: already done, skipped" in capsys.readouterr().out

    proposals = tmp_path / "proposals.json"
    from pipelines.data.dataset import open_prepared

    ids = open_prepared(small_voc).split("val", columns=["image_id"]).to_pandas()["image_id"]
    proposals.write_text(json.dumps({i: [[0, 0, 40, 40], [10, 10, 60, 50]] for i in ids}))
    deconv = reproduce(tiny("deconvnet", small_voc, mlflow_uri, tmp_path, proposals=str(proposals)))
    assert list(deconv["stages"]) == ["stage1", "stage2", "edeconvnet"]
    assert deconv["table"]["instance"] is True and deconv["table"]["published"]["miou"] == 72.5
    runs = children(client, deconv["run_id"])
    modes = {r.data.params.get("cfg.crop_mode") for r in runs.values()}
    assert {"object", "proposal"} <= modes
    ensemble = [r for r in runs.values() if r.data.tags.get("segpipe.stage") == "ensemble"]
    (edeconv,) = ensemble
    members = edeconv.data.params["members"].split(",")
    assert members == [
        deconv["stages"]["stage2"]["output"]["model_uri"],
        "models:/reproduce-fcn-voc@reproduced",
    ]
    assert edeconv.data.params["weights"] == "0.500,0.500"

    # The registered EDeconvNet segments a split instance-wise; an image without proposals is refused.
    out = tmp_path / "masks"
    predict = [
        "predict",
        "--model-uri",
        deconv["model_uri"],
        "--input",
        f"{small_voc}:val",
        "--out",
        str(out),
    ]
    assert main([*predict, "--instance", str(proposals), "--tracking-uri", mlflow_uri]) == 0
    assert len(list(out.rglob("*.png"))) == len(ids)
    proposals.write_text(json.dumps({ids[0]: []}))
    assert (
        main(
            [
                *predict,
                "--instance",
                str(proposals),
                "--tracking-uri",
                mlflow_uri,
                "--out",
                str(tmp_path / "m2"),
            ]
        )
        == 2
    )
    assert f"no proposals for {len(ids) - 1} image(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_deeplab_msc_with_crf_and_dilation_context_on_a_fixed_front_end(
    small_voc, mlflow_uri, tmp_path
) -> None:
    from segmodels.weights import read_state_dict

    deeplab = reproduce(tiny("deeplab", small_voc, mlflow_uri, tmp_path))
    assert list(deeplab["stages"]) == ["largefov", "msc", "crf"]
    assert deeplab["table"]["published"]["miou"] == 71.6
    client = tracking.connect(mlflow_uri)  # a bare MlflowClient would take another test's registry
    runs = children(client, deeplab["run_id"])
    msc = next(r for r in runs.values() if r.data.params.get("cfg.model_args", "").find("'msc': True") >= 0)
    assert int(msc.data.params["init_from.copied"]) > 0 and int(msc.data.params["init_from.kept"]) > 0
    (crf_run,) = [r for r in runs.values() if r.data.tags.get("segpipe.stage") == "ensemble"]
    assert crf_run.data.params["selection_images"] == str(VAL_IMAGES)

    dilation = reproduce(tiny("dilation", small_voc, mlflow_uri, tmp_path))
    assert list(dilation["stages"]) == ["front_end", "context"]
    front = tracking.download_model(dilation["stages"]["front_end"]["output"]["model_uri"], mlflow_uri)
    context = tracking.download_model(dilation["stages"]["context"]["output"]["model_uri"], mlflow_uri)
    before = read_state_dict(front / "member0.safetensors")
    after = read_state_dict(context / "member0.safetensors")
    # The context stage trained only its context module: the front end is the first stage's, exactly.
    assert set(before) < set(after) and all(k.startswith("context.") for k in set(after) - set(before))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_single_stage_recipe_fcn_at_once(small_voc, mlflow_uri, tmp_path) -> None:
    """One stage with the paper's recipe file (the U-Net and PSPNet recipes are the same path; each of
    their tiny configs is built and checked above, and `segpipe train` runs both architectures elsewhere)."""
    name = "fcn_atonce"
    result = reproduce(tiny(name, small_voc, mlflow_uri, tmp_path))
    assert list(result["stages"]) == [load_recipe(name).stages[0].name]
    assert result["model_uri"] == f"models:/reproduce-{name}-voc/1"
    assert result["table"]["ours"]["miou"] is not None
