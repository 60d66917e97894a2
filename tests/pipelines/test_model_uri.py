"""Model URIs: one parser for every stage, pinning an alias, and downloads that do not outlive their use."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.model_uri import ModelUri, fetched_model


def test_every_form_parses_and_prints_back(tmp_path, monkeypatch):
    run = ModelUri.parse("runs:/abc123/model")
    assert (run.kind, run.run_id, str(run)) == ("run", "abc123", "runs:/abc123/model")
    version = ModelUri.parse("models:/seg/3")
    assert (version.kind, version.name, version.version, version.is_alias) == ("registry", "seg", "3", False)
    alias = ModelUri.parse("models:/seg@champion")
    assert (alias.name, alias.alias, alias.is_alias, str(alias)) == (
        "seg",
        "champion",
        True,
        "models:/seg@champion",
    )
    assert (
        version.is_version_of("seg") and not alias.is_version_of("seg") and not version.is_version_of("other")
    )
    monkeypatch.chdir(tmp_path)
    folder = ModelUri.parse("models-folder")  # a relative folder is made absolute: workers run elsewhere
    assert (folder.kind, folder.uri) == ("folder", str(tmp_path / "models-folder"))
    assert ModelUri.parse("s3://bucket/model").kind == "artifact"
    for bad, message in [
        ("models:/just-a-name", "models:/NAME/VERSION or models:/NAME@ALIAS"),
        ("models:/seg/latest", "models:/NAME/VERSION"),
        ("runs:/", "runs:/RUN_ID/model"),
        ("ftp://host/model", "unsupported model URI"),
        ("", "no model URI"),
    ]:
        with pytest.raises(UserError, match=message):
            ModelUri.parse(bad)


def test_alias_pins_to_its_version_and_downloads_are_removed(model_folder, mlflow_uri):
    folder = model_folder(["background", "thing"], [[0, 0, 0], [200, 0, 0]])
    client = tracking.connect(mlflow_uri)
    run_id, _ = tracking.start_or_resume_run(client, "uri", "model")
    version = tracking.register_model_folder(client, "uri-seg", folder, run_id=run_id)
    tracking.set_alias(client, "uri-seg", "champion", version.version)
    assert version.source == f"models:/{tracking.run_model_id(client, run_id)}"  # made from the LoggedModel
    pinned = ModelUri.parse("models:/uri-seg@champion").pinned(mlflow_uri)
    assert str(pinned) == f"models:/uri-seg/{version.version}" and not pinned.is_alias
    with fetched_model(pinned, mlflow_uri) as fetched:
        assert (fetched / "model.json").is_file() and fetched != folder
    assert not fetched.exists()
    with pytest.raises(RuntimeError), fetched_model(f"runs:/{run_id}/model", mlflow_uri) as fetched:
        raise RuntimeError("the block failed")
    assert not fetched.exists()  # removed on errors too
    with fetched_model(str(folder)) as local:  # the operator's own folder: used in place, kept
        assert Path(local) == folder
    assert folder.is_dir()


def test_a_model_logged_the_old_way_still_loads_and_registers(model_folder, mlflow_uri):
    """Before MLflow 3's LoggedModels, the pyfunc model was the run's plain `model` artifact."""
    import tempfile

    folder = model_folder(["background", "thing"], [[0, 0, 0], [200, 0, 0]])
    client = tracking.connect(mlflow_uri)
    run_id, _ = tracking.start_or_resume_run(client, "uri", "old-style")
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifacts(run_id, str(tracking.save_pyfunc(folder, Path(tmp) / "model")), "model")
    assert tracking.run_model_id(client, run_id) is None
    with fetched_model(f"runs:/{run_id}/model", mlflow_uri) as fetched:
        assert (fetched / "model.json").read_text() == (folder / "model.json").read_text()
    version = tracking.register_run_model(client, "old-style", run_id=run_id)
    assert version.source.endswith("/model") and not version.source.startswith("models:/")
    with fetched_model(f"models:/old-style/{version.version}", mlflow_uri) as fetched:
        assert (fetched / "model.json").is_file()
