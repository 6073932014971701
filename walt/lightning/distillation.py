"""The teacher of a distillation round: Imagen Video's recipe for a few-step sampler, in rounds.

Round 1, :class:`walt.diffusion.GuidanceDistillation` (Meng et al., 2023): the student learns the
classifier-free-guided teacher's v, ``v_u + w (v_c - v_u)``, for scales w drawn from ``guidance_range``, with w
as an input (``WALT(guidance_input=True)``); sampling at scale w then costs one pass per step instead of two.
Rounds 2.., :class:`walt.diffusion.ProgressiveDistillation` (Salimans & Ho, 2022): the student learns to take in
ONE DDIM step what the previous round's model (now the teacher) does in TWO, so each round halves the steps
(32 -> 16 -> 8 -> 4). Each round is a ``walt fit`` of :class:`walt.lightning.DiffusionModule` with one of these
objectives and a :class:`Teacher`: the previous round's checkpoint (the first round's: the base model's); the
student starts from the teacher's weights. Everything else (latents, labels and their dropout, text, EMA,
optimizer, checkpoints, validation, sampling) is the module's, as for any diffusion model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from walt.checkpoint import CheckpointError, module_weights, read_checkpoint
from walt.diffusion import Distillation, GuidanceDistillation
from walt.transformer import WALT

__all__ = ["Teacher", "load_teacher_weights", "teacher_weights"]

GUIDANCE_KEYS = "guidance_embed."  # the weights a plain model lacks and a guidance-input student adds


def teacher_weights(checkpoint: str | Path) -> dict[str, Tensor]:
    """The backbone weights of a diffusion-module checkpoint: its EMA weights when it has them.

    Works for the base model's checkpoints and for earlier distillation rounds alike. The file is read
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
            "of a diffusion model's or a distillation round's run, not a tokenizer's"
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


class Teacher:
    """The frozen teacher of a distillation round: the backbone of ``checkpoint`` (its EMA weights when present)
    in the student's architecture, in eval mode, outside the checkpoint and the optimizer.

    It is loaded on first use, after Lightning has placed the student, so a distilled checkpoint samples
    (``walt sample``) without it; it follows the student's device and dtype.

    Args:
        checkpoint: a base model's checkpoint (for :class:`walt.diffusion.GuidanceDistillation`) or the previous
            round's (for :class:`walt.diffusion.ProgressiveDistillation`).
        init_student: start the student (and its EMA) from the teacher's weights (a guidance-stage student keeps
            its new, zero-output guidance embedding, so it starts as exactly the teacher); otherwise from its
            own initialization.
    """

    def __init__(self, checkpoint: str, init_student: bool = True) -> None:
        self.checkpoint = checkpoint
        self.init_student = init_student
        self._model: list[WALT] = []  # in a list: a model, yet no submodule of the training module

    def model(self, student: WALT, objective: Distillation, compile: bool = False) -> WALT:
        """The teacher for ``student``, on its device and in its dtype; loaded from the checkpoint once."""
        if not self._model:
            self._model.append(self._load(student, objective, compile))
        teacher = self._model[0]
        # Outside the training module, so Lightning's device and precision moves (e.g. bf16-true) are mirrored.
        own, first = next(student.parameters()), next(teacher.parameters())
        if first.device != own.device or first.dtype != own.dtype:
            teacher.to(device=own.device, dtype=own.dtype)
        return teacher

    def _load(self, student: WALT, objective: Distillation, compile: bool) -> WALT:
        weights = teacher_weights(self.checkpoint)
        distilled = any(k.startswith(GUIDANCE_KEYS) for k in weights)
        if isinstance(objective, GuidanceDistillation) and distilled:
            raise ValueError(
                f"{self.checkpoint} is already guidance-distilled (it takes w as an input): distill it "
                "further with stage: progressive (objective: walt.diffusion.ProgressiveDistillation)"
            )
        if not isinstance(objective, GuidanceDistillation) and not distilled:
            raise ValueError(
                f"{self.checkpoint} is a plain classifier-free-guided model: run stage: guidance on it first "
                "(objective: walt.diffusion.GuidanceDistillation), then progressive rounds from that round's "
                "checkpoint"
            )
        teacher = copy.deepcopy(student)  # the student's architecture; every weight is replaced below
        load_teacher_weights(teacher, weights)
        teacher.requires_grad_(False).eval()
        if compile:  # a deep copy does not carry the student's compiled forward
            teacher.compile(fullgraph=True)
        return teacher
