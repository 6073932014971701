"""Windowed-sinc 2x upsampling of feature maps: Lanczos, and a Kaiser-windowed low-pass that leaves no grid.

Interpolating a grid of independent values linearly makes every cell smoother at its centre than at its edges,
and nearest-neighbour interpolation puts every change on the cells' edges: either way the grid shows. The ideal
band-limited interpolator (the sinc) has neither preference. A Lanczos window keeps it short, at the price of a
weak grid of its own: its passband reaches the coarse grid's Nyquist frequency, so the spectral images that a 2x
step creates just above that frequency pass partly, and three steps leave each 8-pixel cell slightly louder at its
edges than at its centre (random cells enlarged 8x: 1.41 with 4 lobes, against 2.05 for bilinear steps). The Kaiser
filter puts its cutoff below Nyquist (0.85 of it, a tuned value), so those images are suppressed, as in the
alias-free generators of StyleGAN3: the same 9 taps leave about 1.03 on random cells, for a little softness near
Nyquist, which the convolution after each step can restore. See tests/test_nn_resample.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = [
    "KAISER_BETA",
    "KAISER_CUTOFF",
    "KAISER_RADIUS",
    "LANCZOS_LOBES",
    "kaiser_kernels",
    "lanczos_kernels",
    "lanczos_upsample2x",
    "upsample2x",
]

# Checkpoints do not store these: the decoder of every "lanczos" or "kaiser" tokenizer is built from them, so
# changing one changes how those decode (tests/test_nn_resample.py pins the kernels). A new filter is a new mode.
LANCZOS_LOBES = 4  # fewer lobes leave more of the grid (1.55 with 3 lobes), more cost taps and reach further
KAISER_RADIUS = 4  # taps on each side: the cost of Lanczos-4
# The cutoff, as a fraction of the input's Nyquist frequency, and the window's shape were tuned with
# benchmarks/resample_grid.py (random cells enlarged 8x in three steps): at beta 4 the grid ratio is 1.31 at cutoff
# 1, 1.09 at 0.9, 1.02 at 0.85, 1.04 at 0.8 and 1.07 at 0.75 (a 2-pixel alternation there); at cutoff 0.85, beta 2
# and 8 give 1.11 and 1.12.
KAISER_CUTOFF = 0.85
KAISER_BETA = 4.0


def _phase_kernels(radius: int, response: Callable[[Tensor], Tensor]) -> Tensor:
    """(2, 2 * radius + 1): a filter's weights for output phases 0 and 1 of a 2x upsampling, from the input
    samples at offsets -radius .. radius. Output pixel ``2i + p`` sits at input coordinate ``i - 1/4`` (p = 0)
    or ``i + 1/4`` (p = 1), as in ``F.interpolate(scale_factor=2, align_corners=False)``. Each row is scaled
    to sum to 1, so a constant stays constant."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)  # (K,): input sample j - i
    rows = [response(shift - offsets) for shift in (-0.25, 0.25)]  # each (K,): at distances output - input
    return torch.stack([w / w.sum() for w in rows])  # (2, K)


def lanczos_kernels(lobes: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """(2, 2 * lobes + 1): the Lanczos filter with ``lobes`` lobes at the two output phases (see
    :func:`_phase_kernels` for the convention)."""
    if lobes < 1:
        raise ValueError(f"a Lanczos window needs at least one lobe, got {lobes}")
    kernels = _phase_kernels(lobes, lambda x: torch.sinc(x) * torch.sinc(x / lobes) * (x.abs() < lobes))
    return kernels.to(dtype)  # (2, K)


def kaiser_kernels(
    radius: int = KAISER_RADIUS,
    cutoff: float = KAISER_CUTOFF,
    beta: float = KAISER_BETA,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """(2, 2 * radius + 1): a sinc low-pass with its cutoff at ``cutoff`` times the input's Nyquist frequency,
    under a Kaiser window of shape ``beta`` that reaches just past the outermost taps, at the two output phases
    (see :func:`_phase_kernels` for the convention)."""
    if radius < 1 or not 0 < cutoff <= 1 or beta < 0:
        raise ValueError(
            f"a Kaiser low-pass needs radius >= 1, 0 < cutoff <= 1 and beta >= 0, "
            f"got radius={radius}, cutoff={cutoff}, beta={beta}"
        )
    span = radius + 0.5  # the farthest tap lies radius + 1/4 from an output pixel: keep its weight above 0
    peak = torch.special.i0(torch.tensor(beta, dtype=torch.float64))

    def response(x: Tensor) -> Tensor:
        window = torch.special.i0(beta * (1 - (x / span).clamp(-1, 1) ** 2).sqrt()) / peak  # (K,)
        return cutoff * torch.sinc(cutoff * x) * window  # (K,)

    return _phase_kernels(radius, response).to(dtype)  # (2, K)


def _upsample_last_axis(x: Tensor, kernels: Tensor) -> Tensor:
    """x: (N, C, H, W) -> (N, C, H, 2W), the border values repeated beyond the edges."""
    channels, radius = x.shape[1], kernels.shape[1] // 2
    padded = F.pad(x, (radius, radius, 0, 0), mode="replicate")  # (N, C, H, W + 2 * radius)
    weight = kernels.repeat(channels, 1)[:, None, None, :]  # (2C, 1, 1, K): channel-major
    phases = F.conv2d(padded, weight, groups=channels)  # (N, 2C, H, W): both phases of each channel
    return rearrange(phases, "n (c p) h w -> n c h (w p)", p=2)  # (N, C, H, 2W)


def upsample2x(x: Tensor, kernels: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) by a separable filter given at its two output phases, ``kernels`` of
    shape (2, K) from :func:`lanczos_kernels` or :func:`kaiser_kernels`. A layer that calls this at every step
    keeps the kernels as a buffer, so that they move with it and are not built and copied each time."""
    kernels = kernels.to(device=x.device, dtype=x.dtype)  # (2, K): a no-op for a buffer already in place
    x = _upsample_last_axis(x, kernels)  # (N, C, H, 2W)
    return _upsample_last_axis(x.transpose(-1, -2), kernels).transpose(-1, -2)  # (N, C, 2H, 2W)


def lanczos_upsample2x(x: Tensor, kernels: Tensor | None = None, lobes: int = LANCZOS_LOBES) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) by a separable Lanczos filter with ``lobes`` lobes (or the ``kernels``
    given, see :func:`upsample2x`)."""
    return upsample2x(x, lanczos_kernels(lobes) if kernels is None else kernels)  # (N, C, 2H, 2W)
