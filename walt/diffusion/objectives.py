"""Training objectives as objects: ``objective(net, latents, cond, generator) -> loss`` (EDM's ``EDMLoss`` split).

An objective owns what a training step draws (diffusion times, noise, guidance scales, which samples get a
self-conditioning estimate) and what the network sees; a Lightning module only supplies the latents and the
batch's conditioning. ``cond`` is a :class:`Conditioning`, or a function of the generator that builds one
(:class:`walt.conditioning.Conditioner`): it is then called after the times and the noise are drawn, the order
in which every checkpoint's random stream was consumed, so a resumed run continues exactly.

- :class:`VPrediction`: W.A.L.T's loss, MSE on v with self-conditioning, the loss covering only the frames to
  generate under frame prediction, and per-frame times for images packed along time (``cond.is_image``).
- :class:`GuidanceDistillation`, :class:`ProgressiveDistillation`: a student matching a frozen teacher
  (walt.diffusion.distillation has the targets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from walt.checks import check_probability
from walt.conditioning import Conditioning, frames_to_generate
from walt.diffusion.distillation import guidance_scales, guided_target, student_times, two_step_target
from walt.diffusion.guidance import ConditionalModel, guided, self_conditioned
from walt.diffusion.loss import corrupt, v_loss
from walt.diffusion.samplers import ModelFn
from walt.diffusion.schedule import CosineSchedule, ZeroTerminalSNRLinearSchedule
from walt.diffusion.self_conditioning import self_condition, takes_estimate

__all__ = [
    "ConditionFn",
    "Distillation",
    "GuidanceDistillation",
    "Objective",
    "ProgressiveDistillation",
    "Schedule",
    "VPrediction",
]

ConditionFn = Callable[[torch.Generator | None], Conditioning]
Schedule = ZeroTerminalSNRLinearSchedule | CosineSchedule  # the schedules a config may name
Objective = Callable[
    [ConditionalModel, Tensor, "Conditioning | ConditionFn", "torch.Generator | None"], Tensor
]


def _resolve(cond: Conditioning | ConditionFn, generator: torch.Generator | None) -> Conditioning:
    return dataclasses.replace(cond) if isinstance(cond, Conditioning) else cond(generator)


class VPrediction:
    """``E || net(x_t, t, cond) - v ||^2`` over t ~ U[0, 1) per sample (per frame for packed images).

    ``schedule``: the noise schedule (default: W.A.L.T's, linear betas rescaled to zero terminal SNR).
    ``self_condition_prob``: the fraction of samples given the network's own x0 estimate (from a pass without
    one, no gradient) as ``cond.self_cond``, when the network takes one (built with ``self_conditioning``);
    0.9 as in W.A.L.T. Given context frames (``cond.context_mask``) are left out of the loss.
    """

    def __init__(self, schedule: Schedule | None = None, self_condition_prob: float = 0.9) -> None:
        check_probability("self_condition_prob", self_condition_prob)
        self.schedule = schedule or ZeroTerminalSNRLinearSchedule()
        self.self_condition_prob = self_condition_prob

    def __call__(
        self,
        net: ConditionalModel,
        latents: Tensor,
        cond: Conditioning | ConditionFn,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        z = latents  # (B, C, T, H, W)
        B, T = z.shape[0], z.shape[2]
        t = torch.rand(B, device=z.device, generator=generator)  # (B,)
        noise = torch.randn(z.shape, device=z.device, generator=generator, dtype=z.dtype)  # (B, C, T, H, W)
        cond = _resolve(cond, generator)
        if cond.is_image is not None and T > 1:  # T independent images: a time for each
            frame_t = torch.rand(B, T, device=z.device, generator=generator)  # (B, T)
            t = torch.where(cond.is_image[:, None], frame_t, t[:, None])  # (B, T)
        x_t, v_target = corrupt(z, t, noise, self.schedule)  # (B, C, T, H, W) each
        if takes_estimate(net, self.self_condition_prob):
            estimate = self_condition(net, x_t, t, cond, self.schedule, self.self_condition_prob, generator)
            cond = dataclasses.replace(cond, self_cond=estimate)  # (B, C, T, H, W)
        v = net(x_t, t, cond)  # (B, C, T, H, W)
        return v_loss(v, v_target, frames_to_generate(cond.context_mask))


class Distillation:
    """A student trained at the times of its own ``student_steps``-step DDIM grid, at guidance scales drawn from
    ``guidance_range`` (``cond.guidance``, an input of student and teacher alike).

    ``teacher`` returns the frozen teacher (a function, so the module can load it lazily and keep it on the
    student's device); a training module gives it from its ``teacher`` (:class:`walt.lightning.Teacher`), so a
    config leaves it out. Self-conditioning: teacher and student get the same estimate, the teacher's own x0 at
    (x_t, t) (the guided teacher's in the guidance stage), for ``self_condition_prob`` of the samples of a
    self-conditioned student. The loss is MSE on v: the x0 error weighted by SNR + 1, which keeps weight 1 at
    t = 1 (SNR 0), where the SNR-weighted (eps) loss would give the first, most consequential step of a few-step
    sampler none.
    """

    def __init__(
        self,
        teacher: Callable[[], ConditionalModel] | None = None,
        schedule: Schedule | None = None,
        student_steps: int = 8,
        guidance_range: tuple[float, float] = (0.0, 4.0),
        self_condition_prob: float = 0.9,
    ) -> None:
        if student_steps < 1:
            raise ValueError(f"student_steps must be >= 1, got {student_steps}")
        check_probability("self_condition_prob", self_condition_prob)
        guidance_scales(1, *guidance_range)  # checks the range now, not at the first training step
        self.teacher = teacher
        self.schedule = schedule or ZeroTerminalSNRLinearSchedule()
        self.student_steps = student_steps
        self.guidance_range = (float(guidance_range[0]), float(guidance_range[1]))
        self.self_condition_prob = self_condition_prob

    def __call__(
        self,
        net: ConditionalModel,
        latents: Tensor,
        cond: Conditioning | ConditionFn,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        z = latents  # (B, C, T, H, W)
        B = z.shape[0]
        t64, s64 = student_times(B, self.student_steps, z.device, generator)  # (B,) each, float64 grid times
        t = t64.to(z.dtype)  # (B,) the time the model sees, as the sampler passes it
        noise = torch.randn(z.shape, device=z.device, generator=generator, dtype=z.dtype)  # (B, C, T, H, W)
        x_t, _ = corrupt(z, t, noise, self.schedule)  # (B, C, T, H, W)
        cond = _resolve(cond, generator)
        cond.guidance = guidance_scales(B, *self.guidance_range, z.device, generator)  # (B,)
        if self.teacher is None:
            raise ValueError(
                "this distillation objective has no teacher: give it one (a training module does)"
            )
        teacher = self.teacher()
        if takes_estimate(net, self.self_condition_prob):
            model = self.teacher_model(teacher, cond)
            cond.self_cond = self_condition(
                model, x_t, t, cond, self.schedule, self.self_condition_prob, generator
            )
        target = self.target(teacher, net, x_t, t64, s64, cond)  # (B, C, T, H, W)
        v = net(x_t, t, cond)  # (B, C, T, H, W)
        return v_loss(v, target, frames_to_generate(cond.context_mask))

    def teacher_model(self, teacher: ConditionalModel, cond: Conditioning) -> ConditionalModel:
        """What the teacher predicts for the student to match."""
        raise NotImplementedError

    def target(
        self,
        teacher: ConditionalModel,
        net: ConditionalModel,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Conditioning,
    ) -> Tensor:
        """The student's v target at (x_t, t) for the step to s; t and s (B,) in float64."""
        raise NotImplementedError


class GuidanceDistillation(Distillation):
    """Guided distillation, stage one (Meng et al., 2023): the target is the classifier-free-guided teacher's v,
    ``v_u + w (v_c - v_u)`` at the sample's w (two passes, batched), for a student that takes w as an input."""

    def teacher_model(self, teacher: ConditionalModel, cond: Conditioning) -> ConditionalModel:
        return guided(teacher, cond.guidance)

    def target(
        self,
        teacher: ConditionalModel,
        net: ConditionalModel,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Conditioning,
    ) -> Tensor:
        return guided_target(teacher, x_t, t.to(x_t.dtype), cond, cond.guidance)  # (B, C, T, H, W)


class ProgressiveDistillation(Distillation):
    """Progressive distillation (Salimans & Ho, 2022): the v with which ONE DDIM step t -> s lands where TWO
    teacher steps t -> (t + s) / 2 -> s do; the teacher (a guidance-distilled model) takes w as its input. A
    self-conditioned teacher's second step gets the x0 of its first, as in sampling."""

    def teacher_model(self, teacher: ConditionalModel, cond: Conditioning) -> ConditionalModel:
        return teacher

    def target(
        self,
        teacher: ConditionalModel,
        net: ConditionalModel,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        cond: Conditioning,
    ) -> Tensor:
        # The student's architecture is the teacher's (walt.lightning.distillation.load_teacher_weights).
        teacher_fn: ModelFn = (
            self_conditioned(teacher, cond, self.schedule, initial=cond.self_cond)
            if getattr(net, "self_conditioning", False)
            else (lambda x, time: teacher(x, time, cond))
        )
        return two_step_target(teacher_fn, x_t, t, s, self.schedule)  # (B, C, T, H, W)
