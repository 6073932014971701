"""Lanczos 2x upsampling: the phase convention of F.interpolate, constants kept, band-limited signals
reproduced, and enlarged cells with a much weaker grid than bilinear steps leave."""

import math

import pytest
import torch
import torch.nn.functional as F

from walt.metrics import grid_profile, grid_ratio
from walt.nn import lanczos_kernels, lanczos_upsample2x


def _positions(n: int) -> torch.Tensor:
    """Input coordinates of the 2n outputs of a 2x upsampling with align_corners=False."""
    return (torch.arange(2 * n, dtype=torch.float64) + 0.5) / 2 - 0.5


def test_kernels_sum_to_one_and_mirror_each_other():
    k = lanczos_kernels(4, torch.float64)  # (2, 9)
    assert k.shape == (2, 9)
    torch.testing.assert_close(k.sum(dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(k[0], k[1].flip(0))  # i - 1/4 and i + 1/4 lie symmetrically
    with pytest.raises(ValueError, match="at least one lobe"):
        lanczos_kernels(0)


def test_a_sinusoid_is_reproduced_at_the_interpolate_positions():
    """A band-limited row, away from the borders: the output is the sinusoid at the positions of
    F.interpolate(scale_factor=2, align_corners=False), ten times closer than bilinear interpolation gets."""
    n, f = 48, 0.15  # cycles per input pixel, below Nyquist (0.5)
    row = torch.sin(2 * math.pi * f * torch.arange(n, dtype=torch.float64))
    x = row.expand(1, 2, 6, n)  # (1, 2, 6, 48)
    truth = torch.sin(2 * math.pi * f * _positions(n))[8:-8]
    lanczos = lanczos_upsample2x(x, lobes=4)[0, 1, 5, 8:-8]
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear")[0, 1, 5, 8:-8]
    assert (lanczos - truth).abs().max() < 0.01
    assert (bilinear - truth).abs().max() > 10 * (lanczos - truth).abs().max()
    # the same along the height: the filter is separable and the axes are treated alike
    col = lanczos_upsample2x(x.transpose(-1, -2).contiguous(), lobes=4)[0, 0, 8:-8, 3]
    torch.testing.assert_close(col, lanczos_upsample2x(x, lobes=4)[0, 0, 3, 8:-8])


def test_constants_stay_constant_to_the_edges_and_shapes_double():
    x = torch.full((2, 3, 5, 7), 0.7)
    y = lanczos_upsample2x(x)
    assert y.shape == (2, 3, 10, 14) and y.dtype == x.dtype
    torch.testing.assert_close(y, torch.full_like(y, 0.7))


def test_kernels_passed_in_give_the_same_result():
    """A layer keeps the kernels as a float32 buffer and passes them in; they are cast to the input."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kept = lanczos_kernels(4, torch.float32)  # (2, 9)
    torch.testing.assert_close(lanczos_upsample2x(x, kept), lanczos_upsample2x(x), atol=1e-6, rtol=0)
    assert lanczos_upsample2x(x, kept).dtype == torch.float64


def test_enlarged_random_cells_show_less_grid_than_bilinear():
    """Three 2x steps over independent cells: bilinear steps leave each cell smooth at its centre (quietest
    phase 3) and its edges loud (phase 7), a ratio of about 2; four Lanczos lobes leave much less (1.41), more
    lobes less still, and only the unwindowed sinc would leave none."""
    cells = torch.rand(16, 3, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratios = {}
    for name, step in {
        "bilinear": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
        "lanczos3": lambda x: lanczos_upsample2x(x, lobes=3),
        "lanczos4": lambda x: lanczos_upsample2x(x, lobes=4),
        "lanczos6": lambda x: lanczos_upsample2x(x, lobes=6),
    }.items():
        y = step(step(step(cells)))[..., 16:-16, 16:-16]  # (16, 3, 48, 48): away from the borders
        ratios[name] = grid_ratio(
            y.transpose(0, 1)[None]
        ).item()  # (1, 3, 16, 48, 48): all cells as one video
        if name == "bilinear":
            assert grid_profile(y).mean(0).argmin().item() == 3
    assert ratios["bilinear"] > 1.9
    assert ratios["lanczos4"] < 1.5 < ratios["lanczos3"] < 1.6
    assert ratios["lanczos6"] < ratios["lanczos4"]
