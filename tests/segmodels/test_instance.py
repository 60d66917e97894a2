import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmodels.ensemble import edeconvnet_probs, predict_scores
from segmodels.instance import (
    edeconvnet_predict,
    instance_wise_predict,
    instance_wise_scores,
    select_boxes,
    sliding_window_proposals,
)


def pointwise_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 5, 1))


def image(h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_without_proposals_the_whole_image_is_one_box_with_scores_floored_at_zero():
    model = pointwise_model()
    x = image()
    probs = instance_wise_predict(model, x, boxes=[], input_size=32)
    assert probs.shape == (5, 32, 32)
    torch.testing.assert_close(probs, predict_scores(model, x)[0].clamp_min(0).softmax(0), atol=1e-6, rtol=0)


def test_aggregates_raw_scores_by_pixelwise_max_from_zero_then_softmax_as_the_release():
    model = pointwise_model()
    x = image()
    boxes = [(4, 8, 20, 24), (0, 0, 32, 16)]  # x1, y1, x2, y2
    scores = instance_wise_scores(model, x, boxes, input_size=16, min_side=0)

    def box_scores(x1, y1, x2, y2):
        warped = F.interpolate(x[:, :, y1:y2, x1:x2], size=(16, 16), mode="bilinear", align_corners=False)
        return F.interpolate(
            predict_scores(model, warped), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False
        )[0]

    expected = torch.zeros(5, 32, 32)  # the release's accumulator: zeros, so negative scores floor at 0
    for x1, y1, x2, y2 in boxes:
        expected[:, y1:y2, x1:x2] = torch.maximum(expected[:, y1:y2, x1:x2], box_scores(x1, y1, x2, y2))
    torch.testing.assert_close(scores, expected)
    assert (scores[:, 24:, :4] == 0).all() and (box_scores(*boxes[0]) < 0).any()  # uncovered: 0
    torch.testing.assert_close(
        instance_wise_predict(model, x, boxes, input_size=16, min_side=0), expected.softmax(0)
    )


def test_boxes_under_112_pixels_are_skipped_and_the_first_50_kept_are_used():
    big, small, wide = (0, 0, 120, 130), (0, 0, 111, 300), (10, 10, 300, 122)
    assert select_boxes([small, big, wide], 300, 300) == [big, wide]  # shorter side 111 < 112: skipped
    many = [(i, 0, i + 112, 112) for i in range(60)]
    assert select_boxes([small] * 5 + many, 300, 300) == many[:50]  # top 50 of the kept ones
    assert select_boxes([(0, 0, 111, 150)], 200, 300) == [(0, 0, 300, 200)]  # none kept: the whole image
    assert select_boxes([(0, 0, 20, 20)], 32, 32, min_side=16, top_k=50) == [(0, 0, 20, 20)]


def test_edeconvnet_multiplies_deconvnet_scores_by_relu_of_fcn_scores_then_softmax():
    deconv = torch.tensor([[[2.0]], [[1.0]], [[0.0]]])  # C=3, 1x1
    fcn = torch.tensor([[[-3.0]], [[4.0]], [[5.0]]])
    # The release: max(0, fcn) .* deconv = (0, 4, 0) -> softmax; class 1 wins though DeconvNet says 0.
    torch.testing.assert_close(
        edeconvnet_probs(deconv, fcn), torch.tensor([0.0, 4.0, 0.0]).softmax(0)[:, None, None]
    )
    with pytest.raises(ValueError, match="same shape"):
        edeconvnet_probs(deconv, fcn[:2])

    deconvnet, fcn8s = pointwise_model(), nn.Sequential(nn.Conv2d(3, 5, 1))
    x, boxes = image(), [(0, 0, 16, 32)]
    probs = edeconvnet_predict([deconvnet, fcn8s], ["deconvnet", "fcn8s"], [0.5, 0.5], x, boxes, min_side=0)
    expected = edeconvnet_probs(
        instance_wise_scores(deconvnet, x, boxes, min_side=0), predict_scores(fcn8s, x)[0]
    )
    torch.testing.assert_close(probs, expected)
    alone = edeconvnet_predict([deconvnet], ["deconvnet"], [1.0], x, boxes, min_side=0)
    torch.testing.assert_close(alone, instance_wise_predict(deconvnet, x, boxes, min_side=0))


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
