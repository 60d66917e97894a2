import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmodels.losses import class_weights, segmentation_loss, unet_weight_map


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 7, generator=g)
    target = torch.randint(0, 4, (2, 6, 7), generator=g)
    target[:, :2] = 255
    return logits, target


def manual_cross_entropy(logits, target, weight):
    """sum(w * -log p_target) / sum(w) over the labelled pixels."""
    valid = target != 255
    log_p = logits.log_softmax(1).gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)
    return (-(log_p * weight)[valid]).sum() / weight[valid].sum()


def test_is_the_mean_cross_entropy_over_labelled_pixels(batch):
    logits, target = batch
    expected = manual_cross_entropy(logits, target, torch.ones(target.shape))
    assert segmentation_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sum_reduction_is_caffes_unnormalised_loss_per_image(batch):
    """FCN's reference (`normalize: false`): the sum over the labelled pixels, divided by the batch only."""
    logits, target = batch
    labelled = int((target != 255).sum())
    mean = segmentation_loss(logits, target)
    summed = segmentation_loss(logits, target, reduction="sum")
    assert summed.item() == pytest.approx(mean.item() * labelled / len(target), rel=1e-6)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        segmentation_loss(logits, target, reduction="none")


def test_ignored_pixels_do_not_contribute(batch):
    logits, target = batch
    logits = logits.clone().requires_grad_(True)
    loss = segmentation_loss(logits, target)
    loss.backward()
    assert float(logits.grad[:, :, :2].abs().max()) == 0.0
    changed = logits.detach().clone()
    changed[:, :, :2] = 100 * torch.randn_like(changed[:, :, :2])
    assert segmentation_loss(changed, target).item() == pytest.approx(loss.item(), rel=1e-7)


def test_border_scores_only_the_valid_centre(batch):
    logits, target = batch
    centre = segmentation_loss(logits[..., 1:-1, 1:-1], target[..., 1:-1, 1:-1])
    assert segmentation_loss(logits, target, border=1).item() == pytest.approx(centre.item(), rel=1e-6)
    both = segmentation_loss({"out": logits, "aux": logits.flip(1)}, target, aux_weight=0.5, border=1)
    aux = segmentation_loss(logits.flip(1)[..., 1:-1, 1:-1], target[..., 1:-1, 1:-1])
    assert both.item() == pytest.approx(centre.item() + 0.5 * aux.item(), rel=1e-6)
    assert torch.equal(target[:, 2:, 3], batch[1][:, 2:, 3])  # the caller's target is left untouched
    with pytest.raises(ValueError, match="loss border 3 leaves nothing of a 6x7 crop"):
        segmentation_loss(logits, target, border=3)


def test_aux_output_is_added_with_its_weight(batch):
    logits, target = batch
    aux = logits.flip(1)
    main_only = segmentation_loss(logits, target)
    aux_only = segmentation_loss(aux, target)
    combined = segmentation_loss({"out": logits, "aux": aux}, target, aux_weight=0.4)
    assert combined.item() == pytest.approx(main_only.item() + 0.4 * aux_only.item(), rel=1e-6)
    assert segmentation_loss({"out": logits}, target).item() == pytest.approx(main_only.item())
    assert segmentation_loss({"out": logits, "aux": aux}, target, aux_weight=0).item() == pytest.approx(
        main_only.item()
    )


def test_pixel_weights_give_a_weighted_mean(batch):
    logits, target = batch
    weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(1)) + 0.1
    expected = manual_cross_entropy(logits, target, weight)
    assert segmentation_loss(logits, target, pixel_weight=weight).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    # a constant scale changes nothing; a zero weight is the same as ignoring the pixel
    plain = segmentation_loss(logits, target)
    assert segmentation_loss(
        logits, target, pixel_weight=torch.full(target.shape, 3.0)
    ).item() == pytest.approx(plain.item(), rel=1e-6)
    zeroed, ignored = torch.ones(target.shape), target.clone()
    zeroed[:, 3], ignored[:, 3] = 0.0, 255
    assert segmentation_loss(logits, target, pixel_weight=zeroed).item() == pytest.approx(
        segmentation_loss(logits, ignored).item(), rel=1e-6
    )


def test_class_weights_match_torch_weighted_mean(batch):
    logits, target = batch
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0])
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=255)
    assert segmentation_loss(logits, target, class_weight=weight).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_all_ignored_batch_gives_zero_with_a_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and not math.isnan(loss.item())
    assert float(logits.grad.abs().max()) == 0.0


def test_errors_say_what_is_wrong(batch):
    logits, target = batch
    with pytest.raises(ValueError, match="upsample the logits"):
        segmentation_loss(logits[:, :, :3], target)
    with pytest.raises(ValueError, match="outside 0..3"):
        segmentation_loss(logits, target.masked_fill(target == 0, 7))
    with pytest.raises(ValueError, match="class_weight"):
        segmentation_loss(logits, target, class_weight=[1.0, 2.0])


def two_cells() -> np.ndarray:
    """Two 10x10 cells of class 1 with a 2-pixel background gap (columns 20, 21) between them."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[5:15, 10:20] = 1
    mask[5:15, 22:32] = 1
    return mask


def test_unet_weight_map_known_value_between_two_cells():
    weights = unet_weight_map(two_cells(), w0=10.0, sigma=5.0, class_weight=[1.0, 2.0])
    assert weights.dtype == np.float32 and weights.shape == (64, 64)
    # (10, 20): 1 px from the left cell, 2 px from the right one
    assert weights[10, 20] == pytest.approx(1.0 + 10.0 * math.exp(-((1 + 2) ** 2) / (2 * 5.0**2)), rel=1e-6)
    assert weights[10, 21] == pytest.approx(weights[10, 20])
    assert weights[60, 60] == pytest.approx(1.0, abs=1e-6)  # far from both cells: w_c of background
    assert weights[10, 12] == 2.0  # inside a cell: w_c only, the border term is for background pixels
    assert weights[10, 20] > weights[10, 8] > weights[60, 60]  # decays away from the gap


def test_unet_weight_map_single_cell_ignore_and_default_class_balance():
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:16, 8:16] = 1
    mask[0, :] = 255
    weights = unet_weight_map(torch.from_numpy(mask))
    balance = class_weights([int((mask == 0).sum()), int((mask == 1).sum())], method="inverse")
    assert weights[20, 20] == pytest.approx(float(balance[0]))  # one cell: no second-nearest, no border term
    assert weights[10, 10] == pytest.approx(float(balance[1]))
    assert (weights[0] == 0).all()
    with pytest.raises(ValueError, match="one class_weight per class"):
        unet_weight_map(mask, class_weight=[1.0])


def test_class_weights():
    counts = [10, 30, 60, 0]
    assert class_weights(counts).tolist() == pytest.approx([3.0, 1.0, 0.5, 0.0])
    inverse = class_weights(counts, method="inverse")
    assert inverse.tolist() == pytest.approx([100 / 30, 100 / 90, 100 / 180, 0.0])
    assert float((inverse * torch.tensor(counts)).sum()) / 100 == pytest.approx(1.0)  # mean pixel weight 1
    with pytest.raises(ValueError, match="median_frequency"):
        class_weights(counts, method="log")
    with pytest.raises(ValueError, match="all zero"):
        class_weights([0, 0])
