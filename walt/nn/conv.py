"""Causal 3D convolution that can stream over time chunks.

A causal network sees frame t only through frames <= t. Run in chunks, every layer must remember the tail of
its input that the next chunk still needs; `CausalCache` holds that per-layer state. Running the whole clip as
one chunk with a fresh cache is the ordinary full pass, so chunked and full passes are one code path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"expected an int or a (time, height, width) triple, got {value!r}")
    return tuple(value)


class CausalCache:
    """Per-layer streaming state for one pass of a causal network over a sequence of time chunks.

    Start a fresh cache for every new clip; reusing one across clips would leak the previous clip's frames.
    ``streaming=False`` says the clip comes as one chunk: layers then keep nothing for a next chunk (a copy of
    their last frames would only cost time and memory), and a second chunk is refused.
    """

    def __init__(self, streaming: bool = True) -> None:
        self.streaming = streaming
        self._state: dict[int, object] = {}

    def get(self, owner: nn.Module) -> object | None:
        return self._state.get(id(owner))

    def set(self, owner: nn.Module, value: object) -> None:
        self._state[id(owner)] = value

    def first_visit(self, owner: nn.Module) -> bool:
        """True exactly once per owner: when it processes the chunk that holds frame 0."""
        first = id(owner) not in self._state
        self._state[id(owner)] = True
        return first


class CausalConv3d(nn.Module):
    """3D convolution padded on the left in time only, so output frame t depends on input frames <= t.

    The left padding repeats frame 0 (a still image behaves like a static clip). With a temporal stride s,
    output frame i reads the `kernel_t` padded frames ending at input frame s*i, so frame 0 is encoded alone.
    Space is padded symmetrically ("same" for odd kernels).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        self.kernel_t, self.stride_t = kt, _triple(stride)[0]
        if self.stride_t > kt:
            raise ValueError(f"temporal stride {self.stride_t} > temporal kernel {kt} would skip frames")
        self.conv = nn.Conv3d(
            in_channels, out_channels, (kt, kh, kw), stride=stride, padding=(0, kh // 2, kw // 2), bias=bias
        )

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """x: (B, C, T, H, W), one chunk of a clip; `cache` carries the tail of the previous chunk."""
        cache = CausalCache(streaming=False) if cache is None else cache
        history = cache.get(self)
        if history is _ONE_PASS:
            raise RuntimeError(
                "a second chunk through a CausalCache(streaming=False): make it with streaming=True"
            )
        if history is None:
            history = x[:, :, :1].expand(-1, -1, self.kernel_t - 1, -1, -1)  # (B, C, kt-1, H, W)
        buf = torch.cat([history, x], dim=2)  # (B, C, L, H, W)
        num_out = max(0, (buf.shape[2] - self.kernel_t) // self.stride_t + 1)
        tail = _detached_tail(buf[:, :, num_out * self.stride_t :]) if cache.streaming else _ONE_PASS
        cache.set(self, tail)  # the frames the next output still needs
        if num_out == 0:  # a short chunk that only fills the history
            return self._empty_output(x)  # (B, C', 0, H', W')
        used = (num_out - 1) * self.stride_t + self.kernel_t
        return self.conv(buf[:, :, :used])  # (B, C', num_out, H', W')

    def _empty_output(self, x: Tensor) -> Tensor:
        k, s, p = self.conv.kernel_size, self.conv.stride, self.conv.padding
        h, w = ((size + 2 * p[i] - k[i]) // s[i] + 1 for i, size in zip((1, 2), x.shape[-2:]))
        return x.new_zeros(x.shape[0], self.conv.out_channels, 0, h, w)


_ONE_PASS = object()  # what a layer leaves in a non-streaming cache


def _detached_tail(frames: Tensor) -> Tensor:
    """A copy of the frames a layer keeps for the next chunk, in the dtype its convolution reads them in.

    A slice would keep the layer's whole input alive in the cache until the next chunk: at 17x512x896 that is
    gigabytes per decoder layer. Under autocast the convolution reads its input in the low-precision dtype, so
    keeping the frames in it computes exactly what keeping them in float32 would, at half the memory.
    """
    device = frames.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # not on "meta"
    dtype = torch.get_autocast_dtype(device) if autocast else frames.dtype
    return frames.to(dtype, copy=True)  # (B, C, kt - 1 or fewer, H, W)


def causal_repeat_time(x: Tensor, factor: int, first_chunk: bool) -> Tensor:
    """Repeats every frame `factor` times, except frame 0 of the clip, which stays single.

    This is the causal nearest-neighbour upsampling in time: 1 + k frames become 1 + factor * k, and output
    frame f depends on input frame ceil(f / factor) only.
    """
    x = x.repeat_interleave(factor, dim=2)  # (B, C, T * factor, H, W)
    return x[:, :, factor - 1 :] if first_chunk else x
