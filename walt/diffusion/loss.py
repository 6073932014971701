"""The training objective: plain MSE on the velocity, no loss weighting (W.A.L.T)."""

from __future__ import annotations

import torch

from walt.diffusion.parameterization import expand_time, noisy, velocity
from walt.diffusion.schedule import NoiseSchedule

__all__ = ["corrupt", "v_loss"]


def corrupt(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy inputs and velocity targets for data ``x0`` (B, ...) at per-sample times ``t`` (B,), or per-frame
    times (B, T) for latents (B, C, T, H, W)."""
    alpha, sigma = schedule.alpha_sigma(t)
    alpha, sigma = expand_time(alpha, x0).to(x0.dtype), expand_time(sigma, x0).to(x0.dtype)
    return noisy(x0, noise, alpha, sigma), velocity(x0, noise, alpha, sigma)


def v_loss(
    prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in float32; ``weight`` (broadcastable, e.g. 0 on given context frames) masks elements."""
    err = (prediction.float() - target.float()).square()
    if weight is None:
        return err.mean()
    weight = weight.float().expand_as(err)
    return (err * weight).sum() / weight.sum().clamp(min=1.0)
