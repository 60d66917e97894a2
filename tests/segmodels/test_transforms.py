import numpy as np
import pytest
import torch

from segmodels.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize


def test_normalize_channels_last_uint8_to_imagenet_statistics():
    image = np.zeros((5, 7, 3), dtype=np.uint8)
    image[..., 1] = 255
    x = normalize(image)
    assert x.shape == (1, 3, 5, 7) and x.dtype == torch.float32
    assert float(x[0, 0, 0, 0]) == pytest.approx(-IMAGENET_MEAN[0] / IMAGENET_STD[0])
    assert float(x[0, 1, 0, 0]) == pytest.approx((1 - IMAGENET_MEAN[1]) / IMAGENET_STD[1])


def test_denormalize_inverts_normalize():
    images = np.random.default_rng(0).integers(0, 256, (2, 6, 9, 3), dtype=np.uint8)
    x = normalize(torch.from_numpy(images))
    assert x.shape == (2, 3, 6, 9)
    np.testing.assert_array_equal(denormalize(x), images)
    np.testing.assert_array_equal(denormalize(x[1]), images[1])


def test_normalize_rejects_float_and_channels_first():
    with pytest.raises(TypeError, match="uint8"):
        normalize(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="channels last"):
        normalize(np.zeros((3, 4, 4), dtype=np.uint8))
