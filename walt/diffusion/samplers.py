"""Samplers for v-prediction models: DDIM (Song et al., 2021) with an ``eta`` knob and ancestral DDPM.

``model_fn(x_t, t) -> v`` sees ``x_t`` in the dtype of the noise and ``t`` of shape ``(B,)`` in [0, 1]; the update
itself runs in ``dtype`` (float64 by default: the terminal steps subtract nearly equal numbers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from walt.diffusion.parameterization import eps_from_v, x0_from_v
from walt.diffusion.schedule import NoiseSchedule, ZeroTerminalSNRLinearSchedule

__all__ = ["ModelFn", "ddim_sample", "ddim_step", "ddpm_sample", "time_grid"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(num_steps: int, t_start: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``num_steps + 1`` evenly spaced times from ``t_start`` down to 0, in float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(t_start, 0.0, num_steps + 1, dtype=torch.float64, device=device)


def ddim_step(
    x_t: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One step from time ``t`` to the earlier time ``s`` given the model's ``v`` at ``x_t``.

    ``t`` and ``s`` are scalars, or per-sample times shaped to broadcast against ``x_t`` (:func:`expand_like`).

    ``eta = 0`` is deterministic DDIM; ``eta = 1`` draws from the DDPM posterior ``q(x_s | x_t, x0)``.
    """
    alpha_t, sigma_t = schedule.alpha_sigma(t.to(x_t.dtype))
    alpha_s, sigma_s = schedule.alpha_sigma(s.to(x_t.dtype))
    x0 = x0_from_v(x_t, v, alpha_t, sigma_t)
    eps = eps_from_v(x_t, v, alpha_t, sigma_t)
    if eta == 0.0:
        return alpha_s * x0 + sigma_s * eps
    # c^2 = eta^2 * variance of the DDPM posterior q(x_s | x_t, x0) = (sigma_s / sigma_t)^2 (1 - alpha_t^2 / alpha_s^2);
    # alpha_t = 0 (pure noise) is fine here, and alpha_s > 0 for every s < 1.
    c = eta * (sigma_s / sigma_t) * (1.0 - (alpha_t / alpha_s).square()).clamp(min=0.0).sqrt()
    noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return alpha_s * x0 + (sigma_s.square() - c.square()).clamp(min=0.0).sqrt() * eps + c * noise


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    num_steps: int = 50,
    eta: float = 0.0,
    schedule: NoiseSchedule | None = None,
    dtype: torch.dtype = torch.float64,
    t_start: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from ``noise`` (at ``t_start``, pure noise for 1.0) to data; returns ``x_0`` in the noise's dtype."""
    schedule = schedule or ZeroTerminalSNRLinearSchedule()
    times = time_grid(num_steps, t_start, noise.device)
    x = noise.to(dtype)
    batch = noise.shape[0]
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        t, s = times[i], times[i + 1]
        t_batch = t.expand(batch).to(noise.dtype)  # (B,)
        v = model_fn(x.to(noise.dtype), t_batch).to(dtype)
        x = ddim_step(x, v, t, s, schedule, eta, generator)
    return x.to(noise.dtype)


def ddpm_sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    num_steps: int = 1000,
    schedule: NoiseSchedule | None = None,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling: every step draws from the DDPM posterior (DDIM with ``eta = 1``)."""
    return ddim_sample(model_fn, noise, num_steps, 1.0, schedule, dtype, 1.0, generator, progress)
