"""Numerical settings shared by the metric networks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["full_precision"]


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Plain, repeatable float32 math: no autocast, no TF32 (TF32 alone moves I3D logits by ~1e-3 relative),
    and no cuDNN autotuning (which may pick a different convolution algorithm, hence rounding, per run).

    Metric features must not depend on the caller's settings, or the same checkpoint would score differently
    inside and outside a bf16 training loop.
    """
    cudnn = torch.backends.cudnn
    saved = (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = cudnn.benchmark = False
    cudnn.deterministic = True
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved
