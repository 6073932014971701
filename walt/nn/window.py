"""Window partition/merge for (B, T, H, W, D) token grids, and the masks that window attention needs.

Windows are folded into the batch dimension so that one batched attention call covers every window and
no Python loop runs over windows. A window size of -1 means "the whole axis".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Window = tuple[int, int, int]
Grid = tuple[int, int, int]


def fit_window(grid: Grid, window: Window) -> Window:
    """The window actually used for a requested `window` on a (T, H, W) `grid`.

    Per axis: -1 or a window at least as large as the axis covers the whole axis. Otherwise the axis is cut
    into the fewest windows that cover it, ceil(size / window), and split as evenly as possible among them,
    so a window never grows beyond the request and padding (size not divisible) is smaller than the number
    of windows. E.g. 16 frames with a requested 5 -> windows of 4 (no padding); 17 -> 5 (3 padded frames).
    """
    return tuple(_fit_axis(size, w) for size, w in zip(grid, window))  # type: ignore[return-value]


def _fit_axis(size: int, window: int) -> int:
    if window == -1 or window >= size:
        return size
    if window < 1:
        raise ValueError(f"window sizes must be positive or -1 (whole axis), got {window}")
    num_windows = -(-size // window)
    return -(-size // num_windows)


def padded_grid(grid: Grid, window: Window) -> Grid:
    """Smallest grid that is a multiple of `window` on every axis and contains `grid`."""
    return tuple(-(-g // w) * w for g, w in zip(grid, window))  # type: ignore[return-value]


def pad_to_windows(x: Tensor, window: Window) -> Tensor:
    """Zero-pads (B, T, H, W, D) at the end of T, H and W up to a multiple of `window`."""
    T, H, W = x.shape[1:4]
    Tp, Hp, Wp = padded_grid((T, H, W), window)
    if (Tp, Hp, Wp) == (T, H, W):
        return x
    return F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H, 0, Tp - T))  # (B, Tp, Hp, Wp, D)


def window_partition(x: Tensor, window: Window) -> Tensor:
    """(B, T, H, W, D) -> (B * num_windows, wt * wh * ww, D), windows of one sample contiguous, raster order.

    The grid must be divisible by `window` (see `pad_to_windows`).
    """
    B, T, H, W, D = x.shape
    wt, wh, ww = window
    if T % wt or H % wh or W % ww:
        raise ValueError(f"grid {(T, H, W)} is not divisible by window {window}; pad it with pad_to_windows")
    x = x.view(B, T // wt, wt, H // wh, wh, W // ww, ww, D)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, nT, nH, nW, wt, wh, ww, D)
    return x.reshape(B * (T // wt) * (H // wh) * (W // ww), wt * wh * ww, D)


def window_merge(windows: Tensor, window: Window, grid: Grid) -> Tensor:
    """Exact inverse of `window_partition`: (B * num_windows, wt * wh * ww, D) -> (B, T, H, W, D)."""
    T, H, W = grid
    wt, wh, ww = window
    D = windows.shape[-1]
    x = windows.view(-1, T // wt, H // wh, W // ww, wt, wh, ww, D)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, nT, wt, nH, wh, nW, ww, D)
    return x.reshape(-1, T, H, W, D)


def window_attention_mask(
    grid: Grid,
    window: Window,
    batch_size: int,
    is_image: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor | None:
    """Boolean attention mask (True = may attend) for window attention on a padded `grid`, or None.

    None on the common path (grid divisible by the window and no packed images), so attention runs
    unmasked (flash kernels). Otherwise the mask has shape (B * num_windows, 1, Nq, Nk) with Nq in {1, Nk}:
    - padded positions are never attended to;
    - for samples with `is_image` (B,) True, the T frames are independent images, so a token only attends
      to tokens of its own frame. Every token may attend to itself, which keeps rows of padded query
      positions (discarded afterwards) well defined.
    """
    isolate_frames = is_image is not None and window[0] > 1
    padded = padded_grid(grid, window) != tuple(grid)
    if not (padded or isolate_frames):
        return None
    device = is_image.device if is_image is not None else device
    n = window[0] * window[1] * window[2]
    valid = _valid_tokens(grid, window, device)  # (nw, N)
    num_windows = valid.shape[0]
    if not isolate_frames:
        mask = valid[None, :, None, :].expand(batch_size, num_windows, 1, n)  # (B, nw, 1, N)
        return mask.reshape(batch_size * num_windows, 1, 1, n)
    frame = torch.arange(n, device=device) // (window[1] * window[2])  # (N,)
    same_frame = frame[:, None] == frame[None, :]  # (N, N)
    video_mask = valid[:, None, :].expand(num_windows, n, n)  # (nw, N, N)
    image_mask = video_mask & same_frame  # (nw, N, N)
    mask = torch.where(is_image[:, None, None, None], image_mask, video_mask)  # (B, nw, N, N)
    mask = mask | torch.eye(n, dtype=torch.bool, device=device)  # (B, nw, N, N)
    return mask.reshape(batch_size * num_windows, 1, n, n)


def _valid_tokens(grid: Grid, window: Window, device: torch.device | None) -> Tensor:
    """(num_windows, N) bool: which window positions hold real tokens rather than padding."""
    Tp, Hp, Wp = padded_grid(grid, window)
    t = torch.arange(Tp, device=device) < grid[0]
    h = torch.arange(Hp, device=device) < grid[1]
    w = torch.arange(Wp, device=device) < grid[2]
    valid = t[:, None, None] & h[None, :, None] & w[None, None, :]  # (Tp, Hp, Wp)
    return window_partition(valid[None, ..., None], window)[..., 0]  # (nw, N)
