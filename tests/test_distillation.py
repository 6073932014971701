"""Distillation targets as pure functions: exact on a toy problem, guided targets, the student's time grid."""

from __future__ import annotations

import pytest
import torch

from walt.conditioning import Conditioning
from walt.diffusion import (
    ZeroTerminalSNRLinearSchedule,
    ddim_sample,
    ddim_step,
    expand_like,
    guidance_scales,
    guided_target,
    null_conditioning,
    student_times,
    time_grid,
    two_step_target,
)
from walt.transformer import WALT

SCHEDULE = ZeroTerminalSNRLinearSchedule()
# Per-sample steps, with the two ends: t = 1 (pure noise, alpha_t = 0) and s = 0 (clean data, sigma_s = 0).
T = torch.tensor([1.0, 1.0, 0.5, 0.3, 0.75, 0.02], dtype=torch.float64)
S = torch.tensor([0.5, 0.0, 0.0, 0.2, 0.625, 0.01], dtype=torch.float64)


def _alpha_sigma(t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return alpha.reshape(shape), sigma.reshape(shape)


def point_denoiser(x0_star: torch.Tensor):
    """The exact v-predictor for data that is the single point ``x0_star``: DDIM on it is exact in any steps."""

    def teacher_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = _alpha_sigma(t, x_t)
        eps = (x_t - alpha * x0_star) / sigma  # the one noise that explains x_t
        return alpha * eps - sigma * x0_star

    return teacher_fn


def gaussian_denoiser(std: float):
    """The exact v-predictor for data ~ N(0, std^2): its ODE paths curve, so one big DDIM step is not two."""

    def teacher_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = _alpha_sigma(t, x_t)
        x0 = alpha * std**2 * x_t / (alpha**2 * std**2 + sigma**2)  # E[x0 | x_t]
        return (alpha * x_t - x0) / sigma

    return teacher_fn


def _x_t(x0: torch.Tensor, seed: int = 0) -> torch.Tensor:
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    alpha, sigma = _alpha_sigma(T, x0)
    return alpha * x0 + sigma * eps


def test_two_step_target_is_the_teachers_own_v_where_ddim_is_exact():
    x0_star = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    teacher = point_denoiser(x0_star)
    x_t = _x_t(x0_star.expand(len(T), -1, -1, -1, -1))
    target = two_step_target(teacher, x_t, T, S, SCHEDULE)
    torch.testing.assert_close(target, teacher(x_t, T), rtol=0, atol=1e-12)
    # And a sampler using the target at each step of a 2-step grid lands on x0_star, like the teacher.
    noise = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(ddim_sample(teacher, noise, num_steps=2), x0_star, rtol=0, atol=1e-10)


def test_two_step_target_differs_from_one_teacher_step_where_ddim_is_not_exact():
    teacher = gaussian_denoiser(std=0.5)
    x_t = _x_t(0.5 * torch.randn(len(T), 3, 2, 4, 4, generator=torch.Generator().manual_seed(3)).double())
    target = two_step_target(teacher, x_t, T, S, SCHEDULE)
    gap = (target - teacher(x_t, T)).abs().flatten(1).amax(1)  # (B,) per step
    assert (gap > 1e-3).all(), gap
    # The target is defined by what it does: one DDIM step with it reaches the teacher's two-step point.
    half = (T + S) / 2
    two = ddim_sample_between(teacher, ddim_sample_between(teacher, x_t, T, half), half, S)
    one = ddim_sample_between(lambda x, t: target, x_t, T, S)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-10)


def ddim_sample_between(teacher_fn, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step per sample, from t (B,) to s (B,)."""
    return ddim_step(x, teacher_fn(x, t), expand_like(t, x), expand_like(s, x), SCHEDULE)


def test_two_step_target_keeps_the_input_dtype():
    x0_star = torch.randn(1, 3, 2, 4, 4)
    x_t = _x_t(x0_star.double().expand(len(T), -1, -1, -1, -1)).float()
    assert (
        two_step_target(point_denoiser(x0_star), x_t, T.float(), S.float(), SCHEDULE).dtype == torch.float32
    )


def test_guided_target_combines_separate_passes_with_one_scale_per_sample():
    torch.manual_seed(0)
    model = WALT(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=(2, 4, 4), num_classes=5)
    model = model.double().eval()
    with torch.no_grad():  # trained-looking: labels and every zero-initialised path do something
        for p in model.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(3, 4, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    cond = Conditioning(labels=torch.tensor([0, 3, 4]))
    w = torch.tensor([0.0, 1.5, 4.0], dtype=torch.float64)
    with torch.no_grad():
        v_c, v_u = model(x, t, cond), model(x, t, null_conditioning(cond))
    expected = v_u + w[:, None, None, None, None] * (v_c - v_u)
    torch.testing.assert_close(guided_target(model, x, t, cond, w), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(v_c, v_u)  # the scales matter
    with pytest.raises(ValueError, match="per sample"):
        guided_target(model, x, t, cond, w[:2])


def test_student_times_are_the_sampling_grid_one_step_apart():
    t, s = student_times(4000, 8, generator=torch.Generator().manual_seed(0))
    grid = time_grid(8)
    assert t.dtype == torch.float64 and set(t.tolist()) == set(grid[:-1].tolist())
    assert all(
        (grid == a).nonzero().item() + 1 == (grid == b).nonzero().item() for a, b in zip(t[:50], s[:50])
    )
    counts = torch.stack([(t == g).sum() for g in grid[:-1]])
    assert counts.min() > 400  # uniform over the 8 steps (500 expected each)


def test_guidance_scales_cover_the_range():
    w = guidance_scales(1000, 0.5, 4.0, generator=torch.Generator().manual_seed(0))
    assert 0.5 <= w.min() < 0.6 and 3.9 < w.max() <= 4.0
    with pytest.raises(ValueError, match="guidance range"):
        guidance_scales(4, 3.0, 1.0)
