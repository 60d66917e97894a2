"""DeconvNet's instance-wise inference from a proposals file, EDeconvNet's release rule, and frozen layers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import segmodels
from pipelines.errors import UserError
from pipelines.inference.core import InferenceSettings, predict_image
from pipelines.inference.proposals import check_covered, clip_boxes, load_proposals
from pipelines.train.loop import freeze
from segmodels.artifact import MemberSpec, ModelSpec, load_model_dir, save_model_dir
from segmodels.ensemble import edeconvnet_probs, predict_scores
from segmodels.instance import instance_wise_scores

CLASSES = 3


def write(tmp_path, body) -> str:
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps(body) if not isinstance(body, str) else body)
    return str(path)


def test_proposals_file_is_validated_with_the_file_and_image_named(tmp_path) -> None:
    good = load_proposals(write(tmp_path, {"2007_000032": [[0, 0, 10, 12, 0.9], [4.4, 5, 20, 30]], "b": []}))
    assert good == {"2007_000032": ((0, 0, 10, 12), (4, 5, 20, 30)), "b": ()}
    for body, message in [
        ("{not json", "not valid JSON"),
        ([], "expected a non-empty object"),
        ({"a": [[0, 0, 10]]}, "'a' has \\[0, 0, 10\\]; a box is"),
        ({"a": [[5, 0, 5, 10]]}, "'a' has the empty box"),
        ({"a": "boxes"}, "'a' must map to a list of boxes"),
    ]:
        with pytest.raises(UserError, match=message):
            load_proposals(write(tmp_path, body))
    with pytest.raises(UserError, match="no such proposals file"):
        load_proposals(str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="no proposals for 2 image\\(s\\), e.g. c, d"):
        check_covered(good, ["b", "c", "d"], "p.json")
    assert clip_boxes([(-5, 2, 50, 40), (60, 0, 70, 5)], 30, 40) == [(0, 2, 40, 30)]


def edeconvnet_folder(tmp_path):
    """A DeconvNet + FCN-8s ensemble folder (EDeconvNet), equal weights, tiny widths."""
    torch.manual_seed(0)
    members, states = [], []
    for i, arch in enumerate(("deconvnet", "fcn8s")):
        net = segmodels.build_model(arch, CLASSES, width=1 / 32)
        members.append(
            MemberSpec(
                arch=arch, num_classes=CLASSES, weights=f"m{i}.safetensors", model_args={"width": 1 / 32}
            )
        )
        states.append(
            {
                k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in net.state_dict().items()
            }
        )
    spec = ModelSpec.single("edeconvnet", members[0], ["a", "b", "c"], [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    spec = ModelSpec(**{**vars(spec), "members": members, "ensemble_weights": [0.5, 0.5]})
    return save_model_dir(tmp_path / "model", spec, states)


def test_instance_mode_runs_deconvnet_on_proposals_combined_with_fcn8s_as_released(tmp_path) -> None:
    model = load_model_dir(edeconvnet_folder(tmp_path))
    image = np.random.default_rng(0).integers(0, 255, (150, 160, 3), dtype=np.uint8)
    # The small box is skipped (shorter side < 112 px); the third is cut to the image; top 2 of the rest.
    boxes = ((0, 0, 100, 150), (0, 0, 120, 130), (-8, 20, 150, 160), (40, 0, 160, 150))
    settings = InferenceSettings(proposals={"img": boxes}, top_k=2)
    probs = predict_image(model, image, settings, "img")

    x = model.normalize(torch.from_numpy(image[None].copy()))
    deconv, fcn = model.ensemble.members
    kept = [(0, 0, 120, 130), (0, 20, 150, 150)]
    expected = edeconvnet_probs(instance_wise_scores(deconv, x, kept), predict_scores(fcn, x)[0])
    assert probs.shape == (CLASSES, 150, 160)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)
    whole = predict_image(model, image, InferenceSettings())
    assert not np.allclose(probs, whole, atol=1e-4)  # the proposals and the release's rule changed it
    with pytest.raises(UserError, match="drop --tta, --flip and --slide"):
        InferenceSettings(proposals={}, flip=True)


def test_freeze_leaves_the_named_layers_out_of_training() -> None:
    net = segmodels.build_model("dilation", CLASSES, width=1 / 32, context="basic")
    frozen = freeze(net, ("features", "fc6", "fc7", "final"))
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("context.") for name in trainable)
    assert set(frozen) | trainable == {name for name, _ in net.named_parameters()}
    with pytest.raises(
        UserError, match="freeze: 'decoder' names no parameter of this model; its layers: features"
    ):
        freeze(net, ("decoder",))
