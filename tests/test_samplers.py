"""DDIM, DDPM and DPM-Solver++(2M) on an exact Gaussian denoiser, against diffusers, and with per-sample noise.

For data ``x0 ~ N(mu, s^2)`` per element, ``x_t = alpha x0 + sigma eps`` is Gaussian and the exact model output
is closed form under any schedule. The probability-flow ODE keeps the standardised coordinate
``z = (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)`` constant, so a deterministic sampler started from pure
noise ``z`` at t = 1 should return ``mu + s z``: errors below are measured against that map.
"""

from __future__ import annotations

import pytest
import torch

from walt.diffusion import (
    SAMPLERS,
    ZeroTerminalSNRLinearSchedule,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    per_sample_generators,
    randn,
    sample,
    time_grid,
)

MU, STD = 0.5, 0.3
SHAPE = (4, 3, 4, 8, 8)  # (B, C, T, H, W)
SCHEDULE = ZeroTerminalSNRLinearSchedule()


def gaussian_v(mu: float, std: float, schedule=SCHEDULE):
    """The exact v for data N(mu, std^2): with D = alpha^2 std^2 + sigma^2,
    E[x0 | x_t] = mu + alpha std^2 (x_t - alpha mu) / D and E[eps | x_t] = sigma (x_t - alpha mu) / D, so
    v = alpha E[eps] - sigma E[x0] = sigma (alpha (1 - std^2) (x_t - alpha mu) / D - mu): no division by sigma."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = schedule.alpha_sigma(t.double())
        alpha, sigma = (c.view(-1, *[1] * (x_t.ndim - 1)) for c in (alpha, sigma))
        d = alpha.square() * std**2 + sigma.square()
        v = sigma * (alpha * (1 - std**2) * (x_t.double() - alpha * mu) / d - mu)
        return v.to(x_t.dtype)

    return model_fn


def exact_x_t(noise: torch.Tensor, t: float, mu: float = MU, std: float = STD) -> torch.Tensor:
    """Where the probability-flow ODE started from ``noise`` at t = 1 passes at time ``t``."""
    alpha, sigma = SCHEDULE.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    return alpha * mu + (alpha.square() * std**2 + sigma.square()).sqrt() * noise


def rms(x: torch.Tensor) -> float:
    return x.square().mean().sqrt().item()


@pytest.fixture
def noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def recording(model_fn, inputs: dict[float, torch.Tensor]):
    """``model_fn`` that also keeps the ``x_t`` it is called with, by time."""

    def fn(x_t, t):
        inputs[round(t[0].item(), 9)] = x_t.clone()
        return model_fn(x_t, t)

    return fn


# ---------------------------------------------------------------------------------------------------------------
# Accuracy on the exact Gaussian denoiser


def test_fine_ddim_reaches_the_exact_probability_flow_map(noise):
    """DDIM converges to ``mu + s * noise`` at first order: rms error 1.47e-3 at 1000 steps, 7.4e-4 at 2000."""
    model_fn, target = gaussian_v(MU, STD), MU + STD * noise
    err_1000 = rms(ddim_sample(model_fn, noise, num_steps=1000) - target)
    err_2000 = rms(ddim_sample(model_fn, noise, num_steps=2000) - target)
    assert err_2000 < 1e-3
    assert 1.8 < err_1000 / err_2000 < 2.2  # first order: halving the step halves the error
    # The higher-order solver lands on the same map with far fewer steps (rms 2.8e-5 at 200 steps).
    assert rms(dpmpp_2m_sample(model_fn, noise, num_steps=200) - target) < 1e-4


def test_dpmpp_2m_is_second_order_along_the_trajectory(noise):
    """Error of the state at t = 0.2 against the exact ODE solution (rms over elements):

    ========  ===========  ===========
    steps     DDIM         DPM++(2M)
    ========  ===========  ===========
    20        6.2e-3       1.3e-3
    40        3.1e-3       3.4e-4
    80        1.6e-3       8.5e-5
    ========  ===========  ===========
    """
    model_fn, target = gaussian_v(MU, STD), exact_x_t(noise, 0.2)
    errors = {}
    for name, sampler in (("ddim", ddim_sample), ("dpmpp_2m", dpmpp_2m_sample)):
        for steps in (20, 40, 80):
            inputs: dict[float, torch.Tensor] = {}
            sampler(recording(model_fn, inputs), noise, num_steps=steps)
            errors[name, steps] = rms(inputs[0.2] - target)
    for coarse, fine in ((20, 40), (40, 80)):
        assert 1.8 < errors["ddim", coarse] / errors["ddim", fine] < 2.2  # first order
        assert 3.5 < errors["dpmpp_2m", coarse] / errors["dpmpp_2m", fine] < 4.5  # second order
    assert errors["dpmpp_2m", 20] < errors["ddim", 80] / 1.2


def test_dpmpp_2m_converges_in_fewer_steps_than_ddim(noise):
    """RMS error of the final sample against ``mu + s * noise`` (zero-terminal-SNR linear schedule):

    ==========  =====================  =====================
    steps       s = 0.3: DDIM / DPM++  s = 1.0: DDIM / DPM++
    ==========  =====================  =====================
    5           0.189  / 0.187         0.322  / 0.260
    10          0.116  / 0.106         0.171  / 0.053
    20          0.063  / 0.041         0.089  / 0.0011
    50          0.027  / 0.0049        0.037  / 0.0030
    200         0.0070 / 2.8e-5        0.0093 / 2.5e-4
    ==========  =====================  =====================

    At few steps both samplers are held back by the same last step: it lands on t = 0 (sigma = 0), where
    DPM-Solver++ can only be first order, and returns the model's x0 prediction at t = 1 / steps, which shrinks
    the sample towards the mean by ``s / sqrt(s^2 + sigma^2 / alpha^2)`` (sigma(0.1) = 0.32 here; see
    :func:`test_few_step_error_is_the_last_steps`). The narrower the data (s = 0.3), the longer that term
    dominates; for unit-variance data DPM++ is 3.2x better at 10 steps and 34x better at 20 steps than DDIM
    at 50.
    """
    errors = {}
    for std in (0.3, 1.0):
        model_fn, target = gaussian_v(MU, std), MU + std * noise
        for steps in (5, 10, 20, 50, 200):
            errors["ddim", std, steps] = rms(ddim_sample(model_fn, noise, num_steps=steps) - target)
            errors["dpmpp_2m", std, steps] = rms(dpmpp_2m_sample(model_fn, noise, num_steps=steps) - target)
    for std in (0.3, 1.0):
        for steps in (5, 10, 20, 50):
            assert errors["dpmpp_2m", std, steps] <= errors["ddim", std, steps]
    # s = 0.3: 5.5x better at 50 steps, and better at 50 steps than DDIM at 200.
    assert errors["dpmpp_2m", 0.3, 50] < errors["ddim", 0.3, 50] / 4
    assert errors["dpmpp_2m", 0.3, 50] < errors["ddim", 0.3, 200] / 1.2
    # s = 1.0: 3.2x better at 10 steps; 20 steps beat DDIM's 50 by 34x.
    assert errors["dpmpp_2m", 1.0, 10] < errors["ddim", 1.0, 10] / 2.5
    assert errors["dpmpp_2m", 1.0, 20] < errors["ddim", 1.0, 50] / 10


def test_few_step_error_is_the_last_steps(noise):
    """With 10 steps the final step starts at t = 0.1; from the exact x_{0.1} it would still be off by rms
    0.10 (the x0 prediction there), and DDIM / DPM++ end at 0.116 / 0.106: DPM++'s error up to t = 0.1 is
    rms 0.011 against DDIM's 0.031."""
    model_fn, target = gaussian_v(MU, STD), MU + STD * noise
    x_last = exact_x_t(noise, 0.1)
    alpha, sigma = SCHEDULE.alpha_sigma(torch.tensor(0.1, dtype=torch.float64))
    x0_pred = alpha * x_last - sigma * model_fn(x_last, torch.full((SHAPE[0],), 0.1, dtype=torch.float64))
    floor = rms(x0_pred - target)
    assert 0.09 < floor < 0.11
    for sampler in (ddim_sample, dpmpp_2m_sample):
        err = rms(sampler(model_fn, noise, num_steps=10) - target)
        assert floor < err < 1.2 * floor


def test_dpmpp_2m_starts_with_exact_ddim_steps_at_zero_terminal_snr(noise):
    """lambda(1) = -inf: the first step is the DDIM step and the second, whose h_prev is infinite, is first
    order too; from t_start < 1 (finite lambda) the second step already has the second-order correction."""
    model_fn = gaussian_v(MU, STD)
    ddim_in: dict[float, torch.Tensor] = {}
    dpm_in: dict[float, torch.Tensor] = {}
    ddim_sample(recording(model_fn, ddim_in), noise, num_steps=10)
    out = dpmpp_2m_sample(recording(model_fn, dpm_in), noise, num_steps=10)
    assert torch.isfinite(out).all()
    assert torch.equal(dpm_in[0.9], ddim_in[0.9])  # after the first step: bit for bit
    torch.testing.assert_close(dpm_in[0.8], ddim_in[0.8], rtol=0, atol=1e-14)
    assert (dpm_in[0.7] - ddim_in[0.7]).abs().max() > 1e-4

    ddim_in.clear(), dpm_in.clear()
    x_start = exact_x_t(noise, 0.9)
    ddim_sample(recording(model_fn, ddim_in), x_start, num_steps=9, t_start=0.9)
    dpmpp_2m_sample(recording(model_fn, dpm_in), x_start, num_steps=9, t_start=0.9)
    torch.testing.assert_close(dpm_in[0.8], ddim_in[0.8], rtol=0, atol=1e-14)
    assert (dpm_in[0.7] - ddim_in[0.7]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# diffusers as a reference implementation


def _diffusers_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )


def _run_diffusers(scheduler, model_fn, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Diffusers' loop; its integer timestep i is walt's t = (i + 1) / 1000."""
    scheduler.set_timesteps(num_steps)
    torch.testing.assert_close(
        (scheduler.timesteps.double() + 1) / 1000, time_grid(num_steps)[:-1], rtol=0, atol=1e-12
    )
    x = noise
    for step in scheduler.timesteps:
        t = torch.full((noise.shape[0],), (int(step) + 1) / 1000, dtype=torch.float64)
        x = scheduler.step(model_fn(x, t), step, x).prev_sample
    return x


class DiffusersTerminalClamp:
    """Walt's schedule with diffusers' DPMSolverMultistepScheduler fix for zero terminal SNR: alphas_cumprod at
    the last training step is set to 2**-24, i.e. alpha(1) = 2**-12 instead of 0 (so lambda(1) = -8.3)."""

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        clamped = torch.full_like(alpha, 2**-12)
        at_one = t >= 1.0
        return torch.where(at_one, clamped, alpha), torch.where(at_one, (1 - clamped.square()).sqrt(), sigma)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")  # its numpy 2 `copy=` warning
@pytest.mark.parametrize("num_steps", [5, 10, 20, 50])
def test_dpmpp_2m_matches_diffusers(noise, num_steps):
    """Max |walt - diffusers| on the final samples: 2.7e-5 .. 3.8e-5 for 5..100 steps (tolerance 1e-4).

    The difference is diffusers' clamp of the terminal alphas_cumprod to 2**-24 (alpha = 2**-12): its first
    x0 prediction is ``mu + 2**-12 x`` rather than ``mu``, and lambda(1) is finite, so its second step already
    takes the second-order correction that walt, with lambda(1) = -inf, does not. Giving walt that clamped
    schedule leaves 1e-7 .. 1.2e-6 (tolerance 5e-6): diffusers runs the update in float32 and builds
    alphas_cumprod in float32. Both use a first-order last step (``final_sigmas_type="zero"``)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **_diffusers_config(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        final_sigmas_type="zero",
        lower_order_final=True,
        euler_at_final=False,
    )
    model_fn = gaussian_v(MU, STD)
    reference = _run_diffusers(scheduler, model_fn, noise, num_steps)
    ours = dpmpp_2m_sample(model_fn, noise, num_steps=num_steps)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    assert (ours - reference).abs().max() > 1e-5  # the clamp is visible ...
    clamped = dpmpp_2m_sample(model_fn, noise, num_steps=num_steps, schedule=DiffusersTerminalClamp())
    torch.testing.assert_close(clamped, reference, rtol=0, atol=5e-6)  # ... and explains it


@pytest.mark.parametrize("num_steps", [5, 10, 50, 100])
def test_ddim_matches_diffusers(noise, num_steps):
    """Max |walt - diffusers| 8e-8 .. 1.1e-6 (tolerance 5e-6): DDIMScheduler keeps alpha(1) = 0 exactly and
    updates in the sample's float64, but builds its alphas_cumprod in float32."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(
        **_diffusers_config(), set_alpha_to_one=True, clip_sample=False, thresholding=False
    )
    model_fn = gaussian_v(MU, STD)
    reference = _run_diffusers(scheduler, model_fn, noise, num_steps)
    ours = ddim_sample(model_fn, noise, num_steps=num_steps)
    torch.testing.assert_close(ours, reference, rtol=0, atol=5e-6)


# ---------------------------------------------------------------------------------------------------------------
# Per-sample noise, the dispatcher and step callbacks


def per_sample_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic and nonlinear, and each sample's output depends on that sample alone."""
    mean = x_t.mean(dim=tuple(range(1, x_t.ndim)), keepdim=True)
    return torch.sin(3 * x_t) * t.view(-1, *[1] * (x_t.ndim - 1)) + 0.1 * mean


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp_2m", 0.0)])
def test_per_sample_generators_make_a_sample_independent_of_its_batch(sampler, eta):
    seeds, k = [101, 202, 303, 404], 2
    shape = (2, 3, 4, 4)

    def draw(batch_seeds):
        generators = per_sample_generators(batch_seeds)
        noise = randn((len(batch_seeds), *shape), generators, dtype=torch.float32)
        return sample(per_sample_model, noise, 12, sampler, eta=eta, generator=generators)

    alone = draw([seeds[k]])
    in_batch = draw(seeds)
    shuffled = draw([seeds[3], seeds[k], seeds[0], seeds[1]])
    assert torch.equal(in_batch[k], alone[0])
    assert torch.equal(shuffled[1], alone[0])

    # One generator shared by the batch ties the sample to its position instead.
    def draw_shared(batch_size):
        generator = torch.Generator().manual_seed(seeds[k])
        noise = randn((batch_size, *shape), generator, dtype=torch.float32)
        return sample(per_sample_model, noise, 12, sampler, eta=eta, generator=generator)

    assert not torch.equal(draw_shared(4)[k], draw_shared(1)[0])


def test_ddpm_sample_takes_per_sample_generators_directly():
    seeds = [7, 8, 9]
    noise = randn((3, 2, 4), per_sample_generators(seeds), dtype=torch.float64)
    out = ddpm_sample(per_sample_model, noise, num_steps=20, generator=per_sample_generators(seeds))
    one = ddpm_sample(per_sample_model, noise[1:2], num_steps=20, generator=per_sample_generators(seeds[1:2]))
    assert torch.equal(out[1:2], one)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_on_step_counts_denoising_steps(sampler):
    calls: list[int] = []
    noise = torch.randn(2, 3, 4)
    out = sample(per_sample_model, noise, 7, sampler, on_step=calls.append)
    assert calls == list(range(7))
    assert out.dtype == noise.dtype and torch.isfinite(out).all()


def test_sample_dispatches_to_the_samplers(noise):
    model_fn = gaussian_v(MU, STD)
    assert torch.equal(sample(model_fn, noise, 6, "dpmpp_2m"), dpmpp_2m_sample(model_fn, noise, 6))
    assert torch.equal(sample(model_fn, noise, 6), ddim_sample(model_fn, noise, 6))
    got = sample(model_fn, noise, 6, "ddim", eta=0.5, generator=torch.Generator().manual_seed(1))
    want = ddim_sample(model_fn, noise, 6, eta=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, want)
    got = sample(model_fn, noise, 6, "ddpm", generator=torch.Generator().manual_seed(1))
    want = ddpm_sample(model_fn, noise, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, want)


def test_sample_rejects_unknown_samplers_and_misplaced_eta(noise):
    model_fn = gaussian_v(MU, STD)
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'.*ddim, ddpm, dpmpp_2m"):
        sample(model_fn, noise, 4, "euler")
    with pytest.raises(ValueError, match=r"dpmpp_2m.*deterministic.*eta"):
        sample(model_fn, noise, 4, "dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match=r"ddpm.*eta = 1"):
        sample(model_fn, noise, 4, "ddpm", eta=0.5)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        sample(model_fn, noise, 0, "dpmpp_2m")
