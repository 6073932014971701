"""Low-resolution conditioning for super-resolution: (low-res, high-res) pairs and the upsampled low-res input.

Pixel videos are (B, 3, T, H, W) in [-1, 1] with T = 1 + 4k; latents (B, C, 1 + k, h, w) come from the causal
tokenizer (4x in time, 8x in space). Spatial super-resolution multiplies H and W by ``spatial_factor``;
temporal super-resolution (Imagen Video's frame-rate x2) keeps every ``temporal_factor``-th frame, so a clip
of 17 frames becomes 9 (1 + 4 * 2: 3 latent frames) and the model restores 17 (5 latent frames).

How a low-res latent of 1 + j frames reaches 1 + temporal_factor * j latent frames: high-res latent frame
k >= 1 covers pixel frames 4k-3 .. 4k, whose even-numbered frames are low-res frames 2k-1 .. 2k (for x2),
which belong to low-res latent frame ceil(k / 2). So the latent is repeated causally in time (frame 0 alone,
then each frame twice): every high-res latent frame sees the low-res latent frame that holds its content.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from walt.nn import causal_repeat_time

__all__ = [
    "augment_lowres",
    "downsample_video",
    "highres_latent_shape",
    "lowres_latent",
    "upsample_latent",
    "upsample_video",
]


def _check_factors(spatial_factor: int, temporal_factor: int) -> None:
    if spatial_factor < 1 or temporal_factor not in (1, 2):
        raise ValueError(
            f"spatial_factor must be >= 1 and temporal_factor 1 or 2, got {spatial_factor} and {temporal_factor}"
        )


def downsample_video(video: Tensor, spatial_factor: int = 2, temporal_factor: int = 1) -> Tensor:
    """The low-res counterpart of a high-res clip: every ``temporal_factor``-th frame, area-averaged in space.

    (B, 3, T, H, W) -> (B, 3, 1 + (T - 1) / temporal_factor, H / spatial_factor, W / spatial_factor).
    """
    _check_factors(spatial_factor, temporal_factor)
    B, C, T, H, W = video.shape
    if H % spatial_factor or W % spatial_factor:
        raise ValueError(f"{H}x{W} frames do not divide by spatial_factor {spatial_factor}; crop them first")
    if temporal_factor > 1 and (T - 1) % (4 * temporal_factor):
        raise ValueError(
            f"temporal super-resolution x{temporal_factor} needs 1 + {4 * temporal_factor}k frames (e.g. 17), "
            f"got {T}: the low-res clip must itself be 1 + 4j frames"
        )
    video = video[:, :, ::temporal_factor]  # (B, 3, T_lr, H, W)
    if spatial_factor == 1:
        return video
    frames = video.transpose(1, 2).reshape(-1, C, H, W)  # (B*T_lr, 3, H, W)
    # Area averaging is the exact box filter for integer factors: no aliasing, no ringing.
    frames = F.avg_pool2d(frames, spatial_factor)  # (B*T_lr, 3, H/s, W/s)
    return frames.reshape(B, -1, C, H // spatial_factor, W // spatial_factor).transpose(1, 2)


def upsample_video(video: Tensor, spatial_factor: int = 2, temporal_factor: int = 1) -> Tensor:
    """Pixel-space upsampling back to the high-res grid: linear in time (low-res frame i sits at high-res
    frame ``temporal_factor * i``), bilinear in space. (B, 3, T_lr, h, w) -> (B, 3, T, h * s, w * s)."""
    _check_factors(spatial_factor, temporal_factor)
    B, C, T_lr, h, w = video.shape
    T = 1 + temporal_factor * (T_lr - 1)
    if temporal_factor > 1:
        video = F.interpolate(video, size=(T, h, w), mode="trilinear", align_corners=True)  # (B, 3, T, h, w)
    if spatial_factor == 1:
        return video
    frames = video.transpose(1, 2).reshape(-1, C, h, w)  # (B*T, 3, h, w)
    frames = F.interpolate(frames, scale_factor=spatial_factor, mode="bilinear", align_corners=False)
    return frames.reshape(B, T, C, h * spatial_factor, w * spatial_factor).transpose(1, 2)  # (B, 3, T, H, W)


def upsample_latent(z: Tensor, spatial_factor: int = 2, temporal_factor: int = 1) -> Tensor:
    """Latent-space upsampling to the high-res latent grid: causal repeat in time, bilinear in space.

    (B, C, 1 + j, h, w) -> (B, C, 1 + temporal_factor * j, h * s, w * s).
    """
    _check_factors(spatial_factor, temporal_factor)
    if temporal_factor > 1:
        z = causal_repeat_time(z, temporal_factor, first_chunk=True)  # (B, C, 1 + f*j, h, w)
    if spatial_factor == 1:
        return z
    B, C, T, h, w = z.shape
    frames = z.transpose(1, 2).reshape(-1, C, h, w)  # (B*T, C, h, w)
    frames = F.interpolate(frames, scale_factor=spatial_factor, mode="bilinear", align_corners=False)
    return frames.reshape(B, T, C, h * spatial_factor, w * spatial_factor).transpose(1, 2)  # (B, C, T, H, W)


def highres_latent_shape(
    latent_shape: tuple[int, int, int, int], spatial_factor: int, temporal_factor: int
) -> tuple[int, int, int, int]:
    """The high-res latent shape (C, T, H, W) that a low-res latent of ``latent_shape`` is upsampled to."""
    C, T, H, W = latent_shape
    return C, 1 + temporal_factor * (T - 1), H * spatial_factor, W * spatial_factor


def lowres_latent(
    tokenizer,
    lowres_video: Tensor,
    spatial_factor: int,
    temporal_factor: int,
    path: str = "pixel",
    chunk_size: int | None = None,
) -> Tensor:
    """The clean conditioning latent of a low-res clip on the high-res latent grid: (B, 3, T_lr, h, w) ->
    (B, C, T', H', W'). ``path="pixel"`` upsamples the pixels and encodes them (the default: latent codes are not
    equivariant to resizing); ``"latent"`` encodes at low resolution and upsamples the latent."""
    if path == "pixel":
        return tokenizer.encode(upsample_video(lowres_video, spatial_factor, temporal_factor), chunk_size)
    if path == "latent":
        return upsample_latent(tokenizer.encode(lowres_video, chunk_size), spatial_factor, temporal_factor)
    raise ValueError(f"lowres_path must be 'pixel' or 'latent', got {path!r}")


def augment_lowres(lowres: Tensor, level: Tensor, schedule, generator=None) -> Tensor:
    """Noise-conditioning augmentation: the clean low-res latent (B, C, T, H, W) diffused to per-sample times
    ``level`` (B,) with the model's own schedule. ``generator``: one, or one per sample (walt.diffusion.randn)."""
    from walt.diffusion import expand_like, noisy, randn  # walt.diffusion imports this package

    alpha, sigma = schedule.alpha_sigma(level)
    noise = randn(lowres.shape, generator, lowres.device, lowres.dtype)  # (B, C, T, H, W)
    a, s = expand_like(alpha, lowres).to(lowres.dtype), expand_like(sigma, lowres).to(lowres.dtype)
    return noisy(lowres, noise, a, s)
