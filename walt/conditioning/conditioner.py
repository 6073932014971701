"""What a training batch conditions the denoiser on: :class:`Conditioner` builds its :class:`Conditioning`.

Each signal is made in one place here, with its training-time dropout: class labels (dropped to the null label
-1), captions (dropped to the null prompt ""), the given frames of frame prediction (and their mask), and the
low-res input of super-resolution with noise-conditioning augmentation. Dropout only applies with
``train=True``; validation and test see the batch as it is. The random draws follow that order, one
``torch.rand``/``randint`` per signal and sample, from the ``generator`` given (or the global stream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from walt.conditioning.frames import context_mask, draw_known_frames
from walt.conditioning.lowres import augment_lowres
from walt.conditioning.text import TextEncoder
from walt.conditioning.types import Conditioning

__all__ = ["Conditioner", "LowresConditioning", "pixel_video"]


def pixel_video(batch: dict) -> Tensor:
    """The batch's pixel videos (B, 3, T, H, W), which super-resolution makes its low-res inputs from."""
    if "video" not in batch:
        raise ValueError(
            "super-resolution trains on pixel batches ('video'): its low-res inputs are made from them. "
            "Use a video dataset (not LatentShards)."
        )
    return batch["video"]


@dataclass
class LowresConditioning:
    """The low-res input of a super-resolution stage, made from the batch's own pixel videos.

    ``make`` maps the high-res clip (B, 3, T, H, W) to the clean latent of its low-res counterpart on the
    high-res latent grid (:func:`walt.conditioning.downsample_video`, then :func:`walt.conditioning.lowres_latent`
    with the stage's tokenizer and factors); training augmentation levels are uniform in [0, ``max_aug_level``],
    diffused with ``schedule`` (the model's own, a walt.diffusion NoiseSchedule).
    """

    make: Callable[[Tensor], Tensor]
    max_aug_level: float
    schedule: Any


@dataclass
class Conditioner:
    """Builds the conditioning of a batch for a backbone that takes ``labels``, text (``text_encoder`` set),
    ``context`` frames and/or a ``lowres`` input (see the module docstring)."""

    labels: bool = False
    text_encoder: TextEncoder | None = None
    context: bool = False
    lowres: LowresConditioning | None = None
    label_dropout: float = 0.1
    text_dropout: float = 0.1
    frame_prediction_prob: float = 0.0
    max_context_frames: int = 2

    def __call__(
        self, batch: dict, z: Tensor, train: bool, generator: torch.Generator | None = None
    ) -> Conditioning:
        """The conditioning of ``batch``, whose latents are ``z`` (B, C, T, H, W)."""
        cond = Conditioning()
        if self.labels:
            cond.labels = self._labels(batch, z, train, generator)  # (B,)
        if self.text_encoder is not None:
            cond.text, cond.text_mask = self._text(batch, z, train, generator)  # (B, L, D), (B, L)
        if self.context:
            B, T = z.shape[0], z.shape[2]
            known = draw_known_frames(
                B, T, self.frame_prediction_prob, self.max_context_frames, z.device, generator
            )
            cond.context, cond.context_mask = z, context_mask(known, z.shape, z.dtype)  # (B, 1, T, H, W)
        if self.lowres is not None:
            cond.lowres, cond.aug_level = self._lowres(batch, z, generator)  # (B, C, T, H, W), (B,)
        return cond

    def _labels(self, batch: dict, z: Tensor, train: bool, generator: torch.Generator | None) -> Tensor:
        if "label" not in batch:
            raise KeyError("a class-conditional backbone needs batches with 'label'; the dataset has none")
        labels = batch["label"].to(z.device)  # (B,)
        if train and self.label_dropout > 0:
            drop = torch.rand(z.shape[0], device=z.device, generator=generator) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)  # (B,) -1 = null label
        return labels

    def _text(
        self, batch: dict, z: Tensor, train: bool, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        if "caption" not in batch:
            raise KeyError(
                "a text-conditional backbone needs batches with 'caption'; the dataset has none "
                "(for latent shards, encode a captioned dataset with `walt encode`)"
            )
        captions = list(batch["caption"])
        if train and self.text_dropout > 0:
            drop = torch.rand(z.shape[0], device=z.device, generator=generator) < self.text_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]  # "" = the null prompt
        return self.text_encoder.encode(captions, z.device)  # (B, L, D), (B, L)

    def _lowres(self, batch: dict, z: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            clean = self.lowres.make(pixel_video(batch))  # (B, C, T, H, W)
        if clean.shape != z.shape:
            raise ValueError(
                f"low-res latent {tuple(clean.shape)} does not match the target {tuple(z.shape)}"
            )
        level = (
            torch.rand(z.shape[0], device=z.device, generator=generator) * self.lowres.max_aug_level
        )  # (B,)
        return augment_lowres(clean, level, self.lowres.schedule, generator), level  # (B, C, T, H, W), (B,)
