"""Gaussian noise drawn per sample, so a sample depends on its own seed and nothing else.

A single ``torch.Generator`` shared by a batch ties each sample's noise to its position in the batch: the same
seed gives other videos at another batch size, in another batch, or on another process. With one generator per
sample (seeded by the sample's own seed) every draw of sample ``i`` comes from generator ``i`` alone, in the
same order whatever else is in the batch: initial noise, then each stochastic sampler step's noise. EDM's
sampler script draws per-sample noise the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Generators", "per_sample_generators", "randn"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def per_sample_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample on ``device``, seeded with that sample's seed."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (batch first).

    ``generator``: None (the global stream), one generator for the whole tensor, or a sequence of one
    generator per sample (``len == shape[0]``), each drawing its own sample's slice. Generators must live on
    ``device``.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}: give one per sample")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generators]
    return torch.cat(rows) if rows else torch.empty(tuple(shape), device=device, dtype=dtype)
