"""Config files: a missing required key is a user error naming the key and the file (exit 2)."""

from __future__ import annotations

import pytest
import yaml

from pipelines.cli import main
from pipelines.errors import UserError
from pipelines.retrain import load_retrain


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
