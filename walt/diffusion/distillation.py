"""Targets for distilling a v-prediction sampler into fewer steps.

- :func:`two_step_target`: progressive distillation (Salimans & Ho, 2022, Algorithm 2): the v with which ONE
  DDIM step from t to s lands where TWO of the teacher's DDIM steps (t -> (t+s)/2 -> s) land.
- :func:`guided_target`: guided distillation, stage one (Meng et al., 2023): the classifier-free-guided
  teacher's v at a per-sample scale w, for a student that takes w as an input and so needs one pass, not two.
- :func:`student_times` and :func:`guidance_scales` draw what a training batch is distilled at: the times of
  the student's own sampling grid, and the guidance scales.
"""

from __future__ import annotations

import torch

from walt.conditioning import Conditioning
from walt.diffusion.guidance import ConditionalModel, guided
from walt.diffusion.parameterization import expand_like
from walt.diffusion.samplers import ModelFn, ddim_step, time_grid
from walt.diffusion.schedule import NoiseSchedule

__all__ = ["guidance_scales", "guided_target", "student_times", "two_step_target"]


@torch.no_grad()
def two_step_target(
    teacher_fn: ModelFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    schedule: NoiseSchedule,
) -> torch.Tensor:
    """The v a student must predict at ``(x_t, t)`` so that one DDIM step to ``s`` equals two teacher steps.

    ``x_t`` (B, ...) noisy inputs; ``t`` > ``s`` >= 0 per-sample times (B,). ``teacher_fn(x, t) -> v`` is called
    twice, at t and at the midpoint (t + s) / 2 (give it a self-conditioned chain to pass the first step's
    estimate to the second). The update and the inversion run in float64, as in the samplers: near s = 0 the
    target is a difference of nearly equal numbers. Returns v in ``x_t``'s dtype.
    """
    t64, s64 = t.to(torch.float64), s.to(torch.float64)  # (B,) each
    u64 = (t64 + s64) / 2  # (B,) the teacher's midpoint
    x = x_t.to(torch.float64)  # (B, ...)
    tt, uu, ss = (expand_like(time, x) for time in (t64, u64, s64))  # (B, 1, ..., 1) each
    v = teacher_fn(x_t, t64.to(x_t.dtype)).to(torch.float64)  # (B, ...)
    x_u = ddim_step(x, v, tt, uu, schedule)  # (B, ...)
    v = teacher_fn(x_u.to(x_t.dtype), u64.to(x_t.dtype)).to(torch.float64)  # (B, ...)
    x_s = ddim_step(x_u, v, uu, ss, schedule)  # (B, ...) where the teacher's two steps land
    alpha_t, sigma_t = schedule.alpha_sigma(tt)  # (B, 1, ..., 1) each
    alpha_s, sigma_s = schedule.alpha_sigma(ss)
    # One DDIM step maps x_t to alpha_s x0 + sigma_s (x_t - alpha_t x0) / sigma_t: solve it for the x0 that
    # reaches x_s. The denominator is positive for s < t (the SNR falls with t), also at t = 1 (alpha_t = 0).
    ratio = sigma_s / sigma_t  # (B, 1, ..., 1); 0 at s = 0, where x0 = x_s
    x0 = (x_s - ratio * x) / (alpha_s - ratio * alpha_t)  # (B, ...)
    return ((alpha_t * x - x0) / sigma_t).to(x_t.dtype)  # (B, ...) v = (alpha_t x_t - x0) / sigma_t


@torch.no_grad()
def guided_target(
    teacher: ConditionalModel,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The guided teacher's ``v_u + w (v_c - v_u)`` at ``(x_t, t)`` with one ``w`` per sample (``scale`` (B,)).

    The conditional and unconditional passes run as one batch of 2B (:func:`walt.diffusion.guided`).
    """
    return guided(teacher, scale)(x_t, t, cond)


def student_times(
    batch: int,
    num_steps: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample step ``(t, s)`` (B,) each, float64, drawn uniformly from the ``num_steps``-step DDIM grid.

    The times are the grid's own values (:func:`walt.diffusion.time_grid`): t = i / K for i uniform in 1..K and
    s = t - 1 / K, so a student is trained at exactly the times it samples at.
    """
    grid = time_grid(num_steps, device=device)  # (K + 1,) from 1 down to 0
    index = torch.randint(0, num_steps, (batch,), device=device, generator=generator)  # (B,)
    return grid[index], grid[index + 1]


def guidance_scales(
    batch: int,
    low: float,
    high: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Guidance scales ``w`` (B,) uniform in [low, high]: a guidance-distilled student learns the whole range."""
    if not 0.0 <= low <= high:
        raise ValueError(f"the guidance range must satisfy 0 <= low <= high, got ({low}, {high})")
    return low + (high - low) * torch.rand(batch, device=device, generator=generator)
