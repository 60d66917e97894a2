import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmodels.inference import predict_whole
from segmodels.instance import instance_wise_predict, sliding_window_proposals


def pointwise_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1))


def image(h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_whole_image_box_alone_equals_whole_image_inference():
    model = pointwise_model()
    x = image()
    probs = instance_wise_predict(model, x, boxes=[], input_size=32)
    assert probs.shape == (5, 32, 32)
    torch.testing.assert_close(probs, predict_whole(model, x)[0], atol=1e-6, rtol=0)


def test_aggregates_by_pixelwise_max_over_boxes_then_normalises():
    model = pointwise_model()
    x = image()
    box = (4, 8, 20, 24)  # x1, y1, x2, y2
    probs = instance_wise_predict(model, x, boxes=[box], input_size=16)

    def box_probs(x1, y1, x2, y2):
        warped = F.interpolate(x[:, :, y1:y2, x1:x2], size=(16, 16), mode="bilinear", align_corners=False)
        return F.interpolate(
            predict_whole(model, warped), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False
        )[0]

    expected = box_probs(0, 0, 32, 32)
    expected[:, 8:24, 4:20] = torch.maximum(expected[:, 8:24, 4:20], box_probs(*box))
    expected = expected / expected.sum(0, keepdim=True)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(0), torch.ones(32, 32))


def test_default_proposals_give_normalised_probabilities():
    probs = instance_wise_predict(
        pointwise_model(), image(40, 56)[0], input_size=16, proposal_sizes=(16, 24), top_k=7
    )
    assert probs.shape == (5, 40, 56)
    torch.testing.assert_close(probs.sum(0), torch.ones(40, 56))


def test_sliding_window_proposals_cover_the_image_inside_its_bounds():
    boxes = sliding_window_proposals(40, 56, sizes=(16, 24, 100))
    assert len(boxes) == len(set(boxes))
    assert boxes[0] == (0, 0, 56, 40)  # the largest size first, each side clipped to the image
    covered = torch.zeros(40, 56, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= 56 and 0 <= y1 < y2 <= 40
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    assert {(x2 - x1) for x1, _, x2, _ in boxes} == {16, 24, 56}


def test_bad_boxes_and_batches_are_rejected():
    model = pointwise_model()
    with pytest.raises(ValueError, match="outside the 32x32 image"):
        instance_wise_predict(model, image(), boxes=[(0, 0, 40, 10)])
    with pytest.raises(ValueError, match="one image"):
        instance_wise_predict(model, torch.randn(2, 3, 32, 32))
