"""Noise schedules in continuous time: ``x_t = alpha(t) x_0 + sigma(t) eps`` with ``alpha^2 + sigma^2 = 1``.

t runs from 0 (data) to 1 (pure noise). The default schedule is W.A.L.T's: Stable Diffusion's linear betas
(1e-4 .. 0.02 over 1000 steps) rescaled so the last step has zero SNR (Lin et al., 2024), which lets the model
see pure noise in training, as it does at the start of sampling.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from walt.config import records_init_args

__all__ = [
    "CosineSchedule",
    "NoiseSchedule",
    "ZeroTerminalSNRLinearSchedule",
    "alpha_sigma",
    "linear_beta_alphas_cumprod",
    "rescale_zero_terminal_snr",
]


class NoiseSchedule(Protocol):
    """Anything that maps times ``t`` (any shape, in [0, 1]) to ``(alpha, sigma)`` of the same shape."""

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def linear_beta_alphas_cumprod(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Cumulative products of ``1 - beta`` for linearly spaced betas, in float64: ``(num_steps,)``."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale ``sqrt(alphas_cumprod)`` so the first value is unchanged and the last is exactly 0."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root.square()


class ZeroTerminalSNRLinearSchedule:
    """The discrete linear-beta schedule, rescaled to zero terminal SNR, read in continuous time.

    Step ``i`` of ``num_steps`` sits at ``t = (i + 1) / num_steps``; ``t = 0`` is clean data (``alpha = 1``).
    Between grid points ``alpha`` is interpolated linearly and ``sigma = sqrt(1 - alpha^2)``, so
    ``alpha^2 + sigma^2 = 1`` holds exactly at every t and ``alpha(1) = 0``.
    """

    @records_init_args
    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        alphas = rescale_zero_terminal_snr(linear_beta_alphas_cumprod(num_steps, beta_start, beta_end)).sqrt()
        self.num_steps = num_steps
        self._alpha_grid = torch.cat(
            [torch.ones(1, dtype=torch.float64), alphas]
        )  # (num_steps + 1,) at t = i / N

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self._alpha_grid.to(t.device)
        pos = t.to(torch.float64).clamp(0.0, 1.0) * self.num_steps
        lo = pos.floor().long().clamp(max=self.num_steps - 1)
        frac = pos - lo
        alpha = grid[lo] * (1 - frac) + grid[lo + 1] * frac
        sigma = (1.0 - alpha.square()).clamp(min=0.0).sqrt()
        return alpha.to(_float_dtype(t)), sigma.to(_float_dtype(t))


class CosineSchedule:
    """``alpha = cos(pi t / 2)`` with an optional resolution shift of the log-SNR.

    ``shift = base_resolution / resolution`` (e.g. 64 / 128 = 0.5) adds ``2 log(shift)`` to the log-SNR at every
    t, giving larger images the extra noise they need to destroy the same amount of information
    (Hoogeboom et al., "simple diffusion"). ``shift = 1`` is the plain cosine schedule. ``alpha(1) = 0``.
    """

    @records_init_args
    def __init__(self, shift: float = 1.0) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = shift

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t64 = t.to(torch.float64).clamp(0.0, 1.0)
        # sin(pi/2 (1 - t)) rather than cos(pi/2 t): exactly 0 at t = 1.
        alpha, sigma = torch.sin(0.5 * math.pi * (1.0 - t64)), torch.sin(0.5 * math.pi * t64)
        if self.shift != 1.0:
            # logSNR' = logSNR + 2 log(shift)  <=>  alpha'/sigma' = shift * alpha / sigma, renormalised.
            norm = torch.sqrt((self.shift * alpha).square() + sigma.square())
            alpha, sigma = self.shift * alpha / norm, sigma / norm
        return alpha.to(_float_dtype(t)), sigma.to(_float_dtype(t))


_DEFAULT = ZeroTerminalSNRLinearSchedule()


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma)`` of the default schedule (linear betas rescaled to zero terminal SNR) at times ``t``."""
    return _DEFAULT.alpha_sigma(t)


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()
