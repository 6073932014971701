"""PSNR and SSIM against scikit-image's reference implementations."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import skimage.data
import skimage.metrics
import torch

from walt.metrics import (
    chroma_error,
    grid_phase,
    grid_profile,
    grid_ratio,
    pooled_grid_ratio,
    psnr,
    seam_ratio,
    ssim,
)


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


def test_grid_ratio_of_enlarged_cells_either_way_and_of_a_photograph():
    """Blocks of 8 pixels (nearest-neighbour enlargement of random cells) differ only across the cell edges: an
    infinite ratio, clamped. A bilinear enlargement of the same cells has no edges, but it is as much an
    enlarged thumbnail: it is linear between the cells' centres, so the one difference per line that straddles
    a centre (phase 3) is made of two half-steps of the neighbouring slopes, and for independent cells it
    averages half of any other difference (the ratio is about 2). A photograph is near 1."""
    cells = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    blocky = torch.nn.functional.interpolate(cells, scale_factor=8, mode="nearest") * 2 - 1  # (1, 3, 48, 48)
    smooth = torch.nn.functional.interpolate(cells, scale_factor=8, mode="bilinear") * 2 - 1
    assert grid_ratio(blocky).item() > 1e6
    # 8 pixels off each side: bilinear resizing repeats the edge cells' values there (no differences at all)
    profile = grid_profile(smooth[..., 8:-8, 8:-8])[0]  # (8,)
    assert profile.max().item() < 1.1  # no phase louder than the others: no seam ...
    assert profile.argmin().item() == 3 and profile.min().item() < 0.6  # ... but a quiet centre in every cell
    assert grid_phase(profile).item() == 3
    assert 1.6 < grid_ratio(smooth[..., 8:-8, 8:-8]).item() < 2.4
    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].double() / 127.5 - 1
    assert grid_ratio(photo).item() < 1.1  # 1.05


def test_grid_ratio_by_hand_on_one_row():
    """Row 0..15 with a jump of 10 between pixels 7 and 8 (the 8-pixel boundary) and steps of 1 elsewhere, two
    equal rows. Phase 7 holds the two jumps of 11; phases 1..6 hold steps of 1 only; phase 0 holds 4 steps of 1
    and the 16 vertical differences of 0 (mean 4 / 20). The median of the phase means is 1; the ratio is the
    loudest phase over the quietest, 11 / 0.2; the seam ratio is the boundary phase over the mean of the others,
    11 / (6.2 / 7)."""
    row = torch.arange(16, dtype=torch.float64) + 10 * (torch.arange(16) >= 8)
    image = row.expand(1, 1, 2, 16)  # (1, 1, 2, 16)
    assert grid_ratio(image).item() == pytest.approx(55.0)
    assert grid_phase(grid_profile(image)).item() == 7  # 11 is further from 1 than 0.2 is, by ratio
    expected = [4 / 20, 1, 1, 1, 1, 1, 1, 11]  # phase means over their median, 1
    torch.testing.assert_close(grid_profile(image)[0], torch.tensor(expected, dtype=torch.float64))
    assert seam_ratio(grid_profile(image)).item() == pytest.approx(11 / (6.2 / 7))


def test_grid_ratio_of_videos_averages_frames_and_rejects_tiny_frames():
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    frames = video.movedim(2, 1).flatten(0, 1)  # (10, 3, 16, 16)
    assert grid_ratio(video).shape == (2,)
    assert torch.isfinite(grid_ratio(frames)).all()
    with pytest.raises(ValueError, match="wider or taller"):
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


def test_grid_ratio_finds_a_grid_at_any_phase():
    """Blocks shifted by 4 pixels (a seam through the middle of each 8-pixel cell, as a depth-to-space upsampler
    can draw) are as much a grid as blocks on the cell edges; the profile says where it sits."""
    cells = torch.rand(1, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    blocky = torch.nn.functional.interpolate(cells, scale_factor=8, mode="nearest") * 2 - 1  # (1, 3, 56, 56)
    for shift in range(8):
        profile = grid_profile(blocky[..., shift : shift + 48, shift : shift + 48])  # (1, 8)
        assert profile.argmax().item() == (7 - shift) % 8
        assert grid_ratio(blocky[..., shift : shift + 48, shift : shift + 48]).item() > 1e6


def test_grid_profile_by_hand_and_pooled_over_clips():
    """A row with a jump between pixels 3 and 4 and steps of 1 elsewhere: phase 3 holds the jump, and every
    phase is measured against the median phase, so one loud (or quiet) phase does not move the others.
    Pooling averages the clips' profiles first."""
    row = torch.arange(16, dtype=torch.float64) + 10 * (torch.arange(16) >= 4)
    image = row.expand(1, 1, 2, 16)  # (1, 1, 2, 16); vertical differences are 0, at phase 0
    # horizontal: 15 differences (phases 0..7, 0..6), 2 rows; vertical: 16 zeros at phase 0
    diffs = {k: [] for k in range(8)}
    for i in range(15):
        diffs[i % 8] += [11.0 if i == 3 else 1.0] * 2
    diffs[0] += [0.0] * 16
    means = [sum(d) / len(d) for d in diffs.values()]
    typical = statistics.median(means)
    expected = torch.tensor([m / typical for m in means], dtype=torch.float64)
    torch.testing.assert_close(grid_profile(image)[0], expected)
    flat = torch.rand(1, 1, 2, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    both = torch.cat([image, flat])  # (2, 1, 2, 16)
    mean = (grid_profile(image) + grid_profile(flat)) / 2  # (1, 8)
    pooled = mean.amax() / mean.amin()
    assert pooled_grid_ratio(both).item() == pytest.approx(pooled.item())


def test_grid_profile_margin_leaves_out_the_borders_and_keeps_the_phases():
    """A frame whose only feature is a bright outermost column (a padding mark) shows a grid at phase 0 without
    a margin and none with one; a margin that is no multiple of the period would shift the phases: refused."""
    frame = torch.zeros(1, 1, 48, 48, dtype=torch.float64)
    frame[..., 0] = 1.0  # (1, 1, 48, 48): one bright border column
    noise = torch.rand(1, 1, 48, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    assert grid_profile(frame + noise)[0].argmax().item() == 0
    assert grid_ratio(frame + noise).item() > 2.0
    assert grid_ratio(frame + noise, margin=8).item() < 1.3
    shifted = torch.nn.functional.interpolate(torch.rand(1, 1, 6, 6, dtype=torch.float64), scale_factor=8)
    assert (
        grid_profile(shifted[..., 3:, 3:], margin=8)[0].argmax().item() == 4
    )  # blocks' edges at phase 7 - 3
    with pytest.raises(ValueError, match="multiple of the period"):
        grid_profile(frame, margin=4)
