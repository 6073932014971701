"""The FID Inception wrapper: preprocessing equal to the reference FID's, and well-formed pool features."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from walt.metrics import InceptionV3, resize_bilinear_legacy


@pytest.fixture(scope="module")
def inception():
    return InceptionV3()


def _grid_sample_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """The affine_grid/grid_sample formulation of NVIDIA's StyleGAN metrics and fid-helper's nv_bilinear."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / size
    theta[:, 1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (512, 400)])
def test_resize_equals_the_grid_sample_formulation(shape):
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, size=(2, 3, *shape))).float()
    ours = resize_bilinear_legacy(x, (299, 299))
    # grid_sample rounds its float32 sampling coordinates, hence the 0.02 (of 255) tolerance; a half-pixel
    # resize, the usual mistake, is off by whole intensity levels.
    torch.testing.assert_close(ours, _grid_sample_resize(x, 299), rtol=0, atol=0.02)
    half_pixel = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - half_pixel).abs().max() > 1.0


def test_features_are_the_network_on_legacy_resized_x_over_128_minus_1(inception):
    # Two photos of different sizes than 299, scored as one batch and one at a time through the bare network.
    images = np.stack(
        [skimage.data.chelsea()[:200:2, :300:2], skimage.data.coffee()[:200:2, :300:2]]
    )  # (2, 100, 150, 3)
    features = inception.features(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert (features >= 0).all()  # average pool of ReLU outputs
    for i, image in enumerate(images):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # (1, 3, 100, 150)
        expected = inception(resize_bilinear_legacy(x, (299, 299)) / 128 - 1)  # (1, 2048)
        torch.testing.assert_close(features[i : i + 1], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(features[0], features[1], atol=1e-2)


def test_bad_input_is_a_clear_error(inception):
    with pytest.raises(ValueError, match=r"uint8 images \(B, H, W, 3\)"):
        inception.features(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
