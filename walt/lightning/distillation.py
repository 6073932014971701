"""Distilling a trained diffusion model into a few-step sampler: Imagen Video's recipe, in rounds.

Round 1, ``stage="guidance"`` (Meng et al., 2023): the student learns the classifier-free-guided teacher's v,
``v_u + w (v_c - v_u)``, for scales w drawn from ``guidance_range``, with w as an input
(``WALT(guidance_input=True)``); sampling at scale w then costs one pass per step instead of two.
Rounds 2.., ``stage="progressive"`` (Salimans & Ho, 2022): the student learns to take in ONE DDIM step what the
previous round's model (now the teacher) does in TWO, so each round halves the steps (32 -> 16 -> 8 -> 4).
Each round is a ``walt fit`` whose ``teacher_checkpoint`` is the previous round's checkpoint (the first round's:
the base model's); the student starts from the teacher's weights.

Everything else (latents, labels and label dropout, text, EMA, optimizer, checkpoints, validation, sampling)
is :class:`BaseDiffusionModule`'s; this module replaces only the objective
(:class:`walt.diffusion.GuidanceDistillation` or :class:`walt.diffusion.ProgressiveDistillation`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from walt.checkpoint import CheckpointError, module_weights, read_checkpoint
from walt.conditioning import TextEncoder
from walt.diffusion import (
    CosineSchedule,
    GuidanceDistillation,
    ProgressiveDistillation,
    ZeroTerminalSNRLinearSchedule,
)
from walt.lightning.diffusion import BaseDiffusionModule, Setting, adamw_for_diffusion
from walt.tokenizer import CausalVAE
from walt.transformer import WALT

__all__ = ["DistillationModule", "load_teacher_weights", "teacher_weights"]

Stage = Literal["guidance", "progressive"]
GUIDANCE_KEYS = "guidance_embed."  # the weights a plain model lacks and a guidance-input student adds


def teacher_weights(checkpoint: str | Path) -> dict[str, Tensor]:
    """The backbone weights of a diffusion-module checkpoint: its EMA weights when it has them.

    Works for :class:`BaseDiffusionModule` checkpoints and for earlier distillation rounds alike. The file is read
    without running any pickled code (:func:`walt.checkpoint.read_checkpoint`, which ``walt.pipeline`` uses too).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint not found: {path}; give teacher_checkpoint the last.ckpt of the base model's run "
            "(first round) or of the previous distillation round"
        )
    state = read_checkpoint(path)["state_dict"]  # a CheckpointError (ValueError) for anything else
    try:  # the EMA copy (ema.module.*) when there is one, else the trained weights (backbone.*)
        weights, _ = module_weights(state, "backbone.", True, path)
    except CheckpointError:
        raise ValueError(
            f"{path} holds no diffusion backbone (no 'ema.module.*' or 'backbone.*' weights); give the checkpoint "
            "of a BaseDiffusionModule or DistillationModule run, not a tokenizer's"
        ) from None
    return weights


def load_teacher_weights(model: WALT, weights: Mapping[str, Tensor]) -> None:
    """Resets ``model`` and loads a teacher's backbone ``weights`` into it.

    ``model`` must have the teacher's architecture, except that it may add the guidance input: the guidance
    embedding is then the only thing the weights may lack, and it keeps a new model's initialization (output
    layer zero), so ``model`` computes exactly the teacher's function whatever w it is given. Any other
    missing, unexpected or differently shaped weight is an error that names them.
    """
    own = model.state_dict()
    missing = sorted(k for k in own if k not in weights and not k.startswith(GUIDANCE_KEYS))
    unexpected = sorted(k for k in weights if k not in own)
    reshaped = sorted(
        f"{k} {tuple(weights[k].shape)} -> {tuple(own[k].shape)}"
        for k in weights
        if k in own and weights[k].shape != own[k].shape
    )
    if missing or unexpected or reshaped:
        problems = {"missing": missing, "unexpected": unexpected, "shape": reshaped}
        listed = "; ".join(f"{name}: {', '.join(keys[:6])}" for name, keys in problems.items() if keys)
        raise ValueError(
            f"the teacher's weights do not fit the student ({listed}); build the student backbone with the "
            "teacher's settings (depth, hidden_size, num_classes, ...) plus guidance_input: true"
        )
    model.initialize_weights()  # what the weights lack (the guidance embedding) starts as in a new model
    model.load_state_dict(weights, strict=False)


class DistillationModule(BaseDiffusionModule):
    """One round of guided (``stage="guidance"``) or progressive (``stage="progressive"``) distillation.

    The teacher is the backbone of ``teacher_checkpoint`` (its EMA weights when present) in the student's
    architecture, frozen and in eval mode. It is kept out of the checkpoint and the optimizer, and it is
    loaded when training starts, so a distilled checkpoint samples (``walt sample``) without it.

    Training batch: a step (t, s) of the student's K-step DDIM grid per sample, a guidance scale w per sample
    (``cond.guidance``, the same for teacher and student), and the base module's labels (with its label
    dropout, so the unconditional mode stays trained) and other conditioning, identical for both. Target:
    - guidance: the guided teacher's v at (x_t, t) (two passes, batched), for a student trained on the K-step
      grid (K = ``student_steps``; the next round distills it to K / 2 and calls it only at the K-grid times,
      so it need not learn the others, unlike Meng et al.'s continuous-time first stage);
    - progressive: the v with which one DDIM step t -> s lands where two teacher steps t -> (t+s)/2 -> s do.

    Self-conditioning: teacher and student get the same estimate, the teacher's own x0 at (x_t, t) from a pass
    without one (the guided teacher's in the guidance stage), zeros for 1 - ``self_condition_prob`` of the
    samples, exactly as base training builds it; the teacher's second step gets the x0 of its first, as in
    sampling. The teacher's estimate keeps the target a fixed function of what the student sees (the student's
    own estimate would move as it trains); at sampling the student is fed its own estimates, as any
    self-conditioned model is.

    Args (the rest as in :class:`BaseDiffusionModule`):
        backbone: the student, built with the teacher's settings plus ``guidance_input=True``.
        teacher_checkpoint: a BaseDiffusionModule checkpoint (guidance stage) or the previous round's
            DistillationModule checkpoint (progressive stage).
        stage: "guidance" or "progressive".
        student_steps: the DDIM steps K the student is trained to sample in (the teacher takes 2K in the
            progressive stage, K in the guidance stage); also the default for its samples.
        guidance_range: the guidance scales (w_min, w_max) the student learns (w = 1: conditional, 0:
            unconditional); drawn uniformly per sample in both stages.
        init_from_teacher: start the student (and its EMA) from the teacher's weights (progressive
            distillation does); otherwise from the backbone's own initialization.
    """

    student_steps = Setting("objective")
    guidance_range = Setting("objective")

    def __init__(
        self,
        backbone: WALT,
        teacher_checkpoint: str,
        stage: Stage = "progressive",
        student_steps: int = 8,
        guidance_range: tuple[float, float] = (0.0, 4.0),
        init_from_teacher: bool = True,
        tokenizer: CausalVAE | None = None,
        tokenizer_weights: str | None = None,
        schedule: ZeroTerminalSNRLinearSchedule | CosineSchedule | None = None,
        optimizer: OptimizerCallable = adamw_for_diffusion,
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
        if not backbone.guidance_input:
            raise ValueError(
                "the student takes the guidance scale as an input: build its backbone with guidance_input: true"
            )
        if stage not in ("guidance", "progressive"):
            raise ValueError(f"stage must be 'guidance' or 'progressive', got {stage!r}")
        objective = GuidanceDistillation if stage == "guidance" else ProgressiveDistillation
        super().__init__(
            backbone,
            tokenizer,
            tokenizer_weights,
            schedule=schedule,
            optimizer=optimizer,
            warmup_steps=warmup_steps,
            ema_decay=ema_decay,
            label_dropout=label_dropout,
            text_encoder=text_encoder,
            text_dropout=text_dropout,
            self_condition_prob=self_condition_prob,
            frame_prediction_prob=frame_prediction_prob,
            max_context_frames=max_context_frames,
            sample_steps=student_steps,
            num_log_samples=num_log_samples,
            video_fps=video_fps,
            tokenizer_chunk_size=tokenizer_chunk_size,
            compile=compile,
        )
        # The teacher is loaded on first use (a function, not a model), after Lightning has placed the student.
        self.objective = objective(
            partial(getattr, self, "teacher"),
            self.schedule,
            student_steps,
            guidance_range,
            self.self_condition_prob,
        )
        self.teacher_checkpoint = teacher_checkpoint
        self.stage = stage
        self.init_from_teacher = init_from_teacher
        self._teacher: list[WALT] = []  # in a list: a frozen model outside the state dict and the optimizer
        # Saved with the weights, so neither a resumed run nor a second fit() starts the student over.
        self.register_buffer("student_initialized", torch.tensor(False))

    # ---- the teacher ---------------------------------------------------------------------------------------

    @property
    def teacher(self) -> WALT:
        """The frozen teacher on the module's device, loaded from ``teacher_checkpoint`` on first use."""
        if not self._teacher:
            self._teacher.append(self._load_teacher())
        teacher = self._teacher[0]
        # Outside the module, so Lightning's device and precision moves (e.g. bf16-true) are mirrored here.
        dtype = next(self.backbone.parameters()).dtype
        first = next(teacher.parameters())
        if first.device != self.device or first.dtype != dtype:
            teacher.to(device=self.device, dtype=dtype)
        return teacher

    def _load_teacher(self) -> WALT:
        weights = teacher_weights(self.teacher_checkpoint)
        distilled = any(k.startswith(GUIDANCE_KEYS) for k in weights)
        if self.stage == "guidance" and distilled:
            raise ValueError(
                f"{self.teacher_checkpoint} is already guidance-distilled (it takes w as an input): distill it "
                "further with stage: progressive"
            )
        if self.stage == "progressive" and not distilled:
            raise ValueError(
                f"{self.teacher_checkpoint} is a plain classifier-free-guided model: run stage: guidance on it "
                "first, then progressive rounds from that round's checkpoint"
            )
        teacher = copy.deepcopy(self.backbone)  # the student's architecture; every weight is replaced below
        load_teacher_weights(teacher, weights)
        teacher.requires_grad_(False).eval()
        if self.compile_models:  # a deep copy does not carry the student's compiled forward
            teacher.compile(fullgraph=True)
        return teacher

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # Before Lightning restores a checkpoint (resuming), which then overwrites the student as it should.
        if stage == "fit" and self.init_from_teacher and not bool(self.student_initialized):
            self.initialize_student()

    def initialize_student(self) -> None:
        """Copies the teacher's weights into the student and its EMA (a guidance-stage student keeps its new,
        zero-output guidance embedding, so it starts as exactly the teacher)."""
        load_teacher_weights(self.backbone, self.teacher.state_dict())
        if self.ema is not None:
            self.ema.module.load_state_dict(self.backbone.state_dict())
        self.student_initialized.fill_(True)
