"""The diffusion modules of earlier walt versions, kept so their configs and code keep working.

``BaseDiffusionModule``, ``SuperResolutionModule`` and ``DistillationModule`` took every setting as a flat
argument. Each is now a :class:`~walt.lightning.DiffusionModule` with the same parts, built by
:func:`parts_from_flat` from those arguments (the README's "Moving a config to DiffusionModule" shows the new
form of each). New configs name ``walt.lightning.DiffusionModule``; checkpoints written by either load with
either class.
"""

from __future__ import annotations

import inspect
from typing import Literal

from walt.conditioning import Conditioner, LowresConditioning, TextEncoder
from walt.diffusion import GuidanceDistillation, ProgressiveDistillation, Schedule, VPrediction
from walt.lightning.diffusion import DiffusionModule, adamw_for_diffusion
from walt.lightning.distillation import Teacher
from walt.lightning.module import OptimizerFactory
from walt.pipeline import Pipeline
from walt.tokenizer import CausalVAE
from walt.transformer import WALT

__all__ = ["BaseDiffusionModule", "DistillationModule", "SuperResolutionModule", "parts_from_flat"]


def parts_from_flat(
    backbone: WALT,
    schedule: Schedule | None = None,
    label_dropout: float = 0.1,
    text_encoder: TextEncoder | None = None,
    text_dropout: float = 0.1,
    self_condition_prob: float = 0.9,
    frame_prediction_prob: float = 0.0,
    max_context_frames: int = 2,
    lowres: LowresConditioning | None = None,
    stage: str | None = None,
    teacher_checkpoint: str | None = None,
    student_steps: int = 8,
    guidance_range: tuple[float, float] = (0.0, 4.0),
    init_from_teacher: bool = True,
    **shared,
) -> dict:
    """The :class:`DiffusionModule` arguments for the flat arguments of the earlier modules: the objective
    (``schedule``, ``self_condition_prob``, and a distillation ``stage`` with its settings), the conditioner
    (dropouts, frame prediction, ``lowres``), the teacher; the ``shared`` arguments pass through."""
    conditioner = Conditioner(
        label_dropout, text_encoder, text_dropout, frame_prediction_prob, max_context_frames, lowres
    )
    if stage is None:
        return dict(backbone=backbone, objective=VPrediction(schedule, self_condition_prob), conditioner=conditioner, **shared)  # fmt: skip
    if stage not in ("guidance", "progressive"):
        raise ValueError(f"stage must be 'guidance' or 'progressive', got {stage!r}")
    kind = GuidanceDistillation if stage == "guidance" else ProgressiveDistillation
    objective = kind(None, schedule, student_steps, guidance_range, self_condition_prob)
    teacher = Teacher(teacher_checkpoint, init_from_teacher)
    return dict(backbone=backbone, objective=objective, conditioner=conditioner, teacher=teacher, **shared)


class _Flat(DiffusionModule):
    """What the earlier modules share: their constructor arguments are translated by parts_from_flat."""

    @classmethod
    def _arguments(cls, pipe: Pipeline, kwargs: dict) -> dict:
        sr = pipe.super_resolution
        flat = dict(backbone=pipe.backbone, tokenizer=pipe.tokenizer, schedule=pipe.schedule,
                    text_encoder=pipe.text_encoder, sample_steps=pipe.sample_steps,
                    tokenizer_chunk_size=pipe.tokenizer_chunk_size, video_fps=pipe.fps)  # fmt: skip
        if sr is not None:
            flat.update(spatial_factor=sr.spatial_factor, temporal_factor=sr.temporal_factor,
                        lowres_path=sr.lowres_path, max_aug_level=sr.max_aug_level, sample_aug_level=sr.aug_level)  # fmt: skip
        accepted = inspect.signature(cls.__init__).parameters
        return {**{k: v for k, v in flat.items() if k in accepted}, **kwargs}


def _flat(arguments: dict) -> dict:
    """A constructor's ``locals()`` as keyword arguments."""
    return {k: v for k, v in arguments.items() if k not in ("self", "__class__")}


class BaseDiffusionModule(_Flat):
    """Earlier name of a base model's :class:`DiffusionModule`, with flat arguments (see the module docstring)."""

    def __init__(
        self,
        backbone: WALT,
        tokenizer: CausalVAE | None = None,
        tokenizer_weights: str | None = None,
        schedule: Schedule | None = None,
        optimizer: OptimizerFactory = adamw_for_diffusion,
        warmup_steps: int = 1000,
        ema_decay: float | None = 0.9999,
        label_dropout: float = 0.1,
        text_encoder: TextEncoder | None = None,
        text_dropout: float = 0.1,
        self_condition_prob: float = 0.9,
        frame_prediction_prob: float = 0.0,
        max_context_frames: int = 2,
        train_only_spatiotemporal: bool = False,
        sample_steps: int = 50,
        num_log_samples: int = 4,
        video_fps: float = 8.0,
        tokenizer_chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__(**parts_from_flat(**_flat(locals())))


class SuperResolutionModule(_Flat):
    """Earlier name of a super-resolution stage's :class:`DiffusionModule`: its low-res input is
    ``LowresConditioning(spatial_factor, temporal_factor, lowres_path, sample_aug_level, max_aug_level)``."""

    def __init__(
        self,
        backbone: WALT,
        tokenizer: CausalVAE,
        tokenizer_weights: str | None = None,
        spatial_factor: int = 2,
        temporal_factor: int = 1,
        lowres_path: Literal["pixel", "latent"] = "pixel",
        max_aug_level: float = 0.5,
        sample_aug_level: float = 0.1,
        schedule: Schedule | None = None,
        optimizer: OptimizerFactory = adamw_for_diffusion,
        warmup_steps: int = 1000,
        ema_decay: float | None = 0.9999,
        label_dropout: float = 0.1,
        self_condition_prob: float = 0.9,
        sample_steps: int = 50,
        num_log_samples: int = 4,
        video_fps: float = 8.0,
        tokenizer_chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        arguments = _flat(locals())
        factors = [arguments.pop(k) for k in ("spatial_factor", "temporal_factor", "lowres_path")]
        levels = [arguments.pop(k) for k in ("sample_aug_level", "max_aug_level")]
        super().__init__(**parts_from_flat(**arguments, lowres=LowresConditioning(*factors, *levels)))


class DistillationModule(_Flat):
    """Earlier name of a distillation round's :class:`DiffusionModule`: ``stage`` "guidance" or "progressive"
    picks the objective (:class:`~walt.diffusion.GuidanceDistillation` or
    :class:`~walt.diffusion.ProgressiveDistillation`), ``teacher_checkpoint`` and ``init_from_teacher`` make the
    :class:`~walt.lightning.Teacher`."""

    def __init__(
        self,
        backbone: WALT,
        teacher_checkpoint: str,
        stage: Literal["guidance", "progressive"] = "progressive",
        student_steps: int = 8,
        guidance_range: tuple[float, float] = (0.0, 4.0),
        init_from_teacher: bool = True,
        tokenizer: CausalVAE | None = None,
        tokenizer_weights: str | None = None,
        schedule: Schedule | None = None,
        optimizer: OptimizerFactory = adamw_for_diffusion,
        warmup_steps: int = 100,
        ema_decay: float | None = 0.999,
        label_dropout: float = 0.1,
        text_encoder: TextEncoder | None = None,
        text_dropout: float = 0.1,
        self_condition_prob: float = 0.9,
        frame_prediction_prob: float = 0.0,
        max_context_frames: int = 2,
        num_log_samples: int = 4,
        video_fps: float = 8.0,
        tokenizer_chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__(**parts_from_flat(**_flat(locals())))
