"""Clip sampling and the tensor path: uint8 frames -> resized, cropped (3, T, H, W) floats in [-1, 1].

The tensor functions take any leading dimensions and run on whatever device the tensor is on, so the same
code resizes a clip in a data-loader worker or a whole batch on the GPU.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ShortVideoError",
    "resize_center_crop",
    "sample_frame_indices",
    "to_float_video",
    "to_uint8",
]

Offset = Literal["random", "center", "start"]
ShortPolicy = Literal["skip", "loop"]


class ShortVideoError(ValueError):
    """A video has fewer frames than the clip needs and the policy says to skip it."""


def sample_frame_indices(
    num_available: int,
    num_frames: int,
    stride: int = 1,
    offset: Offset = "random",
    short_policy: ShortPolicy = "loop",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Indices of a clip of ``num_frames`` frames taken every ``stride`` frames.

    ``offset`` places the clip: uniformly at random (training), in the middle (evaluation) or at the start.
    A video shorter than the clip span is skipped (:class:`ShortVideoError`) or looped from its start,
    as ``short_policy`` says.
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames} and {stride}")
    if num_available < 1:
        raise ShortVideoError("video has no frames")
    span = (num_frames - 1) * stride + 1
    if span > num_available:
        if short_policy == "skip":
            raise ShortVideoError(
                f"clip needs {span} frames (num_frames={num_frames}, stride={stride}), "
                f"video has {num_available}"
            )
        if short_policy != "loop":
            raise ValueError(f"short_policy must be 'skip' or 'loop', got {short_policy!r}")
        return (np.arange(num_frames) * stride) % num_available
    slack = num_available - span
    if offset == "random":
        start = int((rng if rng is not None else np.random.default_rng()).integers(0, slack + 1))
    elif offset == "center":
        start = slack // 2
    elif offset == "start":
        start = 0
    else:
        raise ValueError(f"offset must be 'random', 'center' or 'start', got {offset!r}")
    return start + np.arange(num_frames) * stride


def to_float_video(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 frames ``(T, H, W, 3)`` -> float video ``(3, T, H, W)`` in [-1, 1]."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Float video ``(..., 3, T, H, W)`` in [-1, 1] -> uint8 frames ``(..., T, H, W, 3)`` (values are clamped)."""
    if video.ndim < 4 or video.shape[-4] != 3:
        raise ValueError(f"expected a video (..., 3, T, H, W), got {tuple(video.shape)}")
    pixels = video.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.movedim(-4, -1)


def resize_center_crop(video: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Scale ``(..., H, W)`` so it covers ``size`` (keeping aspect ratio), then crop the centre.

    Bilinear with antialiasing, so downscaling does not alias; an input already at ``size`` is returned as is.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    *lead, h, w = video.shape
    if (h, w) == (out_h, out_w):
        return video
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    flat = video.reshape(-1, 1, h, w)
    dtype = flat.dtype if flat.is_floating_point() else torch.float32
    flat = F.interpolate(
        flat.to(dtype), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    )
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    flat = flat[..., top : top + out_h, left : left + out_w]
    return flat.reshape(*lead, out_h, out_w)
