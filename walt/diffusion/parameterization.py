"""Conversions between the data ``x0``, the noise ``eps``, the velocity ``v`` and the noisy ``x_t``.

With ``x_t = alpha x0 + sigma eps`` and ``v = alpha eps - sigma x0`` (Salimans & Ho, 2022), and
``alpha^2 + sigma^2 = 1``, each pair determines the rest. ``alpha`` and ``sigma`` broadcast against the tensors
(use :func:`expand_like` for per-sample values).
"""

from __future__ import annotations

import torch

__all__ = [
    "eps_from_v",
    "expand_like",
    "expand_time",
    "noisy",
    "v_from_eps",
    "velocity",
    "x0_from_eps",
    "x0_from_v",
]


def expand_like(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(B,)`` coefficients -> ``(B, 1, ..., 1)`` broadcastable against ``x``."""
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def expand_time(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Coefficients of diffusion times against latents ``x`` (B, C, T, H, W): per sample ``(B,)`` ->
    ``(B, 1, ..., 1)``, per frame ``(B, T)`` (images packed along time) -> ``(B, 1, T, 1, 1)``."""
    if coef.ndim == 2:
        return coef[:, None, :, None, None]
    return expand_like(coef, x)


def noisy(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return alpha * x0 + sigma * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return alpha * eps - sigma * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return alpha * x_t - sigma * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return sigma * x_t + alpha * v


def x0_from_eps(
    x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """Undefined where ``alpha = 0`` (pure noise): prefer v-prediction there."""
    return (x_t - sigma * eps) / alpha


def v_from_eps(
    x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    return (eps - sigma * x_t) / alpha
