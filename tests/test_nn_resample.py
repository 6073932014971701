"""Windowed-sinc 2x upsampling (Lanczos and the Kaiser low-pass): the phase convention of F.interpolate, constants
kept, band-limited signals reproduced, the low-pass's cutoff where it is set and its spectral images suppressed,
and enlarged cells with a much weaker grid than bilinear steps leave (weaker still for the low-pass)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from walt.metrics import grid_profile, grid_ratio
from walt.nn import kaiser_kernels, lanczos_kernels, lanczos_upsample2x, upsample2x


def _positions(n: int) -> torch.Tensor:
    """Input coordinates of the 2n outputs of a 2x upsampling with align_corners=False."""
    return (torch.arange(2 * n, dtype=torch.float64) + 0.5) / 2 - 0.5


@pytest.mark.parametrize("kernels", [lanczos_kernels(4), kaiser_kernels()], ids=["lanczos", "kaiser"])
def test_kernels_sum_to_one_and_mirror_each_other(kernels):
    assert kernels.shape == (2, 9)  # Kaiser's default radius costs what 4 Lanczos lobes do
    torch.testing.assert_close(kernels.sum(dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(kernels[0], kernels[1].flip(0))  # i - 1/4 and i + 1/4 lie symmetrically


def test_kernels_match_an_independent_computation_and_stay_put():
    """Both filters from their textbook definitions with numpy/scipy (Lanczos: sinc(x) sinc(x / a) on |x| < a;
    Kaiser: I0(beta sqrt(1 - (x / L)^2)) / I0(beta) on a sinc of cutoff fc, L = radius + 1/2), each output
    phase scaled to sum to 1. Checkpoints do not store the kernels, so a few taps are also pinned as numbers:
    a changed constant would change how every trained "lanczos" or "kaiser" decoder decodes."""
    from scipy.special import i0

    x = -0.25 - np.arange(-4, 5)  # output phase 0: distances to the 9 input samples
    lanczos = np.sinc(x) * np.sinc(x / 4) * (np.abs(x) < 4)
    kaiser = 0.85 * np.sinc(0.85 * x) * i0(4.0 * np.sqrt(1 - (x / 4.5) ** 2)) / i0(4.0)
    for ours, reference in ((lanczos_kernels(4), lanczos), (kaiser_kernels(), kaiser)):
        reference = torch.from_numpy(reference / reference.sum())  # (9,)
        torch.testing.assert_close(ours[0], reference, atol=1e-12, rtol=0)
        torch.testing.assert_close(ours[1], reference.flip(0), atol=1e-12, rtol=0)
    pinned = torch.tensor([-0.0111, 0.0500, -0.1390, 0.3679, 0.7854], dtype=torch.float64)
    torch.testing.assert_close(kaiser_kernels()[0, :5], pinned, atol=5e-5, rtol=0)


def test_bad_filter_settings_are_refused():
    with pytest.raises(ValueError, match="at least one lobe"):
        lanczos_kernels(0)
    with pytest.raises(ValueError, match="0 < cutoff <= 1"):
        kaiser_kernels(cutoff=1.2)
    with pytest.raises(ValueError, match="radius >= 1"):
        kaiser_kernels(radius=0)


def _fit_sinusoid(kernels: torch.Tensor, f: float, n: int = 96) -> tuple[float, float]:
    """A sinusoid of f cycles per input pixel upsampled once: the amplitude of the output's least-squares fit by
    the same sinusoid at the F.interpolate positions, and the largest residual (what is not that sinusoid:
    the spectral image at 1 - f, which is what draws a grid), away from the borders."""
    row = torch.sin(2 * math.pi * f * torch.arange(n, dtype=torch.float64))
    y = upsample2x(row.expand(1, 1, 2, n), kernels)[0, 0, 1, 16:-16]  # (2n - 32,)
    phase = 2 * math.pi * f * _positions(n)[16:-16]
    basis = torch.stack([phase.sin(), phase.cos()], dim=1)  # (2n - 32, 2)
    coef = torch.linalg.lstsq(basis, y[:, None]).solution  # (2, 1)
    return coef.norm().item(), (y - (basis @ coef)[:, 0]).abs().max().item()


def test_kaiser_low_pass_halves_at_its_cutoff_and_suppresses_the_images():
    """In the passband the low-pass reproduces a sinusoid as Lanczos does; at its cutoff (0.85 of Nyquist, 0.425
    cycles per pixel) it passes half the amplitude, as a windowed sinc does at its cutoff; near Nyquist (0.45
    cycles per pixel) what is left besides the sinusoid, the image that a 2x step creates, is a tenth of
    Lanczos-4's."""
    kaiser, lanczos = kaiser_kernels(), lanczos_kernels(4)
    for f in (0.1, 0.15):
        assert _fit_sinusoid(kaiser, f)[0] == pytest.approx(1.0, abs=0.005)
        assert _fit_sinusoid(kaiser, f)[1] < 0.002
    assert _fit_sinusoid(kaiser, 0.425)[0] == pytest.approx(0.5, abs=0.01)
    assert _fit_sinusoid(kaiser, 0.45)[1] < 0.05 < 0.2 < _fit_sinusoid(lanczos, 0.45)[1]  # 0.026 and 0.27


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
    lobes less still, and the Kaiser low-pass, whose images are suppressed, about 1.03 with 9 taps."""
    cells = torch.rand(16, 3, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratios = {}
    for name, step in {
        "bilinear": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
        "lanczos3": lambda x: lanczos_upsample2x(x, lobes=3),
        "lanczos4": lambda x: lanczos_upsample2x(x, lobes=4),
        "lanczos6": lambda x: lanczos_upsample2x(x, lobes=6),
        "kaiser": lambda x: upsample2x(x, kaiser_kernels()),
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
    assert ratios["kaiser"] < 1.1 and ratios["kaiser"] < ratios["lanczos6"]


def test_resample_benchmark_ranks_the_filters(tmp_path, monkeypatch):
    """benchmarks/resample_grid.py, as the constants' comment cites it: the default Kaiser low-pass leaves less
    grid than Lanczos-4 on random cells and on photographs shrunk and enlarged again, and bilinear the most."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks/resample_grid.py"
    spec = importlib.util.spec_from_file_location("resample_grid", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["resample_grid.py", "--out", str(tmp_path / "rows.json")])
    bench.main()
    rows = {r["filter"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    kaiser, lanczos, bilinear = rows["kaiser r4 c0.85 b4"], rows["lanczos4"], rows["bilinear"]
    for data in ("cells", "photographs"):
        assert kaiser[data]["grid_ratio"] < lanczos[data]["grid_ratio"] < bilinear[data]["grid_ratio"]
    assert kaiser["cells"]["grid_ratio"] < 1.05
