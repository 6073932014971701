"""Causal 3D tokenizer-autoencoder (MAGVIT-v2 style, as used by W.A.L.T).

A clip of 1 + 4k frames maps to 1 + k latent frames at 1/8 of the resolution. Everything is causal in time,
so an image (a 1-frame clip) lands on the first latent frame of any clip that starts with it, and clips can be
encoded or decoded in time chunks with a `CausalCache` for bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from walt.config import records_init_args
from walt.nn import CausalCache, CausalConv3d, causal_repeat_time
from walt.tokenizer.layers import (
    AdaptiveFrameGroupNorm,
    AdaptiveResBlock,
    Downsample,
    FrameGroupNorm,
    ResBlock,
    make_upsampler,
)


class Encoder(nn.Module):
    """Causal CNN: (B, 3, 1+4k, H, W) -> (B, out_channels, 1+k, H/8, W/8)."""

    def __init__(
        self,
        out_channels: int,
        channels: int,
        multipliers: Sequence[int],
        num_res_blocks: int,
        temporal_downsample: Sequence[bool],
        num_groups: int,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in multipliers]
        self.conv_in = CausalConv3d(3, widths[0], 3)
        self.blocks = nn.ModuleList()
        in_ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(in_ch, width, num_groups))
                in_ch = width
            if level < len(widths) - 1:
                self.blocks.append(Downsample(width, temporal_downsample[level]))
        self.mid = nn.ModuleList([ResBlock(in_ch, in_ch, num_groups) for _ in range(2)])
        self.norm_out = FrameGroupNorm(in_ch, num_groups)
        self.conv_out = CausalConv3d(in_ch, out_channels, 3)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        h = self.conv_in(x, cache)  # (B, C0, T, H, W)
        for block in [*self.blocks, *self.mid]:
            h = block(h, cache)  # (B, C_l, T_l, H_l, W_l)
        return self.conv_out(F.silu(self.norm_out(h)), cache)  # (B, C_out, 1+k, H/8, W/8)


class Decoder(nn.Module):
    """Causal CNN with latent-conditioned GroupNorm: (B, C, 1+k, h, w) -> (B, 3, 1+4k, 8h, 8w)."""

    def __init__(
        self,
        latent_channels: int,
        channels: int,
        multipliers: Sequence[int],
        num_res_blocks: int,
        temporal_downsample: Sequence[bool],
        num_groups: int,
        modulation_upsample: str = "bilinear",
        upsampler: str = "depth_to_space",
    ) -> None:
        super().__init__()
        widths = [channels * m for m in multipliers]
        adaptive = dict(latent_channels=latent_channels, num_groups=num_groups, upsample=modulation_upsample)
        # Frames per latent frame at each level (the encoder's temporal downsamplings at or below it): the
        # latent conditioning of a level is repeated causally to that frame rate.
        self.time_factors = [2 ** sum(temporal_downsample[level:]) for level in range(len(widths))]
        in_ch = widths[-1]
        self.conv_in = CausalConv3d(latent_channels, in_ch, 3)
        self.mid = nn.ModuleList([AdaptiveResBlock(in_ch, in_ch, **adaptive) for _ in range(2)])
        self.levels = nn.ModuleList()  # deepest level first
        self.upsamples = nn.ModuleList()  # upsamples[i] follows levels[i]
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(AdaptiveResBlock(in_ch, widths[level], **adaptive))
                in_ch = widths[level]
            self.levels.append(blocks)
            if level > 0:
                self.upsamples.append(make_upsampler(upsampler, in_ch, temporal_downsample[level - 1]))
        self.norm_out = AdaptiveFrameGroupNorm(in_ch, **adaptive)
        self.conv_out = CausalConv3d(in_ch, 3, 3)

    def forward(self, z: Tensor, cache: CausalCache) -> Tensor:
        first_chunk = cache.first_visit(self)
        h = self.conv_in(z, cache)  # (B, C3, 1+k, h, w)
        for block in self.mid:
            h = block(h, z, cache)  # (B, C3, 1+k, h, w)
        factors = self.time_factors[::-1]
        for i, blocks in enumerate(self.levels):
            z_level = causal_repeat_time(z, factors[i], first_chunk)  # (B, C, T_l, h, w)
            # every normalization of a level resizes the same latent to the same size: do it once here
            z_level = self.norm_out.resize_latent(z_level, h.shape[-2:])  # (B, C, T_l, H_l, W_l)
            for block in blocks:
                h = block(h, z_level, cache)  # (B, C_l, T_l, H_l, W_l)
            if i < len(self.upsamples):
                h = self.upsamples[i](h, cache)  # (B, C_l, T_l', 2H_l, 2W_l)
        h = F.silu(self.norm_out(h, z_level))  # (B, C0, 1+4k, H, W)
        return self.conv_out(h, cache)  # (B, 3, 1+4k, H, W)


class CausalVAE(nn.Module):
    """Causal 3D autoencoder: `encode(x (B,3,1+4k,H,W)) -> z (B,C,1+k,H/8,W/8)`, `decode(z) -> x`.

    `encode` returns the normalized posterior mean (deterministic) and `decode` takes a normalized latent: the
    per-channel shift/scale buffers (`latent_shift`, `latent_scale`, saved with the weights) are set from data
    with `set_latent_stats` after training and are the identity before. Training uses the raw latents through
    `encode_moments` / `decode_raw`. `chunk_size` (latent frames per chunk) bounds memory on long or large
    clips; any chunk size gives the same result as the full pass, which is simply one chunk.

    Args:
        latent_channels: channels C of the continuous latent.
        channels: width of the first level; level i has `channels * multipliers[i]`.
        multipliers: one entry per level; the resolution halves between levels (8x for 4 levels).
        num_res_blocks: residual blocks per encoder level (the decoder uses one more, as in VQGAN).
        temporal_downsample: after which level transitions time is halved as well (two -> 4x).
        num_groups: GroupNorm groups; must divide every level's width.
        variational: predict a log-variance too (needed for a KL term and posterior sampling).
        modulation_upsample: how the decoder resizes the latent that modulates its normalizations to each
            level's resolution: "bilinear" (default), "lanczos" (a windowed sinc: cells much less smooth at
            their centres than bilinear's), "kaiser" (a low-pass windowed sinc whose cutoff below Nyquist
            leaves less of that pattern; walt.nn.kaiser_kernels) or "nearest", which draws an 8-pixel grid on
            real footage (benchmarks/RESULTS.md); "nearest" is the behaviour of walt's tokenizers before the
            change, for checkpoints trained with it.
        upsampler: the decoder's 2x upsampling layers: "depth_to_space" (default; a convolution to 4x or 8x
            the channels, then depth-to-space, started as nearest-neighbour upsampling), "resize" (bilinear
            resizing, then a convolution), which has no sub-pixel filters to drift apart into a seam through
            each latent cell but trains blockier (benchmarks/RESULTS.md, "the resize upsampler on real
            footage"), or "lanczos" or "kaiser" (that windowed-sinc resize, then a convolution).
    """

    @records_init_args
    def __init__(
        self,
        latent_channels: int = 8,
        channels: int = 128,
        multipliers: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        temporal_downsample: Sequence[bool] = (True, True, False),
        num_groups: int = 32,
        variational: bool = True,
        modulation_upsample: str = "bilinear",
        upsampler: str = "depth_to_space",
    ) -> None:
        super().__init__()
        if len(temporal_downsample) != len(multipliers) - 1:
            raise ValueError(
                f"temporal_downsample needs one entry per level transition ({len(multipliers) - 1}), "
                f"got {len(temporal_downsample)}"
            )
        self.latent_channels = latent_channels
        self.variational = variational
        self.spatial_factor = 2 ** (len(multipliers) - 1)
        self.temporal_factor = 2 ** sum(temporal_downsample)
        arch = dict(
            channels=channels,
            multipliers=tuple(multipliers),
            num_res_blocks=num_res_blocks,
            temporal_downsample=tuple(temporal_downsample),
            num_groups=num_groups,
        )
        self.encoder = Encoder(latent_channels * (2 if variational else 1), **arch)
        self.decoder = Decoder(
            latent_channels, **arch, modulation_upsample=modulation_upsample, upsampler=upsampler
        )
        self.register_buffer("latent_shift", torch.zeros(latent_channels))
        self.register_buffer("latent_scale", torch.ones(latent_channels))

    # ---- chunking --------------------------------------------------------------------------------------

    def _frame_boundary(self, latent_index: int) -> int:
        """First pixel frame that belongs to latent frame `latent_index` (frame 0 alone is latent 0)."""
        return max(0, self.temporal_factor * latent_index - (self.temporal_factor - 1))

    def _chunks(self, num_latent: int, chunk_size: int | None) -> list[tuple[int, int]]:
        if chunk_size is None:
            return [(0, num_latent)]
        if chunk_size < 1:
            raise ValueError(f"chunk_size is a number of latent frames >= 1 (or None), got {chunk_size}")
        return [(a, min(a + chunk_size, num_latent)) for a in range(0, num_latent, chunk_size)]

    def _check_video(self, x: Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"expected a video (B, 3, T, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        if (t - 1) % self.temporal_factor:
            raise ValueError(
                f"the number of frames must be 1 + {self.temporal_factor}k (e.g. 1, 5, 17), got {t}; "
                f"trim the clip to {1 + (t - 1) // self.temporal_factor * self.temporal_factor} frames"
            )
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(
                f"height and width must be multiples of {self.spatial_factor}, got {h}x{w}; "
                "crop or resize the frames"
            )

    def _check_latent(self, z: Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected a latent (B, {self.latent_channels}, T, h, w), got shape {tuple(z.shape)}"
            )

    # ---- encoding and decoding -------------------------------------------------------------------------

    def encode_moments(self, x: Tensor, chunk_size: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Raw (unnormalized) posterior mean and log-variance (None when not variational)."""
        self._check_video(x)
        num_latent = 1 + (x.shape[2] - 1) // self.temporal_factor
        chunks = self._chunks(num_latent, chunk_size)
        cache = CausalCache(streaming=len(chunks) > 1)
        outputs = []
        for a, b in chunks:
            chunk = x[:, :, self._frame_boundary(a) : self._frame_boundary(b)]  # (B, 3, T_c, H, W)
            outputs.append(self.encoder(chunk, cache))  # (B, C or 2C, b-a, h, w)
        moments = torch.cat(outputs, dim=2)  # (B, C or 2C, 1+k, h, w)
        if not self.variational:
            return moments, None
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, 1+k, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_raw(self, z: Tensor, chunk_size: int | None = None) -> Tensor:
        """Decodes a raw (unnormalized) latent (B, C, 1+k, h, w) to pixels (B, 3, 1+4k, 8h, 8w)."""
        self._check_latent(z)
        chunks = self._chunks(z.shape[2], chunk_size)
        cache = CausalCache(streaming=len(chunks) > 1)
        outputs = [self.decoder(z[:, :, a:b], cache) for a, b in chunks]
        return torch.cat(outputs, dim=2)  # (B, 3, 1+4k, H, W)

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.latent_shift[:, None, None, None]) / self.latent_scale[:, None, None, None]

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.latent_scale[:, None, None, None] + self.latent_shift[:, None, None, None]

    def encode(self, x: Tensor, chunk_size: int | None = None) -> Tensor:
        """Normalized posterior mean: (B, 3, 1+4k, H, W) -> (B, C, 1+k, H/8, W/8)."""
        return self.normalize(self.encode_moments(x, chunk_size)[0])

    def decode(self, z: Tensor, chunk_size: int | None = None) -> Tensor:
        """Normalized latent (B, C, 1+k, h, w) -> pixels (B, 3, 1+4k, 8h, 8w), roughly in [-1, 1]."""
        self._check_latent(z)
        return self.decode_raw(self.denormalize(z), chunk_size)

    @torch.no_grad()
    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        """Stores per-channel raw-latent statistics so that `encode` returns zero-mean, unit-std values."""
        if mean.shape != (self.latent_channels,) or std.shape != (self.latent_channels,):
            raise ValueError(
                f"latent statistics must have shape ({self.latent_channels},), got {tuple(mean.shape)} "
                f"and {tuple(std.shape)}"
            )
        if not torch.all(std > 0):
            raise ValueError("latent std must be positive in every channel; the encoder output is degenerate")
        self.latent_shift.copy_(mean)
        self.latent_scale.copy_(std)

    @property
    def last_decoder_layer(self) -> Tensor:
        """Weight of the final decoder convolution (where the adaptive GAN weight compares gradients)."""
        return self.decoder.conv_out.conv.weight
