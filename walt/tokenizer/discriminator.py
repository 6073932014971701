"""3D convolutional discriminator for the tokenizer's adversarial loss (StyleGAN-style blocks inflated to 3D,
as in MAGVIT). It is not causal: it judges whole clips. Images (T = 1) pass through with spatial-only pooling.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _downsample(x: Tensor) -> Tensor:
    """2x average pooling in space, and in time while more than one frame is left (last window may be 1)."""
    kernel_t = 2 if x.shape[2] > 1 else 1
    return F.avg_pool3d(x, (kernel_t, 2, 2), ceil_mode=True)  # (B, C, ceil(T/2), H/2, W/2)


class DiscriminatorBlock(nn.Module):
    """Two 3x3x3 convolutions and a downsampling, with a 1x1x1 downsampled skip path."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)  # (B, C_in, T, H, W)
        h = _downsample(F.leaky_relu(self.conv2(h), 0.2))  # (B, C_out, T', H/2, W/2)
        # Dividing by sqrt(2) keeps the variance of the sum of two branches near that of each branch.
        return (h + self.skip(_downsample(x))) / math.sqrt(2)  # (B, C_out, T', H/2, W/2)


class Discriminator3D(nn.Module):
    """Patch discriminator on clips (B, 3, T, H, W) -> logits (B, 1, T', H / 2^n, W / 2^n).

    Args:
        channels: width of the first convolution.
        multipliers: one downsampling block per entry, with `channels * multiplier` output channels.
    """

    def __init__(
        self, in_channels: int = 3, channels: int = 64, multipliers: Sequence[int] = (2, 4, 4)
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels, 3, padding=1)
        widths = [channels] + [channels * m for m in multipliers]
        self.blocks = nn.ModuleList([DiscriminatorBlock(a, b) for a, b in itertools.pairwise(widths)])
        self.conv_out = nn.Conv3d(widths[-1], 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv_in(x), 0.2)  # (B, C0, T, H, W)
        for block in self.blocks:
            h = block(h)  # (B, C_i, T_i, H_i, W_i)
        return self.conv_out(h)  # (B, 1, T_n, H_n, W_n)
