"""Embeddings of scalars (diffusion time, noise-augmentation level) and class labels."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_features(x: Tensor, num_features: int, max_period: float = 10_000.0) -> Tensor:
    """(...,) -> (..., F): [cos(x * f_i), sin(x * f_i)] with f_i = max_period ** (-i / (F / 2)), i < F / 2."""
    if num_features % 2:
        raise ValueError(f"num_features must be even, got {num_features}")
    half = num_features // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = x.float()[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (..., num_features)


class ScalarEmbedding(nn.Module):
    """Embeds a scalar in [0, 1] (diffusion time, noise-augmentation level) as a D-vector.

    Sinusoidal features of `scale * x` followed by a two-layer MLP, as in DiT. `scale` maps [0, 1] onto the
    range of the usual 1000 discrete diffusion steps, where the default frequencies resolve neighbouring
    steps.
    """

    def __init__(self, dim: int, num_features: int = 256, scale: float = 1000.0) -> None:
        super().__init__()
        self.num_features = num_features
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(num_features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        features = sinusoidal_features(self.scale * x, self.num_features)  # (..., F)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (..., D)


class LabelEmbedding(nn.Module):
    """Class-label embedding with one extra learned "null" label for classifier-free guidance.

    Label -1 means null (no class); 0 .. num_classes - 1 are the classes. The null row is stored at index
    `num_classes`. Dropping labels for guidance training is the training loop's job (set them to -1).
    """

    NULL = -1

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        index = torch.where(labels == self.NULL, self.num_classes, labels)  # (...,)
        return self.table(index)  # (..., D)
