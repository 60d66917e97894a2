"""Config files: a missing, unknown or ill-typed key is a user error naming the key and the file (exit 2)."""

from __future__ import annotations

import re

import pytest
import yaml

from pipelines.cli import main
from pipelines.config import load_train_config
from pipelines.errors import UserError
from pipelines.jobs.retrain import load_retrain


def test_retrain_file_without_name_exits_2_naming_key_and_file(tmp_path, capsys) -> None:
    path = tmp_path / "retrain.yaml"
    body = {"source": {"dataset": "voc", "root": "x"}, "prepared": "p", "search": {}, "register_as": "m"}
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(UserError, match=f"{path}: missing required key\\(s\\) name;"):
        load_retrain(str(path))
    assert main(["retrain", "--config", str(path)]) == 2
    assert f"{path}: missing required key(s) name" in capsys.readouterr().err

    del body["register_as"], body["prepared"]
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(UserError, match="missing required key\\(s\\) name, prepared, register_as"):
        load_retrain(str(path))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "fcn8s", "epochs": "many"}, "epochs: input should be a valid integer"),
        ({"model": "fcn8s", "epochs": 2.5}, "epochs: input should be a valid integer"),
        ({"model": "fcn8s", "flip": "maybe"}, "flip: input should be a valid boolean"),
        ({"model": "fcn8s", "freeze": "features"}, "freeze: input should be a valid tuple"),
        ({"model": "fcn8s", "model_args": [1, 2]}, "model_args: input should be a valid dictionary"),
        (
            {"model": "fcn8s", "learning_rate": 0.1},
            "unknown key\\(s\\) learning_rate \\(did you mean 'lr'\\?\\)",
        ),
        ({"model": "fcn8s", "crop_mode": "centre"}, "crop_mode='centre' is not valid"),
    ],
)
def test_train_file_with_a_bad_key_exits_2_naming_key_and_file(tmp_path, capsys, body, message) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(body))
    assert main(["train", "--config", str(path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    if "crop_mode" not in body:
        assert str(path) in err


def test_yaml_and_flag_values_are_converted_to_the_field_types(tmp_path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(
        "model: fcn8s\nepochs: '3'\nflip: on\nrun_name: 12\nfreeze: [features, fc6]\nlr: 1.0e-10\n"
    )
    cfg = load_train_config(path, batch_size="2")
    assert (cfg.epochs, cfg.flip, cfg.run_name, cfg.freeze, cfg.lr, cfg.batch_size) == (
        3,
        True,
        "12",
        ("features", "fc6"),
        1e-10,
        2,
    )


def test_retrain_nested_source_and_search_are_typed(tmp_path) -> None:
    path = tmp_path / "retrain.yaml"
    body = {
        "name": "n",
        "source": {"dataset": "voc", "root": "x", "max_side": "big"},
        "prepared": "p",
        "search": {"architectures": {"fcn8s": {"base": {"epochs": 1}}}},
        "register_as": "m",
    }
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(UserError, match=f"{path}: source.max_side: input should be a valid integer"):
        load_retrain(str(path))
    body["source"] = {"dataset": "voc", "root": "x", "colour": 1}
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(UserError, match=f"{path}: unknown key source.colour"):
        load_retrain(str(path))
    body["source"] = {"dataset": "voc", "root": "x"}
    body["search"]["architectures"]["fcn8s"]["base"]["epoch"] = 1
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(
        UserError, match="architectures.fcn8s: unknown key\\(s\\) epoch \\(did you mean 'epochs'\\?\\)"
    ):
        load_retrain(str(path))
    del body["search"]["architectures"]["fcn8s"]["base"]["epoch"]
    path.write_text(yaml.safe_dump(body))
    cfg = load_retrain(str(path))
    assert (cfg.source.dataset, cfg.source.splits, cfg.crf_images) == ("voc", "train,val", 100)


def test_reproduce_recipe_with_a_bad_stage_exits_2(tmp_path, capsys) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump({"paper": "p", "stages": [{"name": "b", "train": "fcn16s", "init_from": "a"}]})
    )
    assert main(["reproduce", str(path), "--data", str(tmp_path)]) == 2
    assert "'a' is not an earlier stage" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"paper": "p", "stages": [{"name": "a", "train": "fcn32s", "lr": 1}]}))
    assert main(["reproduce", str(path), "--data", str(tmp_path)]) == 2
    assert f"{path}: unknown key stages.0.lr" in capsys.readouterr().err
