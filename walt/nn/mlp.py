"""Transformer feed-forward block."""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Module):
    """Two-layer feed-forward network with tanh-approximated GELU (as in DiT)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (..., D)
