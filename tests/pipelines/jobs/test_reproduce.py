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
    Splits,
    check_stages,
    load_recipe,
    recipe_names,
    reproduce,
    resolve_splits,
    result_table,
    scoring_settings,
    stage_config,
    table_row,
)
from pipelines.model_uri import fetched_model

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
    for name in RECIPES:
        recipe = load_recipe(name)
        for family in ("voc", "cityscapes", *{"pspnet": ["ade20k"], "dilation": ["camvid"]}.get(name, [])):
            check_stages(recipe, ReproduceConfig(recipe=name, data="d", tiny=True), FakeData, family)
        if any(stage.pretrained for stage in recipe.stages):
            with pytest.raises(UserError, match="starts from ImageNet weights, as the paper does"):
                check_stages(recipe, ReproduceConfig(recipe=name, data="d"), FakeData, "voc")
    with pytest.raises(
        UserError, match="stage fcn32s starts from ImageNet weights, as the paper does: pass --pretrained"
    ):
        check_stages(load_recipe("fcn"), ReproduceConfig(recipe="fcn", data="d"), FakeData, "voc")


def configs(name: str, family: str = "voc", **cfg) -> dict[str, object]:
    recipe = load_recipe(name)
    run = ReproduceConfig(recipe=name, data="d", **cfg)
    return {s.name: stage_config(recipe, s, run, family) for s in recipe.stages_for(family) if s.train}


def test_recipes_follow_the_reference_solvers_splits_and_units() -> None:
    """The values each recipe trains with, as its reference's solver / config states them."""
    staged = configs("fcn")
    assert [
        (c.model, c.lr, c.loss_reduction, c.max_iters, c.batch_size, c.iter_size, c.momentum, c.flip)
        for c in staged.values()
    ] == [
        ("fcn32s", 1e-10, "sum", 100_000, 1, 1, 0.99, False),
        ("fcn16s", 1e-12, "sum", 100_000, 1, 1, 0.99, False),
        ("fcn8s", 1e-14, "sum", 100_000, 1, 1, 0.99, False),
    ]
    assert {(c.train_split, c.val_split, c.scale_min, c.scale_max) for c in staged.values()} == {
        ("sbd_train", "seg11valid", 1.0, 1.0)
    }
    assert staged["fcn8s"].model_args == {"at_once": False, "fixed_upsampling": True}
    (atonce,) = configs("fcn_atonce").values()
    assert (atonce.lr, atonce.loss_reduction, atonce.max_iters, atonce.flip) == (1e-10, "sum", 300_000, False)
    assert atonce.model_args == {"at_once": True, "fixed_upsampling": True}
    # Caffe's input (BGR 0-255 minus the mean), which the 1e-10 rates assume; every stage keeps its final snapshot.
    assert {(c.input_convention, c.keep) for c in [*staged.values(), atonce]} == {("caffe_bgr", "final")}

    deconv = configs("deconvnet")
    assert [
        (c.crop_mode, c.lr, c.lr_policy, c.step_iters, c.max_iters, c.batch_size, c.iter_size)
        for c in deconv.values()
    ] == [("object", 0.01, "step", 9000, 20_000, 64, 8), ("proposal", 0.01, "step", 10_000, 40_000, 64, 8)]
    assert deconv["stage1"].train_split == "train_aug" and deconv["stage1"].val_split == "val"

    voc, city = configs("dilation"), configs("dilation", "cityscapes")
    assert list(voc) == ["front_end", "context"] and list(city) == ["front_end", "context", "joint"]
    assert (city["front_end"].crop, city["front_end"].batch_size, city["front_end"].max_iters) == (
        628,
        8,
        40_000,
    )
    assert (city["joint"].lr, city["joint"].max_iters, city["joint"].freeze) == (1e-5, 60_000, ())
    assert (
        city["context"].model_args["context"] == "basic"
        and city["context"].model_args["context_layers"] == 10
    )
    assert voc["context"].model_args["context"] == "large"
    # The context stage does not inherit the front end's momentum 0.99 (a 10x larger step).
    assert {c.momentum for c in (voc["context"], city["context"], city["joint"])} == {0.9}
    assert voc["front_end"].momentum == 0.99

    camvid = configs("dilation", "camvid")  # Dilation8: the basic context module of 8 layers
    assert list(camvid) == ["front_end", "context"]
    assert camvid["context"].model_args == {"context": "basic", "context_layers": 8, "padding": "valid"}
    assert (camvid["front_end"].crop, camvid["front_end"].max_iters, camvid["front_end"].momentum) == (
        360,
        40_000,
        0.99,
    )
    (ade,) = configs("pspnet", "ade20k").values()  # hszhao/semseg config/ade20k/ade20k_pspnet50.yaml
    assert (ade.crop, ade.epochs, ade.batch_size, ade.aux_weight, ade.lr) == (473, 100, 16, 0.4, 0.01)

    recipe = load_recipe("deeplab")
    assert recipe.published["voc"].miou == 68.7 and recipe.published["voc"].scored_on == "val"
    assert configs("deeplab")["largefov"].train_split == "train_aug"
    assert configs("fcn", tiny=True)["fcn32s"].epochs == 1  # --tiny stays one short epoch


def test_splits_are_the_papers_or_refused_with_a_fix_and_tiny_falls_back() -> None:
    fcn = load_recipe("fcn")
    aug = ["train_aug", "val", "sbd_train", "seg11valid"]
    assert resolve_splits(fcn, ReproduceConfig(recipe="fcn", data="d"), "voc", aug) == (
        Splits("sbd_train", "seg11valid"),
        "",
    )
    with pytest.raises(UserError, match="has no 'sbd_train', 'seg11valid'.*--dataset voc_aug"):
        resolve_splits(fcn, ReproduceConfig(recipe="fcn", data="d"), "voc", ["train", "val"])
    splits, note = resolve_splits(
        fcn, ReproduceConfig(recipe="fcn", data="d", tiny=True), "voc", ["train", "val"]
    )
    assert splits == Splits() and "--tiny used train / val" in note
    chosen = ReproduceConfig(
        recipe="fcn", data="d", train_overrides={"train_split": "train_aug", "val_split": "val"}
    )
    assert resolve_splits(fcn, chosen, "voc", aug)[0] == Splits("train_aug", "val")
    assert (
        resolve_splits(fcn, ReproduceConfig(recipe="fcn", data="d"), "cityscapes", ["train", "val"])[0]
        == Splits()
    )


def test_each_recipe_scores_with_its_papers_test_time_procedure() -> None:
    splits = Splits("train_aug", "val")
    psp = load_recipe("pspnet")
    settings, described = scoring_settings(
        psp, ReproduceConfig(recipe="pspnet", data="d"), "voc", splits, None, False
    )
    assert (settings.slide, settings.flip, settings.scales) == ((473, 316), True, (1.0,))  # semseg: 2/3
    assert described == "slide 473/316 + flip"
    settings, _ = scoring_settings(
        psp, ReproduceConfig(recipe="pspnet", data="d", multi_scale=True), "cityscapes", Splits(), None, False
    )
    assert settings.slide == (713, 476) and settings.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    tiny_settings, _ = scoring_settings(
        psp, ReproduceConfig(recipe="pspnet", data="d", tiny=True), "voc", splits, None, False
    )
    assert tiny_settings.slide == (64, 43)  # windows of the (tiny) training crop
    deconv = load_recipe("deconvnet")
    settings, described = scoring_settings(
        deconv, ReproduceConfig(recipe="deconvnet", data="d"), "voc", splits, {}, False
    )
    assert settings.crf and settings.crf_params == {  # the release's fixed CRF
        "w1": 5.0,
        "theta_alpha": 20.0,
        "theta_beta": 3.0,
        "w2": 3.0,
        "theta_gamma": 3.0,
        "iterations": 10,
    }
    assert settings.slide is None and not settings.flip and "instance-wise" in described
    fcn = load_recipe("fcn")
    settings, described = scoring_settings(
        fcn, ReproduceConfig(recipe="fcn", data="d"), "voc", splits, None, False
    )
    assert (settings.slide, settings.flip, settings.crf, described) == (None, False, False, "whole image")
    with pytest.raises(UserError, match="no multi-scale test on voc: drop --multi-scale"):
        scoring_settings(
            fcn, ReproduceConfig(recipe="fcn", data="d", multi_scale=True), "voc", splits, None, False
        )


def test_pspnet_recipe_scoring_slides_windows_with_flip(tmp_path) -> None:
    """The settings the PSPNet recipe scores with run the sliding window + flip prediction."""
    import numpy as np

    import segmodels
    from pipelines.inference.core import predict_image
    from segmodels.artifact import MemberSpec, ModelSpec, load_model_dir, save_model_dir
    from segmodels.inference import predict_tta

    torch.manual_seed(0)
    net = segmodels.build_model("pspnet", 3, backbone="resnet18")
    member = MemberSpec(
        arch="pspnet", num_classes=3, weights="m.safetensors", model_args={"backbone": "resnet18"}
    )
    spec = ModelSpec.single("psp", member, ["a", "b", "c"], [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    model = load_model_dir(save_model_dir(tmp_path / "model", spec, [net.state_dict()]))
    recipe = load_recipe("pspnet")
    settings, _ = scoring_settings(
        recipe, ReproduceConfig(recipe="pspnet", data="d", tiny=True), "voc", Splits(), None, False
    )
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)  # 2 windows
    probs = predict_image(model, image, settings)
    x = model.normalize(torch.from_numpy(image[None].copy()))
    expected = predict_tta(model.ensemble, x, flip=True, mode="slide", crop=64, stride=43)[0]
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    whole = predict_tta(model.ensemble, x)[0]
    assert not np.allclose(probs, whole.numpy(), atol=1e-4)  # windows and flip changed the prediction


def test_result_table_names_the_split_and_flags_a_published_number_on_another() -> None:
    scores = {"miou": 0.5, "images": 6}
    last = {"val_miou": 0.5, "best_epoch": {"miou": 0.6, "epoch": 3}}
    deeplab = result_table(
        load_recipe("deeplab"),
        ReproduceConfig(recipe="deeplab", data="d"),
        "voc",
        Splits("train_aug", "val"),
        scores,
        "whole image + CRF tuned on val",
        last,
        "",
    )
    assert deeplab["same_split"] and deeplab["note"] == ""
    assert (deeplab["ours"]["miou"], deeplab["best_epoch"]["miou"], deeplab["ours"]["split"]) == (
        50.0,
        60.0,
        "val (6 images)",
    )
    assert deeplab["ours"]["model"] == "final snapshot of each training stage"
    assert deeplab["best_epoch"]["epoch"] == 3
    assert table_row(deeplab)[:6] == [
        "deeplab",
        68.7,
        "VOC2012 val (1,449 images)",
        50.0,
        60.0,
        "val (6 images)",
    ]
    deconv = result_table(
        load_recipe("deconvnet"),
        ReproduceConfig(recipe="deconvnet", data="d"),
        "voc",
        Splits("train_aug", "val"),
        scores,
        "whole image",
        last,
        "",
    )
    assert (
        not deconv["same_split"] and "the published number is on VOC2012 test, ours on val" in deconv["note"]
    )
    psp = result_table(
        load_recipe("pspnet"),
        ReproduceConfig(recipe="pspnet", data="d", multi_scale=True),
        "voc",
        Splits("train_aug", "val"),
        scores,
        "slide",
        last,
        "",
    )
    assert psp["published"]["miou"] == 78.02 and psp["same_split"]


def test_list_prints_every_recipe_with_its_stages_and_published_number(capsys) -> None:
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.split() and line.split()[0] in RECIPES]
    assert sorted({line.split()[0] for line in lines}) == RECIPES
    rows = {(line.split()[0], line.split()[1]): line for line in lines}
    fcn = rows[("fcn", "voc")]
    assert "fcn32s 100k it x 1 -> fcn16s 100k it x 1 -> fcn8s 100k it x 1" in fcn
    assert "sbd_train -> seg11valid" in fcn and "65.5" in fcn
    assert "front_end 40k it x 8 -> context" in rows[("dilation", "cityscapes")]
    assert "joint 60k it x 8" in rows[("dilation", "cityscapes")] and "joint" not in rows[("dilation", "voc")]
    assert "stage1 20k it x 64 -> stage2 40k it x 64" in rows[("deconvnet", "voc")]
    assert "68.7" in rows[("deeplab", "voc")] and "77.05" in rows[("pspnet", "voc")]
    assert "92.03" in rows[("unet", "cells")]
    assert "41.89" in rows[("pspnet", "ade20k")] and "65.3" in rows[("dilation", "camvid")]

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
    assert "65.5" in out and "seg11valid (736 images)" in out and "--tiny used train / val" in out
    fcn = json.loads((tmp_path / "fcn.json").read_text())
    assert set(fcn["stages"]) == {"fcn32s", "fcn16s", "fcn8s"}  # (the JSON file sorts its keys)
    assert fcn["model_uri"] == "models:/reproduce-fcn-voc/1"
    assert fcn["table"]["published"] == {
        "miou": 65.5,
        "split": "seg11valid (736 images)",
        "scored_on": "seg11valid",
        "model": "FCN-8s, staged",
    }
    assert not fcn["table"]["same_split"] and fcn["table"]["train_split"] == "train"  # the tiny fallback
    assert (
        0 <= fcn["table"]["ours"]["miou"] <= 100
        and fcn["table"]["ours"]["split"] == f"val ({VAL_IMAGES} images)"
        and 0 <= fcn["table"]["best_epoch"]["miou"] <= 100
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
    assert deconv["table"]["crf"] and "fixed CRF" in deconv["table"]["ours"]["test"]  # the release's CRF
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
    assert deeplab["table"]["published"]["miou"] == 68.7 and deeplab["table"]["same_split"] is True
    client = tracking.connect(mlflow_uri)  # a bare MlflowClient would take another test's registry
    runs = children(client, deeplab["run_id"])
    msc = next(r for r in runs.values() if r.data.params.get("cfg.model_args", "").find("'msc': True") >= 0)
    assert int(msc.data.params["init_from.copied"]) > 0 and int(msc.data.params["init_from.kept"]) > 0
    (crf_run,) = [r for r in runs.values() if r.data.tags.get("segpipe.stage") == "ensemble"]
    assert crf_run.data.params["selection_images"] == str(VAL_IMAGES)

    dilation = reproduce(tiny("dilation", small_voc, mlflow_uri, tmp_path))
    assert list(dilation["stages"]) == ["front_end", "context"]
    with fetched_model(dilation["stages"]["front_end"]["output"]["model_uri"], mlflow_uri) as front:
        before = read_state_dict(front / "member0.safetensors")
    with fetched_model(dilation["stages"]["context"]["output"]["model_uri"], mlflow_uri) as context:
        after = read_state_dict(context / "member0.safetensors")
    # The context stage trained only its context module: the front end is the first stage's, exactly.
    assert set(before) < set(after) and all(k.startswith("context.") for k in set(after) - set(before))
    assert all(torch.equal(before[k], after[k]) for k in before)
