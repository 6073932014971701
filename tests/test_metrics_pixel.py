"""PSNR and SSIM against scikit-image's reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import skimage.metrics
import torch

from walt.metrics import chroma_error, grid_ratio, psnr, ssim


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    clean = skimage.data.astronaut()[:96, 100:180].astype(np.float64) / 127.5 - 1  # (96, 80, 3) in [-1, 1]
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), -1, 1)
    return clean, noisy


def _torch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None]  # (1, 3, H, W)


def test_ssim_matches_skimage_gaussian_ssim(pair):
    clean, noisy = pair
    reference = skimage.metrics.structural_similarity(
        clean,
        noisy,
        data_range=2.0,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(_torch(clean), _torch(noisy)).item() == pytest.approx(reference, rel=1e-10)


def test_psnr_matches_skimage(pair):
    clean, noisy = pair
    reference = skimage.metrics.peak_signal_noise_ratio(clean, noisy, data_range=2.0)
    assert psnr(_torch(clean), _torch(noisy)).item() == pytest.approx(reference, rel=1e-12)


def test_identical_inputs_give_the_extremes(pair):
    clean = _torch(pair[0])
    assert ssim(clean, clean).item() == pytest.approx(1.0, abs=1e-12)
    assert psnr(clean, clean).item() == float("inf")


def test_known_mse_gives_known_psnr():
    x = torch.zeros(2, 3, 16, 16)
    y = x + 0.2  # MSE 0.04 on a range of 2: 10 log10(4 / 0.04) = 20 dB
    torch.testing.assert_close(psnr(x, y), torch.full((2,), 20.0, dtype=torch.float64))


def test_videos_average_over_frames(pair):
    clean, noisy = _torch(pair[0]), _torch(pair[1])
    video_a = torch.stack([clean, noisy, clean], dim=2)  # (1, 3, T=3, H, W)
    video_b = torch.stack([noisy, clean.flip(-1), clean.flip(-2)], dim=2)  # (1, 3, T=3, H, W)
    for metric in (ssim, psnr):
        per_frame = torch.stack([metric(video_a[:, :, t], video_b[:, :, t]) for t in range(3)])  # (T, 1)
        torch.testing.assert_close(metric(video_a, video_b), per_frame.mean(0))


def test_bad_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# ---- grid ratio and chroma error ------------------------------------------------------------------------------


def test_grid_ratio_of_a_blocky_image_and_of_a_smooth_one():
    """Blocks of 8 pixels (nearest-neighbour upsampling of random cells) differ only across the cell edges:
    an infinite ratio, clamped; a bilinear upsampling of the same cells has no preference for the edges; a
    photograph is near 1."""
    cells = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    blocky = torch.nn.functional.interpolate(cells, scale_factor=8, mode="nearest") * 2 - 1  # (1, 3, 48, 48)
    smooth = torch.nn.functional.interpolate(cells, scale_factor=8, mode="bilinear") * 2 - 1
    assert grid_ratio(blocky).item() > 1e6
    # 8 pixels off each side: bilinear resizing repeats the edge cells' values there (no differences at all)
    assert 0.9 < grid_ratio(smooth[..., 8:-8, 8:-8]).item() < 1.1
    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].double() / 127.5 - 1
    assert 0.8 < grid_ratio(photo).item() < 1.2


def test_grid_ratio_by_hand_on_one_row():
    """Row 0..15 with a jump of 10 between pixels 7 and 8 (the 8-pixel boundary) and steps of 1 elsewhere: the
    boundary difference is 11, every other difference 1 (vertical differences are 0 and count as 'elsewhere')."""
    row = torch.arange(16, dtype=torch.float64) + 10 * (torch.arange(16) >= 8)
    image = row.expand(1, 1, 2, 16)  # (1, 1, 2, 16): two equal rows
    # horizontal: 2 rows x (1 boundary of 11, 14 others of 1); vertical: 16 differences of 0, none on a boundary
    expected = (11.0) / ((2 * 14 * 1 + 16 * 0) / (2 * 14 + 16))
    assert grid_ratio(image).item() == pytest.approx(expected)


def test_grid_ratio_of_videos_averages_frames_and_rejects_tiny_frames():
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    frames = video.movedim(2, 1).flatten(0, 1)  # (10, 3, 16, 16)
    assert grid_ratio(video).shape == (2,)
    assert torch.isfinite(grid_ratio(frames)).all()
    with pytest.raises(ValueError, match="wider and taller"):
        grid_ratio(torch.rand(1, 3, 4, 4))


def test_chroma_error_ignores_brightness_and_measures_colour():
    """A grey shift (the same change on R, G and B) moves Y only: chroma error 0. Red against grey: Cb and Cr
    differ by the BT.601 coefficients of the red channel, in 8-bit levels."""
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    assert chroma_error(image + 0.2, image).item() == pytest.approx(0.0, abs=1e-9)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    grey = torch.full((1, 3, 8, 8), -1.0)
    expected = (0.168736 + 0.5) / 2 * 255  # |dCb| = 0.168736, |dCr| = 0.5 for dR = 1 on [0, 1]
    assert chroma_error(red, grey).item() == pytest.approx(expected)
