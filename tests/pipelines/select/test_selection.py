"""Search and selection: Ray Tune with ASHA, evaluation modes, ensemble selection, registry promotion."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines import tracking
from pipelines.cli import main
from pipelines.errors import UserError
from pipelines.inference.core import InferenceSettings
from pipelines.inference.evaluate import EvalConfig, evaluate
from pipelines.model_uri import fetched_model
from pipelines.select.ensemble import EnsembleConfig, build_ensemble
from pipelines.select.promote import PromoteConfig, promote
from pipelines.train.tune import parse_search, tune_search

pytestmark = pytest.mark.slow

UNET = {
    "model_args": {"width": 0.125, "padding": "same"},
    "optimizer": "adamw",
    "crop": 64,
    "batch_size": 4,
    "epochs": 2,
    "scale_min": 0.75,
    "scale_max": 1.25,
    "num_overlays": 1,
    "cpus_per_worker": 1.0,
}
PSP = {**UNET, "model_args": {"backbone": "resnet18"}, "lr": 1e-3, "epochs": 1}


def search_body(data: str, uri: str, storage: str, name: str = "sel") -> dict:
    # A grid makes ASHA's decision deterministic: the good lr finishes first (one trial at a time), then the
    # near-zero learning rate falls below it at the first rung and is stopped there.
    return {
        "data": data,
        "name": name,
        "experiment": "selection",
        "tracking_uri": uri,
        "storage": storage,
        "num_samples": 1,
        "max_concurrent": 1,
        "grace_period": 1,
        "reduction_factor": 2,
        "architectures": {
            "unet": {"base": UNET, "space": {"lr": {"grid": [3e-3, 1e-7]}}},
            "pspnet": {"base": PSP, "space": {"weight_decay": {"choice": [1e-4]}}},
        },
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("selection")
    return {"uri": f"sqlite:///{root / 'mlflow.db'}", "storage": str(root / "ray"), "root": root}


@pytest.fixture(scope="module")
def searched(prepared_voc, store) -> dict:
    search, archs = parse_search(search_body(prepared_voc, store["uri"], store["storage"]), source="test")
    return tune_search(search, archs)


def test_tune_completes_and_asha_stops_weak_trials(searched, store):
    unet = searched["architectures"]["unet"]
    assert len(unet["trials"]) == 2
    stopped = [t for t in unet["trials"] if t["iterations"] < UNET["epochs"]]
    assert stopped, f"ASHA stopped nothing: {unet['trials']}"
    assert all(t["status"] == "KILLED" for t in stopped)
    assert unet["best"]["status"] == "FINISHED" and unet["best"]["model_uri"].startswith("runs:/")
    assert searched["architectures"]["pspnet"]["best"]["model_uri"].startswith("runs:/")
    client = tracking.connect(store["uri"])
    parent = client.get_run(searched["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 3


def test_rerunning_a_finished_search_restores_it(searched, prepared_voc, store):
    search, archs = parse_search(search_body(prepared_voc, store["uri"], store["storage"]), source="test")
    again = tune_search(search, archs)
    assert again["parent_run_id"] == searched["parent_run_id"]
    assert (
        again["architectures"]["unet"]["best"]["run_id"]
        == searched["architectures"]["unet"]["best"]["run_id"]
    )


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lr": {"logunifrom": [1e-4, 1e-2]}}, "expected one of"),
        ({"lr": {"loguniform": [1e-2, 1e-4]}}, "low < high"),
        ({"learning_rate": {"choice": [0.1]}}, "did you mean 'lr'"),
        ({"model": {"choice": ["fcn8s"]}}, "set by `segpipe tune` itself"),
    ],
)
def test_typo_in_search_space_fails_before_any_trial(space, message, prepared_voc, tmp_path):
    body = search_body(prepared_voc, f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path / "ray"))
    body["architectures"] = {"unet": {"base": UNET, "space": space}}
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_search(body, source="search.yaml")
    assert not (tmp_path / "db.sqlite").exists()


def test_bad_base_value_fails_before_any_trial(prepared_voc, tmp_path):
    body = search_body(prepared_voc, f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path / "ray"))
    body["architectures"] = {"unet": {"base": {**UNET, "model_args": {"widht": 0.1}}, "space": {}}}
    search, archs = parse_search(body, source="search.yaml")
    with pytest.raises(UserError, match="cannot build unet"):
        tune_search(search, archs)
    assert not (tmp_path / "ray" / "sel-unet").exists()


def test_evaluate_whole_slide_tta_and_crf(searched, prepared_voc, store, tmp_path, downloads_removed):
    uri = searched["architectures"]["unet"]["best"]["model_uri"]
    results = {}
    for label, settings in {
        "whole": InferenceSettings(),
        "slide": InferenceSettings(slide=(64, 48)),
        "crf": InferenceSettings(crf=True),
    }.items():
        results[label] = evaluate(
            EvalConfig(model_uri=uri, data=prepared_voc, settings=settings, tracking_uri=store["uri"])
        )
    # Multi-scale + flip through the command line, its JSON the same result.
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model-uri", uri, "--data", prepared_voc, "--tta", "0.75,1,1.25", "--flip",
                 "--tracking-uri", store["uri"], "--json-out", str(out)]) == 0  # fmt: skip
    results["tta"] = json.loads(out.read_text())
    assert set(results["tta"]["metrics"]) == {"miou", "pixel_acc", "mean_acc", "fwiou", "per_class_iou"}
    for label, result in results.items():
        m = result["metrics"]
        assert result["images"] == 12, label
        assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["pixel_acc"] <= 1.0, label
        assert set(m["per_class_iou"]) >= {"background", "aeroplane"}
        print(
            f"{label}: mIoU {m['miou']:.4f} pixel acc {m['pixel_acc']:.4f} ({result['images_per_s']:.1f} img/s)"
        )
    # The training run's own val mIoU was computed the same way (whole image): same number.
    best = searched["architectures"]["unet"]["best"]
    assert results["whole"]["metrics"]["miou"] == pytest.approx(best["val_miou"], abs=1e-6)


def test_ensemble_scores_at_least_its_best_member_and_is_registered(
    searched, prepared_voc, store, downloads_removed
):
    candidates = tuple(a["best"]["model_uri"] for a in searched["architectures"].values())
    result = build_ensemble(
        EnsembleConfig(
            candidates=candidates,
            data=prepared_voc,
            register_as="sel-model",
            tracking_uri=store["uri"],
            experiment="selection",
            crf=True,
            crf_grid="small",  # DeepLab's 54-setting grid runs in the reproduce test
        )
    )
    best_member = max(result["candidates"].values())
    assert result["metrics"]["miou"] >= best_member - 1e-9
    assert result["model_uri"] == "models:/sel-model/1"
    client = tracking.connect(store["uri"])
    assert tracking.alias_version(client, "sel-model", "challenger") == "1"

    from segmodels.artifact import load_model_dir

    with fetched_model(result["model_uri"], store["uri"]) as folder:
        model = load_model_dir(folder)
    assert abs(sum(model.spec.ensemble_weights) - 1.0) < 1e-6
    assert model.spec.dataset_fingerprint and model.spec.metrics["val_miou"] == result["metrics"]["miou"]
    with torch.no_grad():
        probs = model.ensemble(torch.zeros(1, 3, 40, 56))
    assert probs.shape == (1, 21, 40, 56) and torch.allclose(probs.sum(1), torch.ones(1, 40, 56), atol=1e-4)


def test_promote_moves_champion_only_on_improvement(searched, prepared_voc, store, tmp_path):
    # Version 1 (from the ensemble test, or made here) becomes champion: there is none yet.
    client = tracking.connect(store["uri"])
    if not client.search_model_versions("name='sel-model'"):
        test_ensemble_scores_at_least_its_best_member_and_is_registered(searched, prepared_voc, store, None)
    first = promote(PromoteConfig(name="sel-model", data=prepared_voc, tracking_uri=store["uri"]))
    assert first["promoted"] and first["reason"] == "no champion yet"
    assert tracking.alias_version(client, "sel-model", "champion") == "1"

    # An untrained network as the only candidate: a worse challenger (version 2) must not be promoted.
    from pipelines.data.dataset import open_prepared
    from segmodels import build_model
    from segmodels.artifact import MemberSpec, ModelSpec, save_model_dir

    data = open_prepared(prepared_voc)
    torch.manual_seed(0)
    net = build_model("unet", 21, width=0.125, padding="same")
    member = MemberSpec(
        arch="unet",
        num_classes=21,
        weights="member0.safetensors",
        model_args={"width": 0.125, "padding": "same"},
    )
    spec = ModelSpec.single("untrained", member, data.classes, data.palette)
    folder = save_model_dir(tmp_path / "untrained", spec, [net.state_dict()])
    build_ensemble(
        EnsembleConfig(
            candidates=(str(folder),),
            data=prepared_voc,
            register_as="sel-model",
            tracking_uri=store["uri"],
            experiment="selection",
        )
    )
    second = promote(PromoteConfig(name="sel-model", data=prepared_voc, tracking_uri=store["uri"]))
    assert not second["promoted"], second
    assert second["challenger"]["miou"] < second["champion"]["miou"]
    assert tracking.alias_version(client, "sel-model", "champion") == "1"
    assert client.get_model_version("sel-model", "2").tags["promotion"] == "rejected"
    assert float(client.get_model_version("sel-model", "1").tags["eval_val_miou"]) == pytest.approx(
        second["champion"]["miou"], abs=1e-6
    )  # the tag keeps six decimals

    # The better one as challenger against the worse one as champion, with a margin it does not clear.
    tracking.set_alias(client, "sel-model", "champion", "2")
    tracking.set_alias(client, "sel-model", "challenger", "1")
    margin = second["champion"]["miou"] - second["challenger"]["miou"] + 0.01
    third = promote(
        PromoteConfig(name="sel-model", data=prepared_voc, tracking_uri=store["uri"], margin=margin)
    )
    assert not third["promoted"] and f"(margin {margin}): kept champion" in third["reason"], third
    assert tracking.alias_version(client, "sel-model", "champion") == "2"
    with pytest.raises(UserError, match="--margin must be >= 0"):
        promote(PromoteConfig(name="sel-model", data=prepared_voc, tracking_uri=store["uri"], margin=-0.1))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/no-such-model@champion", "has no alias 'champion'"),
        ("models:/no-such-model/7", "has no version '7'"),
        ("models:/just-a-name", "must be models:/NAME/VERSION"),
        ("runs:/0123456789abcdef/model", "cannot fetch model"),
        ("{tmp}", "has no model.json"),
        ("ftp://example.invalid/model", "unsupported model URI"),
    ],
)
def test_bad_model_uri_or_alias_is_a_clear_error(uri, message, prepared_voc, store, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--model-uri",
            uri.replace("{tmp}", str(tmp_path)),
            "--data",
            prepared_voc,
            "--tracking-uri",
            store["uri"],
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
