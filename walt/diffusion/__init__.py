"""Diffusion as small pure functions and objects: schedules, parameterisations, the loss, the training
objectives, self-conditioning and the samplers."""

from walt.diffusion.distillation import guidance_scales, guided_target, student_times, two_step_target
from walt.diffusion.guidance import (
    ConditionalModel,
    classifier_free_guidance,
    concat_conditioning,
    guided,
    null_conditioning,
    self_conditioned,
)
from walt.diffusion.loss import corrupt, v_loss
from walt.diffusion.noise import Generators, per_sample_generators, randn
from walt.diffusion.objectives import (
    ConditionFn,
    Distillation,
    GuidanceDistillation,
    Objective,
    ProgressiveDistillation,
    Schedule,
    VPrediction,
)
from walt.diffusion.parameterization import (
    eps_from_v,
    expand_like,
    expand_time,
    noisy,
    v_from_eps,
    velocity,
    x0_from_eps,
    x0_from_v,
)
from walt.diffusion.samplers import (
    SAMPLERS,
    ModelFn,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    dpmpp_2m_sample,
    sample,
    time_grid,
)
from walt.diffusion.schedule import (
    CosineSchedule,
    NoiseSchedule,
    ZeroTerminalSNRLinearSchedule,
    alpha_sigma,
    linear_beta_alphas_cumprod,
    rescale_zero_terminal_snr,
)
from walt.diffusion.self_conditioning import estimate_input, self_condition, takes_estimate, x0_estimate

__all__ = [
    "SAMPLERS",
    "ConditionFn",
    "ConditionalModel",
    "CosineSchedule",
    "Distillation",
    "Generators",
    "GuidanceDistillation",
    "ModelFn",
    "NoiseSchedule",
    "Objective",
    "ProgressiveDistillation",
    "Schedule",
    "VPrediction",
    "ZeroTerminalSNRLinearSchedule",
    "alpha_sigma",
    "classifier_free_guidance",
    "concat_conditioning",
    "corrupt",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "dpmpp_2m_sample",
    "eps_from_v",
    "estimate_input",
    "expand_like",
    "expand_time",
    "guidance_scales",
    "guided",
    "guided_target",
    "linear_beta_alphas_cumprod",
    "noisy",
    "null_conditioning",
    "per_sample_generators",
    "randn",
    "rescale_zero_terminal_snr",
    "sample",
    "self_condition",
    "self_conditioned",
    "student_times",
    "takes_estimate",
    "time_grid",
    "two_step_target",
    "v_from_eps",
    "v_loss",
    "velocity",
    "x0_estimate",
    "x0_from_eps",
    "x0_from_v",
]
