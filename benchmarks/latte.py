"""Latte-XL/2 (Ma et al., 2024, "Latte: Latent Diffusion Transformer for Video Generation"), the training-step
anchor the window-attention backbone is compared with (DESIGN.md section 4), written from the paper's
description for benchmarks/transformer.py --latte.

Its variant 1: 28 DiT blocks (width 1152, 16 heads, MLP ratio 4, tanh GELU, qkv bias, no qk-norm, adaLN-Zero with
its own Linear(D, 6D) per block) alternating full attention over the tokens of one frame (spatial) with full
attention over the frames at one position (temporal); 2x2 patches of a 4-channel latent, so a 16x32x32 latent
is the same 16x16x16 token grid as the W.A.L.T-XL case; fixed sin-cos position embeddings in space and time;
class and timestep embeddings summed; it predicts noise and variance (8 output channels). timm's ``Attention``
and ``Mlp`` (PyTorch SDPA) are its layers, as in the paper's code.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from einops import rearrange
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from walt.nn import modulate


def sincos(positions: Tensor, dim: int) -> Tensor:
    """(N,) positions -> (N, dim) fixed sin-cos embedding (half sines, half cosines)."""
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim // 2)
    )
    angles = positions.double()[:, None] * freqs[None]  # (N, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (N, dim)


def sincos_2d(size: int, dim: int) -> Tensor:
    """(size * size, dim): half the channels embed the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.cat([sincos(rows.flatten(), dim // 2), sincos(cols.flatten(), dim // 2)], dim=1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sincos(t * 1000, self.frequencies))  # (B, D)


class LatteBlock(nn.Module):
    """A DiT block: full attention over its input's sequence, adaLN-Zero modulation from ``c``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B', N, D), c (B', D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c)[:, None].chunk(6, dim=-1)  # (B', 1, D)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B', N, D)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B', N, D)


class LatteXL2(nn.Module):
    def __init__(
        self,
        in_channels: int = 4,
        frames: int = 16,
        size: int = 32,
        patch: int = 2,
        dim: int = 1152,
        depth: int = 28,
        heads: int = 16,
        num_classes: int = 101,
    ) -> None:
        super().__init__()
        if depth % 2:
            raise ValueError(f"Latte alternates spatial and temporal blocks: depth must be even, got {depth}")
        self.patch, self.out_channels = patch, 2 * in_channels  # noise and variance
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.register_buffer("pos", sincos_2d(size // patch, dim)[None], persistent=False)  # (1, N, D)
        self.register_buffer(
            "time_pos", sincos(torch.arange(frames), dim)[None], persistent=False
        )  # (1, T, D)
        self.t_embed = TimestepEmbedder(dim)
        self.y_embed = nn.Embedding(num_classes + 1, dim)  # + the null class of classifier-free guidance
        self.blocks = nn.ModuleList(LatteBlock(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.unembed = nn.Linear(dim, patch * patch * self.out_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (B, C, T, H, W) latent, t (B,) in [0, 1], y (B,) class -> (B, 2C, T, H, W)."""
        B, _, T, H = x.shape[:4]
        x = self.embed(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*T, D, h, w)
        x = x.flatten(2).transpose(1, 2) + self.pos  # (B*T, N, D)
        N = x.shape[1]
        c = self.t_embed(t) + self.y_embed(y)  # (B, D)
        c_space, c_time = c.repeat_interleave(T, 0), c.repeat_interleave(N, 0)  # (B*T, D), (B*N, D)
        for i in range(0, len(self.blocks), 2):
            x = self.blocks[i](x, c_space)  # (B*T, N, D)
            x = rearrange(x, "(b t) n d -> (b n) t d", b=B)  # (B*N, T, D)
            if i == 0:
                x = x + self.time_pos  # (B*N, T, D)
            x = self.blocks[i + 1](x, c_time)  # (B*N, T, D)
            x = rearrange(x, "(b n) t d -> (b t) n d", b=B)  # (B*T, N, D)
        shift, scale = self.final_adaln(c_space)[:, None].chunk(2, dim=-1)  # (B*T, 1, D) each
        x = self.unembed(modulate(self.final_norm(x), shift, scale))  # (B*T, N, p*p*2C)
        p = self.patch
        return rearrange(
            x, "(b t) (h w) (p q c) -> b c t (h p) (w q)", b=B, h=H // p, p=p, q=p
        )  # (B, 2C, T, H, W)
