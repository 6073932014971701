"""Patchify / unpatchify between channels-first videos and (B, T, H', W', D) token grids."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn


class PatchEmbed3D(nn.Module):
    """(B, C, T, H, W) -> (B, T, H/p, W/p, D): non-overlapping 1 x p x p patches, linearly projected.

    Time is not patched: the tokenizer already compresses it 4x and W.A.L.T patches latent frames only.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, dim)

    def forward(self, x: Tensor) -> Tensor:
        C, H, W = x.shape[1], x.shape[3], x.shape[4]
        p = self.patch_size
        if C != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {C}")
        if H % p or W % p:
            raise ValueError(f"height {H} and width {W} must be divisible by patch_size {p}; pad the latents")
        x = rearrange(x, "b c t (h p) (w q) -> b t h w (p q c)", p=p, q=p)  # (B, T, H/p, W/p, p*p*C)
        return self.proj(x)  # (B, T, H/p, W/p, D)


class PatchUnembed3D(nn.Module):
    """(B, T, H', W', D) -> (B, C, T, H' p, W' p): linear projection to patches, then the inverse layout."""

    def __init__(self, dim: int, out_channels: int, patch_size: int = 1) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, out_channels * patch_size * patch_size)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        x = self.proj(x)  # (B, T, H', W', p*p*C)
        return rearrange(x, "b t h w (p q c) -> b c t (h p) (w q)", p=p, q=p)  # (B, C, T, H, W)
