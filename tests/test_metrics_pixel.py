"""PSNR and SSIM against scikit-image's reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import skimage.metrics
import torch

from walt.metrics import psnr, ssim


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
