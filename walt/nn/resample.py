"""Windowed-sinc (Lanczos) 2x upsampling of feature maps.

Interpolating a grid of independent values linearly makes every cell smoother at its centre than at its edges,
and nearest-neighbour interpolation puts every change on the cells' edges: either way the grid shows. The ideal
band-limited interpolator (the sinc) has neither preference; a Lanczos window keeps it short at the price of a
weak grid of its own (on random cells enlarged 8x: 1.41 with 4 lobes against 2.05 for bilinear steps, see
tests/test_nn_resample.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = ["LANCZOS_LOBES", "lanczos_kernels", "lanczos_upsample2x"]

LANCZOS_LOBES = 4  # fewer lobes leave more of the grid (1.55 with 3 lobes), more cost taps and reach further


def lanczos_kernels(lobes: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """(2, 2 * lobes + 1): the weights that make output phases 0 and 1 of a 2x upsampling from the input samples
    at offsets -lobes .. lobes. Output pixel ``2i + p`` sits at input coordinate ``i - 1/4`` (p = 0) or
    ``i + 1/4`` (p = 1), as in ``F.interpolate(scale_factor=2, align_corners=False)``. Each row sums to 1, so a
    constant stays constant."""
    if lobes < 1:
        raise ValueError(f"a Lanczos window needs at least one lobe, got {lobes}")
    offsets = torch.arange(-lobes, lobes + 1, dtype=torch.float64)  # (K,): input sample j - i
    rows = []
    for shift in (-0.25, 0.25):
        x = shift - offsets  # (K,): distance from the output position to each input sample
        w = torch.sinc(x) * torch.sinc(x / lobes) * (x.abs() < lobes)  # (K,)
        rows.append(w / w.sum())
    return torch.stack(rows).to(dtype)  # (2, K)


def _upsample_last_axis(x: Tensor, kernels: Tensor) -> Tensor:
    """x: (N, C, H, W) -> (N, C, H, 2W), the border values repeated beyond the edges."""
    channels, lobes = x.shape[1], kernels.shape[1] // 2
    padded = F.pad(x, (lobes, lobes, 0, 0), mode="replicate")  # (N, C, H, W + 2 * lobes)
    weight = kernels.repeat(channels, 1)[:, None, None, :]  # (2C, 1, 1, K): channel-major
    phases = F.conv2d(padded, weight, groups=channels)  # (N, 2C, H, W): both phases of each channel
    return rearrange(phases, "n (c p) h w -> n c h (w p)", p=2)  # (N, C, H, 2W)


def lanczos_upsample2x(x: Tensor, kernels: Tensor | None = None, lobes: int = LANCZOS_LOBES) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) by a separable Lanczos filter with ``lobes`` lobes. A layer that calls
    this at every step passes ``kernels`` (:func:`lanczos_kernels`, kept as a buffer so it moves with the
    layer) rather than have them built and copied to the device each time."""
    if kernels is None:
        kernels = lanczos_kernels(lobes)  # (2, K)
    kernels = kernels.to(device=x.device, dtype=x.dtype)  # (2, K): a no-op for a buffer already in place
    x = _upsample_last_axis(x, kernels)  # (N, C, H, 2W)
    return _upsample_last_axis(x.transpose(-1, -2), kernels).transpose(-1, -2)  # (N, C, 2H, 2W)
