"""Self-conditioning (Chen et al., 2023, "Analog Bits"): the denoiser also sees an earlier x0 estimate of the same sample.

The one place that says what the estimate is and how it reaches the network: the model's own x0 at (x_t, t)
from a pass without an estimate, zeros standing for "no estimate". Training (:class:`walt.diffusion.VPrediction`
and the distillation objectives) gives the estimate to a random fraction of the samples, sampling
(:func:`walt.diffusion.self_conditioned`) feeds each step's estimate to the next, and the backbone reads
:func:`estimate_input`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from walt.conditioning import Conditioning
from walt.diffusion.parameterization import expand_time, x0_from_v
from walt.diffusion.schedule import NoiseSchedule

__all__ = ["estimate_input", "self_condition", "takes_estimate", "x0_estimate"]

ConditionalModel = Callable[[Tensor, Tensor, Conditioning], Tensor]


def estimate_input(self_cond: Tensor | None, x: Tensor) -> Tensor:
    """What a self-conditioned network is given: the estimate, or zeros (B, C, T, H, W) when there is none."""
    return self_cond if self_cond is not None else torch.zeros_like(x)


def takes_estimate(net: object, prob: float) -> bool:
    """Whether training gives ``net`` estimates: a fraction ``prob`` > 0 of the samples, for a network built
    with self-conditioning (``net.self_conditioning``; other networks never get one)."""
    return prob > 0 and bool(getattr(net, "self_conditioning", False))


def x0_estimate(
    model: ConditionalModel, x_t: Tensor, t: Tensor, cond: Conditioning, schedule: NoiseSchedule
) -> tuple[Tensor, Tensor]:
    """``model``'s v at (x_t, t) and the x0 it implies, both (B, C, T, H, W); ``t`` (B,) or (B, T)."""
    v = model(x_t, t, cond)  # (B, C, T, H, W)
    alpha, sigma = schedule.alpha_sigma(t)
    alpha, sigma = expand_time(alpha, x_t).to(x_t.dtype), expand_time(sigma, x_t).to(x_t.dtype)
    return v, x0_from_v(x_t, v, alpha, sigma)


def self_condition(
    model: ConditionalModel,
    x_t: Tensor,
    t: Tensor,
    cond: Conditioning,
    schedule: NoiseSchedule,
    prob: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The training input: ``model``'s x0 estimate (no gradient, from a pass without one) for a random ``prob``
    of the samples, zeros ("no estimate") for the rest; (B, C, T, H, W). In base training ``model`` is the
    network being trained, in distillation the teacher."""
    with torch.no_grad():
        _, x0 = x0_estimate(model, x_t, t, cond, schedule)  # (B, C, T, H, W)
    use = torch.rand(x_t.shape[0], device=x_t.device, generator=generator) < prob  # (B,)
    return x0 * expand_time(use.to(x0.dtype), x0)  # (B, C, T, H, W)
