"""Learned absolute spatial and temporal position embeddings that adapt to new grid sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SpatioTemporalPositionEmbedding(nn.Module):
    """Adds a learned spatial (H0, W0, D) plus a learned temporal (T0, D) embedding to (B, T, H, W, D) tokens.

    Other grid sizes: the spatial table is resized with bicubic interpolation; in time, latent frame k keeps
    its own row for k < T0 (the causal tokenizer gives frame 0 the same meaning in every clip, and an image
    is frame 0), and only clips longer than T0 interpolate the temporal table linearly.
    Samples flagged `is_image` hold T independent images, so all their frames get temporal row 0.
    """

    def __init__(self, dim: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        T0, H0, W0 = grid
        self.spatial = nn.Parameter(torch.zeros(H0, W0, dim))
        self.temporal = nn.Parameter(torch.zeros(T0, dim))

    def forward(self, x: Tensor, is_image: Tensor | None = None) -> Tensor:
        T, H, W = x.shape[1:4]
        spatial = self.spatial_table(H, W)  # (H, W, D)
        temporal = self.temporal_table(T)  # (T, D)
        if is_image is not None:
            temporal = torch.where(is_image[:, None, None], temporal[:1], temporal)  # (B, T, D)
        else:
            temporal = temporal[None]  # (1, T, D)
        return x + spatial + temporal[:, :, None, None, :]  # (B, T, H, W, D)

    def spatial_table(self, height: int, width: int) -> Tensor:
        if (height, width) == tuple(self.spatial.shape[:2]):
            return self.spatial
        table = self.spatial.permute(2, 0, 1)[None]  # (1, D, H0, W0)
        table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
        return table[0].permute(1, 2, 0)  # (H, W, D)

    def temporal_table(self, frames: int) -> Tensor:
        if frames <= self.temporal.shape[0]:
            return self.temporal[:frames]
        table = self.temporal.T[None]  # (1, D, T0)
        table = F.interpolate(table, size=frames, mode="linear", align_corners=True)
        return table[0].T  # (T, D)
