"""Pixel-fidelity metrics for reconstructions on [-1, 1] images or videos: PSNR, SSIM, the chroma error, and the
grid ratio (block artefacts of a decoder).

Both return one value per batch element. Videos (B, 3, T, H, W) are scored frame by frame and averaged over
time, the convention of video tokenizer papers. Computation is in float64 so the numbers do not depend on the
device or on autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "chroma_error",
    "grid_phase",
    "grid_profile",
    "grid_ratio",
    "pooled_grid_ratio",
    "profile_spread",
    "psnr",
    "ssim",
]

# Wang et al. (2004) constants: 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _frames(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if x.shape != y.shape or x.ndim not in (4, 5):
        raise ValueError(
            f"expected two tensors of the same shape (B, C, H, W) or (B, C, T, H, W); "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    # (B, C, T, H, W) -> (B*T, C, H, W); images pass through unchanged.
    fold = lambda t: t.movedim(1, -3).flatten(0, -4).double()
    return fold(x), fold(y), x.shape[0]


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, (B,). ``data_range`` is max - min of the pixel scale (2 for [-1, 1])."""
    x, y, batch = _frames(x, y)  # (N, C, H, W)
    mse = (x - y).square().flatten(1).mean(dim=1)  # (N,)
    value = 10.0 * torch.log10(data_range**2 / mse)  # (N,), +inf for identical frames
    return value.view(batch, -1).mean(dim=1)  # (B,)


def _gaussian_window(channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)  # (C, 1, 11, 11)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004), (B,); Gaussian-weighted, borders excluded (valid windows)."""
    x, y, batch = _frames(x, y)  # (N, C, H, W)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}"
        )
    channels = x.shape[1]
    window = _gaussian_window(channels, x.device)
    blur = lambda t: F.conv2d(t, window, groups=channels)  # (N, C, H-10, W-10)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    )
    return s.flatten(1).mean(dim=1).view(batch, -1).mean(dim=1)  # (B,)


# ITU-R BT.601 chroma rows of the RGB -> YCbCr matrix (on [0, 1] RGB; the offsets cancel in a difference).
_CHROMA = torch.tensor([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64)


def chroma_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the Cb and Cr channels (BT.601), in 8-bit levels, (B,): how far the colours
    are apart, independent of brightness. 0 for equal colours; a grey reconstruction of a saturated clip scores
    tens of levels."""
    x, y, batch = _frames(x, y)  # (N, 3, H, W) in [-1, 1]
    if x.shape[1] != 3:
        raise ValueError(f"chroma_error takes RGB (3 channels), got {x.shape[1]}")
    matrix = _CHROMA.to(x.device)
    diff = torch.einsum("kc,nchw->nkhw", matrix, (x - y) * 0.5)  # (N, 2, H, W), chroma on a [0, 1] scale
    return (diff.abs().flatten(1).mean(dim=1) * 255.0).view(batch, -1).mean(dim=1)  # (B,)


def grid_profile(x: torch.Tensor, period: int = 8, margin: int = 0) -> torch.Tensor:
    """Periodic block artefacts phase by phase, (B, period): entry k is the mean absolute difference between
    neighbouring pixels ``i`` and ``i + 1`` with ``i % period == k`` (horizontal and vertical neighbours pooled)
    over the median of those means across the phases. Entry ``period - 1`` holds the differences across the
    ``period``-pixel block boundaries; the other entries find the same pattern shifted, e.g. the seam a
    depth-to-space upsampler draws through the middle of each latent cell (entry 3 at period 8), or a quiet
    phase where a decoder interpolates its coarse features (entry 3, the differences on either side of each
    cell's centre). Measuring against the median keeps one loud or quiet phase from moving the others. All
    entries are about 1 for natural images. ``margin`` pixels (a multiple of the period, so the phases stay
    put) are left out at each border: a decoder's padding marks the outermost pixels, and that is no grid."""
    if margin % period or margin < 0:
        raise ValueError(f"the margin must be a multiple of the period ({period}), got {margin}")
    if margin:
        x = x[..., margin:-margin, margin:-margin]  # (..., H - 2m, W - 2m)
    frames, _, batch = _frames(x, x)  # (N, C, H, W)
    sums = frames.new_zeros(frames.shape[0], period)  # (N, period): summed differences per phase
    counts = frames.new_zeros(period)  # (period,): how many differences each phase holds per frame
    for dim in (-1, -2):  # horizontal neighbours, then vertical
        diff = frames.diff(dim=dim).abs()  # (N, C, H, W-1) or (N, C, H-1, W)
        per_index = diff.movedim(dim, -1).flatten(1, -2).sum(dim=1)  # (N, L): summed over channels and lines
        phase = torch.arange(per_index.shape[1], device=frames.device) % period  # (L,)
        sums.index_add_(1, phase, per_index)
        lines = diff[0].numel() // per_index.shape[1]  # differences per position in one frame
        counts += torch.bincount(phase, minlength=period).to(counts.dtype) * lines
    if (counts == 0).any():
        raise ValueError(
            f"grid_ratio needs frames wider or taller than the period ({period} pixels), "
            f"got {tuple(frames.shape[-2:])}"
        )
    means = (sums / counts).view(batch, -1, period).mean(dim=1)  # (B, period): frames of a video averaged
    typical = means.quantile(0.5, dim=1, keepdim=True)  # (B, 1)
    return means / typical.clamp_min(1e-12)  # (B, period)


def profile_spread(profile: torch.Tensor) -> torch.Tensor:
    """The largest entry of a :func:`grid_profile` over its smallest, along the last axis: 1 when every phase of
    the grid looks alike, whichever way one phase stands out."""
    tiny = 1e-12  # a flat frame (no differences anywhere) has no grid: 1, not 0 / 0
    return (profile.amax(dim=-1) + tiny) / (profile.amin(dim=-1) + tiny)  # (...,)


def grid_phase(profile: torch.Tensor) -> torch.Tensor:
    """Where a grid sits, along the last axis of a :func:`grid_profile`: the phase furthest from the typical one
    by ratio, loud (a seam) or quiet (a smooth centre)."""
    return profile.clamp_min(1e-12).log().abs().argmax(dim=-1)  # (...,)


def seam_ratio(profile: torch.Tensor) -> torch.Tensor:
    """The differences across the cell boundaries over those inside the cells, along the last axis of a
    :func:`grid_profile`: its last entry over the mean of the others. This counts seams on the latent cells'
    edges only (about 1.005 for RealFootage's test clips pooled, with ``margin=8``). It misses a seam through the
    cells' middles and a quiet centre, which :func:`profile_spread` (the grid ratio) catches: report it next to
    that one, not instead of it."""
    return profile[..., -1] / profile[..., :-1].mean(dim=-1).clamp_min(1e-12)  # (...,)


def grid_ratio(x: torch.Tensor, period: int = 8, margin: int = 0) -> torch.Tensor:
    """Block-grid artefacts, (B,): the largest entry of :func:`grid_profile` over its smallest, i.e. how much
    more the pixels differ at the sharpest phase of the ``period``-pixel grid than at the softest. Both ways
    draw the latent cells (a latent pixel covers ``period`` x ``period`` output pixels): a seam along their
    edges or through their middles raises one phase; a decoder that interpolates its coarse features smoothly
    leaves a quiet phase where each cell is smooth inside, and the picture looks like an enlarged thumbnail
    (a bilinear 8x enlargement of random cells scores 2: the two half-steps that make the difference across each
    cell's centre partly cancel). About 1 for natural images (1.06 for RealFootage's test clips pooled, with
    ``margin=8``; see :func:`pooled_grid_ratio` for a set of clips)."""
    return profile_spread(grid_profile(x, period, margin))  # (B,)


def pooled_grid_ratio(x: torch.Tensor, period: int = 8, margin: int = 0) -> torch.Tensor:
    """The grid ratio of a set of images or videos, a scalar: :func:`profile_spread` of their mean
    :func:`grid_profile`. A decoder's grid sits at the same phase in every reconstruction, so pooling first keeps
    it and averages out the phase-to-phase noise of single clips, which each clip's own ratio would count as a
    grid."""
    return profile_spread(grid_profile(x, period, margin).mean(dim=0))  # ()
