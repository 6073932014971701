"""Frame prediction: which latent frames of a clip are given (context) and which the model generates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["context_mask", "draw_known_frames", "frames_to_generate"]


def context_mask(known: Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """1 on the first ``known[b]`` latent frames of sample b, 0 on the rest: ``known`` (B,) integer counts and a
    latent ``shape`` (B, C, T, H, W) -> (B, 1, T, H, W) (a broadcast view, constant over space)."""
    B, _, T, H, W = shape
    frames = torch.arange(T, device=known.device)  # (T,)
    mask = (frames[None, :] < known[:, None]).to(dtype)[:, None, :, None, None]  # (B, 1, T, 1, 1)
    return mask.expand(B, 1, T, H, W)  # (B, 1, T, H, W)


def draw_known_frames(
    batch: int,
    frames: int,
    prob: float,
    max_known: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Frame-prediction training's given-frame counts (B,): for a random ``prob`` of the samples 1 ..
    ``max_known`` latent frames (at most ``frames`` - 1, so one is always generated), 0 for the rest."""
    known = torch.zeros(batch, device=device, dtype=torch.long)  # (B,)
    if prob > 0 and frames > 1:
        chosen = torch.rand(batch, device=device, generator=generator) < prob  # (B,)
        high = min(max_known, frames - 1) + 1
        count = torch.randint(1, high, (batch,), device=device, generator=generator)  # (B,)
        known = torch.where(chosen, count, known)  # (B,)
    return known


def frames_to_generate(mask: Tensor | None) -> Tensor | None:
    """The loss weight of frame prediction: 1 on the frames to generate, 0 on the given ones ((B, 1, T, H, W)
    from a :func:`context_mask`); None (every element counts) without context frames."""
    return None if mask is None else 1.0 - mask
