"""Causal building blocks of the tokenizer: per-frame normalization, residual blocks, resampling.

Every block takes a `CausalCache` so that a clip can be processed in time chunks with the same result as one
pass. Normalization is computed per frame: GroupNorm over (channels, time, height, width) would let frame 0
see statistics of later frames and break both causality and the image = first-latent-frame property.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from walt.nn import LANCZOS_LOBES, CausalCache, CausalConv3d, kaiser_kernels, lanczos_kernels, upsample2x


def frame_group_norm(x: Tensor, num_groups: int, eps: float = 1e-6) -> Tensor:
    """GroupNorm statistics over (channels of a group, H, W) of each frame separately."""
    b, t = x.shape[0], x.shape[2]
    frames = rearrange(x, "b c t h w -> (b t) c h w")  # (B*T, C, H, W)
    frames = F.group_norm(frames, num_groups, eps=eps)  # (B*T, C, H, W)
    return rearrange(frames, "(b t) c h w -> b c t h w", b=b, t=t)  # (B, C, T, H, W)


def _check_groups(channels: int, num_groups: int) -> None:
    if channels % num_groups:
        raise ValueError(f"{channels} channels cannot be split into {num_groups} groups; change num_groups")


class FrameGroupNorm(nn.Module):
    """Per-frame GroupNorm with a learned per-channel affine transform."""

    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        _check_groups(channels, num_groups)
        self.num_groups = num_groups
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = frame_group_norm(x, self.num_groups)  # (B, C, T, H, W)
        return x * self.weight[:, None, None, None] + self.bias[:, None, None, None]  # (B, C, T, H, W)


RESIZE_MODES = ("bilinear", "nearest", "lanczos", "kaiser")
MODULATION_UPSAMPLING = RESIZE_MODES
# the windowed sincs of walt.nn.resample, by mode: their kernels at the two output phases of a 2x step
SINC_KERNELS = {"lanczos": lambda: lanczos_kernels(LANCZOS_LOBES), "kaiser": kaiser_kernels}


class FrameResize(nn.Module):
    """Resizes frames (N, C, h, w) to (N, C, H, W) by one of :data:`RESIZE_MODES`, the one resizing the decoder's
    modulation and its resize upsamplers share. The windowed sincs (``"lanczos"``, ``"kaiser"``) take
    power-of-two factors only and keep their kernels as a non-persistent buffer (no weights of their own: state
    dicts are unchanged)."""

    def __init__(self, mode: str, what: str = "resize mode") -> None:
        super().__init__()
        if mode not in RESIZE_MODES:
            raise ValueError(f"{what} must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        self.mode = mode
        if mode in SINC_KERNELS:
            self.register_buffer("kernels", SINC_KERNELS[mode]().float(), persistent=False)

    def forward(self, frames: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(frames.shape[-2:]) == tuple(size):
            return frames
        if self.mode in SINC_KERNELS:
            return _sinc_resize(frames, size, self.kernels)  # (N, C, H, W)
        corners = False if self.mode == "bilinear" else None  # nearest takes no align_corners
        return F.interpolate(frames, size=size, mode=self.mode, align_corners=corners)  # (N, C, H, W)


def _sinc_resize(x: Tensor, size: tuple[int, int], kernels: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, C, H, W) by 2x windowed-sinc steps; H / h and W / w must be the same power of two."""
    factor = size[0] // x.shape[-2]
    if (
        factor < 1
        or factor * x.shape[-2] != size[0]
        or factor * x.shape[-1] != size[1]
        or factor & (factor - 1)
    ):
        raise ValueError(
            f"windowed-sinc resizing needs one power-of-two factor, got {tuple(x.shape[-2:])} -> {size}"
        )
    while x.shape[-2] < size[0]:
        x = upsample2x(x, kernels)  # (N, C, 2h, 2w)
    return x


class AdaptiveFrameGroupNorm(nn.Module):
    """Per-frame GroupNorm whose scale and shift are predicted from the latent (MAGVIT-v2 decoder).

    The latent reaches this layer already repeated causally in time to the layer's frame count; here each frame
    is resized in space to the layer's resolution. ``upsample="nearest"`` makes the modulation constant over
    each latent cell, and the decoder then draws the cells' edges (an 8-pixel grid over every reconstruction of
    real footage); ``"bilinear"`` (the default) varies it smoothly, but each cell is smoother at its centre;
    ``"lanczos"`` resizes by :func:`walt.nn.lanczos_upsample2x` steps, with a much weaker preference than
    either, and ``"kaiser"`` by a Kaiser-windowed low-pass (:func:`walt.nn.kaiser_kernels`) with weaker still
    (power-of-two factors only for both). Only space is resized, frame by frame, so causality and chunked
    decoding are unaffected.
    """

    def __init__(
        self, channels: int, latent_channels: int, num_groups: int, upsample: str = "bilinear"
    ) -> None:
        super().__init__()
        _check_groups(channels, num_groups)
        self.num_groups = num_groups
        self.resize = FrameResize(upsample, "modulation upsampling")
        self.to_scale_shift = nn.Conv3d(latent_channels, 2 * channels, kernel_size=1)
        # Start as a plain GroupNorm: the latent modulation is learned from zero.
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """x: (B, C, T, H, W); z: (B, C_z, T, h, w), the latent at this layer's frame rate (or already resized
        to (H, W) by :meth:`resize_latent`)."""
        scale, shift = self.to_scale_shift(self.resize_latent(z, x.shape[-2:])).chunk(
            2, dim=1
        )  # (B, C, T, H, W) each
        return frame_group_norm(x, self.num_groups) * (1 + scale) + shift  # (B, C, T, H, W)

    def resize_latent(self, z: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, C_z, T, h, w) -> (B, C_z, T, H, W), frame by frame; ``z`` itself when it already has the size."""
        if tuple(z.shape[-2:]) == tuple(size):
            return z
        frames = rearrange(z, "b c t h w -> (b t) c h w")  # (B*T, C_z, h, w)
        frames = self.resize(frames, size)  # (B*T, C_z, H, W)
        return rearrange(frames, "(b t) c h w -> b c t h w", b=z.shape[0])  # (B, C_z, T, H, W)


class ResBlock(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convolutions (encoder)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(in_channels, num_groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = FrameGroupNorm(out_channels, num_groups)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # (B, C_out, T, H, W)
        h = self.conv2(F.silu(self.norm2(h)), cache)  # (B, C_out, T, H, W)
        return self.skip(x) + h  # (B, C_out, T, H, W)


class AdaptiveResBlock(nn.Module):
    """Residual block whose normalizations are conditioned on the latent (decoder)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        latent_channels: int,
        num_groups: int,
        upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        self.norm1 = AdaptiveFrameGroupNorm(in_channels, latent_channels, num_groups, upsample)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = AdaptiveFrameGroupNorm(out_channels, latent_channels, num_groups, upsample)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, z: Tensor, cache: CausalCache) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x, z)), cache)  # (B, C_out, T, H, W)
        h = self.conv2(F.silu(self.norm2(h, z)), cache)  # (B, C_out, T, H, W)
        return self.skip(x) + h  # (B, C_out, T, H, W)


class Downsample(nn.Module):
    """Strided causal convolution: 2x in space, and 2x in time when `temporal` (1 + 2k -> 1 + k frames)."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(2 if temporal else 1, 2, 2))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        return self.conv(x, cache)  # (B, C, T', H/2, W/2)


class DepthToSpaceUpsample(nn.Module):
    """Causal conv to (s_t * 2 * 2) times the channels, then depth-to-space.

    In time each frame becomes `s_t` frames; the first s_t - 1 frames of the clip are dropped so that latent
    frame 0 decodes to exactly one frame (1 + k -> 1 + s_t * k frames).
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.factor_t = 2 if temporal else 1
        self.conv = CausalConv3d(channels, channels * self.factor_t * 4, 3)
        self._init_as_nearest(channels)

    def _init_as_nearest(self, channels: int) -> None:
        """ICNR (Aitken et al., 2017): every sub-pixel of an output channel starts with the same filter, so the
        layer starts as a convolution followed by nearest-neighbour upsampling. Independent random filters per
        sub-pixel start it with a 2-pixel checkerboard that training has to undo."""
        conv = self.conv.conv
        base = nn.Conv3d(channels, channels, conv.kernel_size, bias=conv.bias is not None)  # default init
        repeats = self.factor_t * 4  # (c s p q) order: the sub-pixels of channel c are adjacent
        with torch.no_grad():
            conv.weight.copy_(base.weight.repeat_interleave(repeats, dim=0))
            if conv.bias is not None:
                conv.bias.copy_(base.bias.repeat_interleave(repeats, dim=0))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        first_chunk = cache.first_visit(self)
        x = self.conv(x, cache)  # (B, C*s*4, T, H, W)
        x = rearrange(x, "b (c s p q) t h w -> b c (t s) (h p) (w q)", s=self.factor_t, p=2, q=2)
        return x[:, :, self.factor_t - 1 :] if first_chunk else x  # (B, C, T', 2H, 2W)


UPSAMPLERS = ("depth_to_space", "resize", "lanczos", "kaiser")


class ResizeUpsample(nn.Module):
    """Frames repeated in time and resized bilinearly in space, then a causal 3x3x3 convolution (Odena et al.,
    2016). Every output pixel is made by the same filter, so, unlike depth-to-space, there are no sub-pixel
    filters for training to pull apart into a seam or a checkerboard. It starts as an enlarged thumbnail instead,
    each latent cell smoother at its centre than at its edges, and on RealFootage it trained blockier than
    depth-to-space (benchmarks/RESULTS.md, "the resize upsampler on real footage"). The time axis follows
    :class:`DepthToSpaceUpsample` (1 + k -> 1 + s_t * k frames); space is resized frame by frame, so causality
    and chunked decoding hold. ``mode="lanczos"`` resizes by :func:`walt.nn.lanczos_upsample2x`, whose quiet
    centre is much weaker, ``mode="kaiser"`` by a low-pass that leaves less still (:func:`walt.nn.kaiser_kernels`);
    ``mode="nearest"`` by nearest neighbour (an experiment of benchmarks/tokenizer_grid.py: its 2-pixel blocks
    show).
    """

    def __init__(self, channels: int, temporal: bool, mode: str = "bilinear") -> None:
        super().__init__()
        self.factor_t = 2 if temporal else 1
        self.resize = FrameResize(mode)
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        first_chunk = cache.first_visit(self)
        x = x.repeat_interleave(self.factor_t, dim=2)  # (B, C, T*s_t, H, W)
        if first_chunk:  # latent frame 0 decodes to one frame
            x = x[:, :, self.factor_t - 1 :]  # (B, C, T', H, W)
        frames = rearrange(x, "b c t h w -> (b t) c h w")  # (B*T', C, H, W)
        frames = self.resize(frames, (2 * frames.shape[-2], 2 * frames.shape[-1]))  # (B*T', C, 2H, 2W)
        x = rearrange(frames, "(b t) c h w -> b c t h w", b=x.shape[0])  # (B, C, T', 2H, 2W)
        return self.conv(x, cache)  # (B, C, T', 2H, 2W)


def make_upsampler(kind: str, channels: int, temporal: bool) -> nn.Module:
    """The decoder's 2x upsampling layer: ``"depth_to_space"`` (MAGVIT-v2's, the default), ``"resize"``
    (bilinear, then a convolution), ``"lanczos"`` or ``"kaiser"`` (that windowed sinc, then a convolution)."""
    if kind == "depth_to_space":
        return DepthToSpaceUpsample(channels, temporal)
    if kind in ("resize", *SINC_KERNELS):
        return ResizeUpsample(channels, temporal, mode="bilinear" if kind == "resize" else kind)
    raise ValueError(f"upsampler must be one of {', '.join(UPSAMPLERS)}, got {kind!r}")
