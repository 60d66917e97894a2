"""`segpipe train --init-from`: the driver check and the worker copy, without Ray (FCN section 4.2 staging)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import segmodels
from pipelines.config import TrainConfig
from pipelines.errors import UserError
from pipelines.train.init_from import REPORT_ARTIFACT, apply_init_from, check_init_from
from segmodels.artifact import MemberSpec, ModelSpec, save_model_dir

WIDTH = {"width": 1 / 32}
CLASSES = 5


def trained_folder(
    folder: Path, arch: str, num_classes: int = CLASSES, *, randomize: bool = True, **model_args
) -> tuple[Path, dict]:
    """A model folder whose every tensor is random and non-zero, as after training (score layers included)."""
    torch.manual_seed(1)
    state = {
        k: torch.randn_like(v) if randomize and v.is_floating_point() else v
        for k, v in segmodels.build_model(arch, num_classes, **model_args).state_dict().items()
    }
    spec = ModelSpec.single(
        arch,
        MemberSpec(arch=arch, num_classes=num_classes, weights="member0.safetensors", model_args=model_args),
        [f"c{i}" for i in range(num_classes)],
        [[i, i, i] for i in range(num_classes)],
    )
    return save_model_dir(folder, spec, [state]), state


def staged(source: Path, model: str, tmp_path: Path) -> tuple[torch.nn.Module, object, str]:
    """Driver check then worker copy into a freshly built `model`, as `segpipe train --init-from` does."""
    cfg = TrainConfig(model=model, model_args=WIDTH, init_from=str(source))
    uri = check_init_from(cfg, CLASSES, f"sqlite:///{tmp_path / 'unused.db'}")
    torch.manual_seed(2)
    net = segmodels.build_model(model, CLASSES, **WIDTH)
    return net, apply_init_from(net, uri, tracking_uri=""), uri


@pytest.mark.parametrize(
    ("source_arch", "arch", "new_layers", "unused"),
    [
        ("fcn32s", "fcn16s", {"score_pool4", "upscore2", "upscore16"}, {"upscore.weight"}),
        ("fcn16s", "fcn8s", {"score_pool3", "upscore_pool4", "upscore8"}, {"upscore16.weight"}),
    ],
)
def test_fcn_stage_carries_everything_but_the_new_layers(
    tmp_path, source_arch, arch, new_layers, unused
) -> None:
    source, weights = trained_folder(tmp_path / source_arch, source_arch, **WIDTH)
    net, report, uri = staged(source, arch, tmp_path)
    assert uri == str(source.resolve())
    assert {k.split(".")[0] for k in report.kept} == new_layers and report.skipped == []
    assert set(report.unused) == unused
    state = net.state_dict()
    assert set(report.copied) == set(weights) - unused
    assert all(torch.equal(state[k], weights[k]) for k in report.copied)
    new_score = "score_pool4" if arch == "fcn16s" else "score_pool3"
    assert getattr(net, new_score).weight.abs().sum() == 0 and getattr(net, new_score).bias.abs().sum() == 0


def test_other_class_count_skips_the_score_layers(tmp_path) -> None:
    source, weights = trained_folder(tmp_path / "fcn32s", "fcn32s", num_classes=3, **WIDTH)
    net, report, _ = staged(source, "fcn32s", tmp_path)
    assert set(report.skipped) == {"score_fr.weight", "score_fr.bias", "upscore.weight"}
    assert net.score_fr.weight.abs().sum() == 0  # its own zero init, not the 3-class scores
    assert torch.equal(net.state_dict()["fc7.0.weight"], weights["fc7.0.weight"])


def test_no_matching_tensor_is_a_user_error(tmp_path) -> None:
    source, _ = trained_folder(tmp_path / "unet", "unet", padding="same", **WIDTH)
    cfg = TrainConfig(model="fcn16s", model_args=WIDTH, init_from=str(source))
    with pytest.raises(UserError, match=r"--init-from .*unet: no tensor of that model matches fcn16s"):
        check_init_from(cfg, CLASSES, "")
    with pytest.raises(UserError, match="has no model.json"):
        check_init_from(TrainConfig(model="fcn16s", init_from=str(tmp_path / "missing")), CLASSES, "")
    # A model trained on ImageNet-normalised RGB cannot start a Caffe-input (BGR 0-255) stage.
    fcn32s, _ = trained_folder(tmp_path / "fcn32s", "fcn32s", **WIDTH)
    caffe = TrainConfig(model="fcn16s", model_args=WIDTH, init_from=str(fcn32s), input_convention="caffe_bgr")
    with pytest.raises(UserError, match="trained on rgb input at scale 1, but input_convention caffe_bgr"):
        check_init_from(caffe, CLASSES, "")


def test_rank_zero_logs_the_report_to_mlflow(tmp_path, mlflow_uri) -> None:
    from pipelines import tracking

    source, _ = trained_folder(tmp_path / "fcn32s", "fcn32s", **WIDTH)
    client = tracking.connect(mlflow_uri)
    run_id = client.create_run(client.create_experiment("init")).info.run_id
    net = segmodels.build_model("fcn16s", CLASSES, **WIDTH)
    report = apply_init_from(net, str(source), tracking_uri=mlflow_uri, run_id=run_id)
    params = client.get_run(run_id).data.params
    assert params["init_from.copied"] == str(len(report.copied)) and params["init_from.kept"] == "4"
    logged = client.download_artifacts(run_id, REPORT_ARTIFACT, str(tmp_path))
    assert '"score_pool4.weight"' in Path(logged).read_text()
