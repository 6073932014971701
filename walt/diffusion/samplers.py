"""Samplers for v-prediction models: DDIM (Song et al., 2021) with an ``eta`` knob, ancestral DDPM and
DPM-Solver++(2M) (Lu et al., 2022).

``model_fn(x_t, t) -> v`` sees ``x_t`` in the dtype of the noise and ``t`` of shape ``(B,)`` in [0, 1]; the update
itself runs in ``dtype`` (float64 by default: the terminal steps subtract nearly equal numbers).

Stochastic steps draw their noise with :func:`walt.diffusion.noise.randn`: ``generator`` is None, one
``torch.Generator`` for the batch, or one generator per sample, so that with per-sample generators a sample's
trajectory depends on its own seed only, not on the batch it is drawn in. ``on_step(i)`` is called after each
denoising step ``i`` (0-based), e.g. to advance a progress bar counted in steps across batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from walt.diffusion.noise import Generators, randn
from walt.diffusion.parameterization import eps_from_v, x0_from_v
from walt.diffusion.schedule import NoiseSchedule, ZeroTerminalSNRLinearSchedule

__all__ = [
    "SAMPLERS",
    "ModelFn",
    "StepCallback",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "dpmpp_2m_sample",
    "sample",
    "time_grid",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int], None]

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")


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
    generator: Generators = None,
) -> torch.Tensor:
    """One step from time ``t`` to the earlier time ``s`` given the model's ``v`` at ``x_t``.

    ``t`` and ``s`` are scalars, or per-sample times shaped to broadcast against ``x_t`` (:func:`expand_like`).

    ``eta = 0`` is deterministic DDIM; ``eta = 1`` draws from the DDPM posterior ``q(x_s | x_t, x0)``, with noise
    from ``generator`` (None, one generator, or one per sample: :func:`walt.diffusion.noise.randn`).
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
    noise = randn(x_t.shape, generator, device=x_t.device, dtype=x_t.dtype)
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
    generator: Generators = None,
    progress: bool = False,
    on_step: StepCallback | None = None,
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
        if on_step is not None:
            on_step(i)
    return x.to(noise.dtype)


def ddpm_sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    num_steps: int = 1000,
    schedule: NoiseSchedule | None = None,
    dtype: torch.dtype = torch.float64,
    generator: Generators = None,
    progress: bool = False,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral sampling: every step draws from the DDPM posterior (DDIM with ``eta = 1``)."""
    return ddim_sample(
        model_fn, noise, num_steps, 1.0, schedule, dtype, 1.0, generator, progress, on_step=on_step
    )


@torch.no_grad()
def dpmpp_2m_sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    num_steps: int = 20,
    schedule: NoiseSchedule | None = None,
    dtype: torch.dtype = torch.float64,
    t_start: float = 1.0,
    progress: bool = False,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al., 2022, Algorithm 2): a deterministic multistep solver of the probability-flow
    ODE, second order in the data prediction ``x0 = alpha x_t - sigma v``; returns ``x_0`` in the noise's dtype.

    With ``lambda = log(alpha / sigma)`` and ``h = lambda_s - lambda_t`` for a step from ``t`` to the earlier
    ``s``, a step is ``x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D`` where
    ``D = x0_t + (x0_t - x0_prev) / (2 r)`` and ``r = h_prev / h`` (``D = x0_t``, first order, is the DDIM
    step). At zero terminal SNR ``lambda(1) = -inf``, so everything is written with ratios:
    ``alpha_s (1 - e^{-h}) = alpha_s - alpha_t sigma_s / sigma_t``, finite for every ``t > 0``. The first step
    (from ``t = 1``) is then exactly the DDIM step, and the second step, whose ``h_prev`` is infinite, is first
    order too (the correction ``h / (2 h_prev)`` vanishes); the correction is used only where both ``h_prev``
    and ``h`` are finite.

    The last step lands on ``t = 0`` where ``sigma = 0`` and ``h = +inf``: there ``r -> 0`` and the
    second-order correction diverges, so the last step is always first order (it returns the model's ``x0``
    prediction), as diffusers forces with ``final_sigmas_type="zero"`` (so its ``lower_order_final`` choice
    for few steps does not arise). That step is common to DDIM and DPM++ and dominates both at few steps:
    on Gaussian data N(0.5, 0.3^2), RMS error against the exact ODE solution is 0.106 (DPM++) vs 0.116 (DDIM)
    at 10 steps, 0.041 vs 0.063 at 20 and 0.0049 vs 0.027 at 50; before that last step DPM++ converges at
    second order (``tests/test_samplers.py``).

    Same evenly spaced time grid as :func:`ddim_sample`; the update runs in ``dtype``.
    """
    schedule = schedule or ZeroTerminalSNRLinearSchedule()
    times = time_grid(num_steps, t_start)  # on the CPU: the coefficients below are Python floats
    alphas, sigmas = (c.tolist() for c in schedule.alpha_sigma(times))
    # -inf at t = 1 (alpha = 0), +inf at t = 0 (sigma = 0)
    lambdas = (torch.tensor(alphas).log() - torch.tensor(sigmas).log()).tolist()
    x = noise.to(dtype)
    batch = noise.shape[0]
    x0_prev: torch.Tensor | None = None
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        t_batch = times[i].to(noise.device, noise.dtype).expand(batch)  # (B,)
        v = model_fn(x.to(noise.dtype), t_batch).to(dtype)
        alpha_t, sigma_t, alpha_s, sigma_s = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        x0 = x0_from_v(x, v, alpha_t, sigma_t)
        d = x0
        if x0_prev is not None:
            h, h_prev = lambdas[i + 1] - lambdas[i], lambdas[i] - lambdas[i - 1]
            if math.isfinite(h) and math.isfinite(h_prev):
                d = x0 + (h / (2.0 * h_prev)) * (x0 - x0_prev)  # 1 / (2r) with r = h_prev / h
        # (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D, with alpha_s e^{-h} = alpha_t sigma_s / sigma_t.
        x = (sigma_s / sigma_t) * x + (alpha_s - alpha_t * sigma_s / sigma_t) * d
        x0_prev = x0
        if on_step is not None:
            on_step(i)
    return x.to(noise.dtype)


def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    num_steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    schedule: NoiseSchedule | None = None,
    dtype: torch.dtype = torch.float64,
    t_start: float = 1.0,
    generator: Generators = None,
    progress: bool = False,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Run the sampler named ``sampler`` (one of :data:`SAMPLERS`) from ``noise`` at ``t_start`` down to data.

    ``"ddim"`` uses ``eta``; ``"ddpm"`` is ancestral sampling (``eta = 1``: leave ``eta`` at 0 or pass 1);
    ``"dpmpp_2m"`` is deterministic, takes no ``eta`` and draws no noise (``generator`` is then unused).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if sampler == "ddim":
        return ddim_sample(
            model_fn, noise, num_steps, eta, schedule, dtype, t_start, generator, progress, on_step
        )
    if sampler == "ddpm":
        if eta not in (0.0, 1.0):
            raise ValueError(
                f"sampler 'ddpm' is DDIM with eta = 1; got eta={eta} (use sampler='ddim' for it)"
            )
        return ddim_sample(
            model_fn, noise, num_steps, 1.0, schedule, dtype, t_start, generator, progress, on_step
        )
    if eta != 0.0:
        raise ValueError(f"sampler 'dpmpp_2m' is deterministic and takes no eta; got eta={eta}")
    return dpmpp_2m_sample(model_fn, noise, num_steps, schedule, dtype, t_start, progress, on_step)
