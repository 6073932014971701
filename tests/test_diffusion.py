"""Schedules, parameterisation and samplers, checked against closed forms and exact denoisers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from walt.diffusion import (
    CosineSchedule,
    ZeroTerminalSNRLinearSchedule,
    alpha_sigma,
    corrupt,
    ddim_sample,
    ddpm_sample,
    eps_from_v,
    linear_beta_alphas_cumprod,
    noisy,
    rescale_zero_terminal_snr,
    v_from_eps,
    v_loss,
    velocity,
    x0_from_eps,
    x0_from_v,
)

SCHEDULES = [ZeroTerminalSNRLinearSchedule(), CosineSchedule(), CosineSchedule(shift=0.5)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["zsnr-linear", "cosine", "cosine-shift"])
def test_schedule_is_variance_preserving_monotone_and_ends_in_pure_noise(schedule):
    t = torch.rand(1000, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha.square() + sigma.square(), torch.ones_like(t), rtol=0, atol=1e-12)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    a, _ = schedule.alpha_sigma(grid)
    assert torch.all(a[1:] <= a[:-1])
    a0, s0 = schedule.alpha_sigma(torch.zeros(1, dtype=torch.float64))
    a1, s1 = schedule.alpha_sigma(torch.ones(1, dtype=torch.float64))
    assert a0.item() == pytest.approx(1.0) and s0.item() == pytest.approx(0.0, abs=1e-12)
    assert a1.item() == 0.0 and s1.item() == 1.0  # zero terminal SNR


def test_default_schedule_matches_an_independent_computation():
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    assert abar[-1] == pytest.approx(
        4.0358e-5, rel=1e-3
    )  # the plain linear schedule never reaches pure noise
    root = np.sqrt(abar)
    rescaled = (root - root[-1]) * root[0] / (root[0] - root[-1])
    np.testing.assert_allclose(linear_beta_alphas_cumprod().numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(
        rescale_zero_terminal_snr(torch.from_numpy(abar)).sqrt().numpy(), rescaled, atol=1e-15
    )
    # Step i of 1000 sits at t = (i + 1) / 1000.
    steps = torch.tensor([0, 1, 499, 998, 999])
    alpha, _ = alpha_sigma((steps + 1).double() / 1000)
    np.testing.assert_allclose(alpha.numpy(), rescaled[steps.numpy()], rtol=1e-12, atol=1e-15)
    # Halfway between two grid points alpha is the average of its neighbours.
    mid, _ = alpha_sigma(torch.tensor([500.5 / 1000], dtype=torch.float64))
    assert mid.item() == pytest.approx((rescaled[499] + rescaled[500]) / 2, rel=1e-12)


def test_resolution_shift_moves_log_snr_by_a_constant():
    t = torch.linspace(0.05, 0.95, 50, dtype=torch.float64)
    a, s = CosineSchedule().alpha_sigma(t)
    a2, s2 = CosineSchedule(shift=0.25).alpha_sigma(t)
    log_snr, log_snr2 = 2 * (a / s).log(), 2 * (a2 / s2).log()
    torch.testing.assert_close(log_snr2 - log_snr, torch.full_like(t, 2 * math.log(0.25)))


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(4, 3, 5, 6, 6, generator=g, dtype=torch.float64),
        torch.randn(4, 3, 5, 6, 6, generator=g, dtype=torch.float64),
    )
    alpha, sigma = alpha_sigma(torch.rand(4, 1, 1, 1, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01)
    x_t, v = noisy(x0, eps, alpha, sigma), velocity(x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_v(x_t, v, alpha, sigma), x0)
    torch.testing.assert_close(eps_from_v(x_t, v, alpha, sigma), eps)
    torch.testing.assert_close(x0_from_eps(x_t, eps, alpha, sigma), x0)
    torch.testing.assert_close(v_from_eps(x_t, eps, alpha, sigma), v)
    x_t2, v2 = corrupt(x0, torch.full((4,), 0.3, dtype=torch.float64), eps, ZeroTerminalSNRLinearSchedule())
    a, s = alpha_sigma(torch.tensor(0.3, dtype=torch.float64))
    torch.testing.assert_close(x_t2, a * x0 + s * eps)
    torch.testing.assert_close(v2, a * eps - s * x0)


def _exact_v(denoise, schedule):
    """The v that a perfect model outputs, given the exact posterior mean E[x0 | x_t]."""

    def model_fn(x_t, t):
        alpha, sigma = schedule.alpha_sigma(t.double())
        alpha, sigma = alpha.view(-1, *[1] * (x_t.ndim - 1)), sigma.view(-1, *[1] * (x_t.ndim - 1))
        x0 = denoise(x_t.double(), alpha, sigma)
        eps = (x_t - alpha * x0) / sigma
        return alpha * eps - sigma * x0

    return model_fn


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_an_exact_denoiser_returns_the_single_data_point(eta):
    schedule = ZeroTerminalSNRLinearSchedule()
    target = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    model_fn = _exact_v(lambda x_t, a, s: target.expand_as(x_t), schedule)
    noise = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    out = ddim_sample(model_fn, noise, num_steps=50, eta=eta, schedule=schedule)
    torch.testing.assert_close(out, target, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_reproduce_a_gaussian_data_distribution(sampler):
    """Data N(mu, s^2): E[x0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)."""
    mu, std = 0.7, 0.4
    schedule = ZeroTerminalSNRLinearSchedule()
    model_fn = _exact_v(lambda x, a, s: mu + a * std**2 * (x - a * mu) / (a**2 * std**2 + s**2), schedule)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, dtype=torch.float64, generator=g)
    if sampler == "ddim":
        out = ddim_sample(model_fn, noise, num_steps=250, schedule=schedule)  # 100 steps: std 0.385
    else:
        out = ddpm_sample(model_fn, noise, num_steps=500, schedule=schedule, generator=g)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(std, abs=0.01)


def test_v_loss_masks_elements():
    pred, target = torch.zeros(2, 1, 4), torch.ones(2, 1, 4)
    target[:, :, :2] = 3.0
    assert v_loss(pred, target).item() == pytest.approx(5.0)
    weight = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 4)
    assert v_loss(pred, target, weight).item() == pytest.approx(1.0)
