import copy

import pytest
import torch
from torch import nn

from segmodels.ensemble import Ensemble
from segmodels.inference import predict_sliding, predict_whole


class Member(nn.Module):
    """A tiny fully convolutional net whose logits come out at 1/`output_stride` of the input size."""

    def __init__(
        self,
        num_classes: int = 3,
        output_stride: int = 1,
        seed: int = 0,
        dict_output: bool = False,
        kernel: int = 3,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes = num_classes
        self.dict_output = dict_output
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, kernel, stride=output_stride, padding=kernel // 2),
            nn.ReLU(),
            nn.Conv2d(6, num_classes, 1),
        )

    def forward(self, x):
        logits = self.body(x)
        return {"out": logits} if self.dict_output else logits


def image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))


def test_ensemble_of_identical_members_equals_the_member():
    member = Member()
    ensemble = Ensemble([member, copy.deepcopy(member)])
    torch.testing.assert_close(ensemble.predict_probs(image()), predict_whole(member, image()))
    assert ensemble.num_classes == 3


def test_weighted_average_of_probabilities():
    a, b = Member(seed=1), Member(seed=2)
    probs = Ensemble([a, b], weights=[3.0, 1.0]).predict_probs(image())
    expected = 0.75 * predict_whole(a, image()) + 0.25 * predict_whole(b, image())
    torch.testing.assert_close(probs, expected)


def test_members_with_different_output_strides_and_dict_outputs():
    members = [
        Member(output_stride=1),
        Member(output_stride=2, seed=1),
        Member(output_stride=8, seed=2, dict_output=True),
    ]
    ensemble = Ensemble(members)
    probs = ensemble(image())
    assert probs.shape == (2, 3, 32, 40)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 32, 40))
    probs.sum().backward()  # forward stays differentiable
    assert members[2].body[0].weight.grad is not None


def test_inference_helpers_do_not_softmax_an_ensemble_twice():
    ensemble = Ensemble([Member(seed=3, kernel=1), Member(seed=4, kernel=1)])  # pointwise: sliding == whole
    manual = sum(0.5 * predict_whole(m, image()) for m in ensemble.members)
    torch.testing.assert_close(predict_whole(ensemble, image()), manual)
    torch.testing.assert_close(predict_sliding(ensemble, image(), 24, 16), manual, atol=1e-6, rtol=0)


def test_mismatched_classes_and_weights_are_errors():
    with pytest.raises(ValueError, match="disagree on num_classes"):
        Ensemble([Member(num_classes=3), Member(num_classes=4)])
    anonymous = nn.Conv2d(3, 5, 1)  # no num_classes attribute: caught at forward time
    with pytest.raises(ValueError, match=r"member 1 outputs shape \(2, 5, 32, 40\)"):
        Ensemble([Member(num_classes=3), anonymous])(image())
    with pytest.raises(ValueError, match="one weight per member"):
        Ensemble([Member(), Member()], weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        Ensemble([Member(), Member()], weights=[1.0, -1.0])
