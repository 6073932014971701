"""Turning a conditional denoiser ``model(x_t, t, cond) -> v`` into the ``model_fn(x_t, t)`` a sampler calls.

- :func:`classifier_free_guidance`: ``v_u + w (v_c - v_u)`` (Ho & Salimans, 2022) with the conditional and
  unconditional passes batched into one call, and ``w`` a constant, one value per sample or a function of t.
- :func:`self_conditioned`: feeds each step's x0 estimate back as the next step's ``self_cond`` (Chen et al.,
  2023, "Analog Bits"), the way the model saw it in training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from walt.conditioning import Conditioning
from walt.diffusion.parameterization import expand_like
from walt.diffusion.samplers import ModelFn
from walt.diffusion.schedule import NoiseSchedule
from walt.diffusion.self_conditioning import ConditionalModel, x0_estimate

__all__ = [
    "ConditionalModel",
    "GuidanceInterval",
    "GuidanceScale",
    "check_interval",
    "classifier_free_guidance",
    "concat_conditioning",
    "guided",
    "null_conditioning",
    "self_conditioned",
]

GuidanceScale = float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

# Signals that classifier-free guidance drops; the rest (low-res input, augmentation level, self-conditioning,
# the image flags) describe the sample itself and stay.
GUIDED_FIELDS = ("labels", "text", "context")


def null_conditioning(cond: Conditioning, drop: tuple[str, ...] = GUIDED_FIELDS) -> Conditioning:
    """The unconditional counterpart of ``cond``: null labels (-1), no text tokens, no known frames.

    Text keeps its shape with an all-False mask (cross-attention then sees only the video tokens), and
    context keeps its shape with a zero mask, so the conditional and null batches can be concatenated.
    """
    unknown = set(drop) - set(GUIDED_FIELDS)
    if unknown:
        raise ValueError(f"cannot drop {sorted(unknown)}; guidance drops any of {GUIDED_FIELDS}")
    changes: dict[str, torch.Tensor | None] = {}
    if "labels" in drop and cond.labels is not None:
        changes["labels"] = torch.full_like(cond.labels, -1)
    if "text" in drop and cond.text is not None:
        mask = (
            cond.text_mask
            if cond.text_mask is not None
            else torch.ones(cond.text.shape[:2], dtype=torch.bool, device=cond.text.device)
        )
        changes["text_mask"] = torch.zeros_like(mask, dtype=torch.bool)
    if "context" in drop and cond.context is not None:
        changes["context"] = torch.zeros_like(cond.context)
        if cond.context_mask is not None:
            changes["context_mask"] = torch.zeros_like(cond.context_mask)
    return dataclasses.replace(cond, **changes)


def concat_conditioning(a: Conditioning, b: Conditioning) -> Conditioning:
    """Stack two batches' conditioning along the batch dimension (field by field).

    Text of different lengths (a prompt batch and a shorter null or negative prompt batch) is right-padded
    to the longer one with masked zero tokens, which the model ignores.
    """
    a, b = _pad_text(a, b)
    fields = {}
    for field in dataclasses.fields(Conditioning):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if (x is None) != (y is None):
            raise ValueError(f"cannot concatenate conditioning: {field.name} is set in one batch only")
        fields[field.name] = None if x is None else torch.cat([x, y])
    return Conditioning(**fields)


def _pad_text(a: Conditioning, b: Conditioning) -> tuple[Conditioning, Conditioning]:
    if a.text is None or b.text is None or a.text.shape[1] == b.text.shape[1]:
        return a, b
    length = max(a.text.shape[1], b.text.shape[1])
    return _pad_text_to(a, length), _pad_text_to(b, length)


def _pad_text_to(cond: Conditioning, length: int) -> Conditioning:
    B, L, _ = cond.text.shape
    mask = cond.text_mask if cond.text_mask is not None else cond.text.new_ones(B, L, dtype=torch.bool)
    text = torch.nn.functional.pad(cond.text, (0, 0, 0, length - L))  # (B, length, D)
    mask = torch.nn.functional.pad(mask.bool(), (0, length - L), value=False)  # (B, length)
    return dataclasses.replace(cond, text=text, text_mask=mask)


GuidanceInterval = tuple[float, float]


def guided(
    model: ConditionalModel,
    scale: GuidanceScale,
    null: Callable[[Conditioning], Conditioning] = null_conditioning,
    interval: GuidanceInterval | None = None,
) -> ConditionalModel:
    """A conditional model whose output is ``v_u + w(t) (v_c - v_u)``, both predictions from one batched call.

    ``scale`` is a constant ``w``, a tensor (B,) of one ``w`` per sample (guidance distillation trains on a
    range of scales) or a function of ``t`` (B,) returning (B,); ``w = 1`` is the conditional model and
    ``w = 0`` the unconditional one. ``null`` maps a conditioning to its unconditional counterpart.

    ``interval = (lo, hi)`` guides only at times ``lo < t <= hi`` and uses ``w = 1`` elsewhere (Kynkäänniemi et
    al., 2024: guidance at high noise costs diversity, at low noise it does little). A step with every sample
    outside the interval runs the conditional pass alone, half the work; deciding so reads ``t`` on the host,
    one synchronization a step. A constant ``w = 0`` runs the unconditional pass alone.
    """
    if interval is not None:
        check_interval(interval)

    def guided_model(x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        inside = None if interval is None else _inside(t, interval)  # (B,) bool on the CPU
        if inside is not None and not inside.any():
            return _at_least_float32(model(x_t, t, cond))  # w = 1 for all: v_c
        constant_zero = not callable(scale) and not isinstance(scale, torch.Tensor) and scale == 0
        if constant_zero and (inside is None or inside.all()):
            return _at_least_float32(model(x_t, t, null(cond)))  # w = 0 for all: v_u
        both = concat_conditioning(cond, null(cond))
        v = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both)  # (2B, C, T, H, W)
        # At least float32: w in bf16 would be rounded (2.37 -> 2.375), a bias a w-conditioned student learns.
        v_cond, v_uncond = _at_least_float32(v).chunk(2)  # (B, C, T, H, W) each
        w = _scale_per_sample(scale, t).to(v_cond.dtype)  # (B,)
        if inside is not None:
            w = torch.where(inside.to(w.device), w, torch.ones_like(w))  # (B,)
        return v_uncond + expand_like(w, v_uncond) * (v_cond - v_uncond)

    return guided_model


def check_interval(interval: GuidanceInterval) -> None:
    """Refuses a guidance interval that is not ``0 <= lo < hi <= 1`` (diffusion times)."""
    if (
        not isinstance(interval, (tuple, list))
        or len(interval) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
    ):
        raise ValueError(f"a guidance interval is two diffusion times (lo, hi), got {interval!r}")
    lo, hi = interval
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"a guidance interval needs 0 <= lo < hi <= 1 (diffusion times), got ({lo}, {hi})")


def _inside(t: torch.Tensor, interval: GuidanceInterval) -> torch.Tensor:
    times = t.detach().float().cpu()  # (B,)
    return (times > interval[0]) & (times <= interval[1])


def _at_least_float32(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.promote_types(v.dtype, torch.float32))


def _scale_per_sample(scale: GuidanceScale, t: torch.Tensor) -> torch.Tensor:
    if callable(scale):
        return scale(t)
    if isinstance(scale, torch.Tensor):
        if scale.shape != t.shape[:1]:
            raise ValueError(
                f"a guidance scale per sample must have shape {tuple(t.shape[:1])}, got {tuple(scale.shape)}"
            )
        return scale
    return torch.full_like(t, scale)


def classifier_free_guidance(
    model: ConditionalModel,
    cond: Conditioning,
    scale: GuidanceScale,
    null: Callable[[Conditioning], Conditioning] = null_conditioning,
) -> ModelFn:
    """The sampler-facing ``model_fn(x_t, t)`` of :func:`guided` for a fixed ``cond``.

    With self-conditioning, compose the other way round: ``self_conditioned(guided(model, w), cond, schedule)``,
    so both branches see the guided estimate of the previous step.
    """
    guided_model = guided(model, scale, null)
    return lambda x_t, t: guided_model(x_t, t, cond)


def self_conditioned(
    model: ConditionalModel,
    cond: Conditioning,
    schedule: NoiseSchedule,
    initial: torch.Tensor | None = None,
) -> ModelFn:
    """A ``model_fn`` that passes the previous step's x0 estimate as ``cond.self_cond``.

    The first step sees ``initial`` (default None: no estimate, which the model reads as zeros). Each call to
    this function starts a fresh chain, so build one per sampling run.
    """
    previous: list[torch.Tensor] = [] if initial is None else [initial]

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step_cond = dataclasses.replace(cond, self_cond=previous[-1] if previous else None)
        v, x0 = x0_estimate(model, x_t, t, step_cond, schedule)  # (B, C, T, H, W) each
        previous[:] = [x0.detach()]
        return v

    return model_fn
