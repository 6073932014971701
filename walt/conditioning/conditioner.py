"""What a training batch conditions the denoiser on: :class:`Conditioner` builds its :class:`Conditioning`.

Each signal is made in one place here, with its training-time dropout: class labels (dropped to the null label
-1), captions (dropped to the null prompt ""), the given frames of frame prediction (and their mask), and the
low-res input of super-resolution with noise-conditioning augmentation (:class:`LowresConditioning`, which the
pipeline uses to make the same input at sampling time). Dropout only applies with ``train=True``; validation and
test see the batch as it is. The random draws follow that order, one ``torch.rand``/``randint`` per signal and
sample, from the ``generator`` given (or the global stream).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from walt.checks import check_int, check_probability
from walt.conditioning.frames import context_mask, draw_known_frames
from walt.conditioning.lowres import augment_lowres, downsample_video, lowres_latent
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


@dataclass(frozen=True)
class LowresConditioning:
    """The low-res input of a super-resolution stage (W.A.L.T section 5.3; Imagen Video's noise-conditioning
    augmentation): how it is made from a low-res clip, and how much it is noised.

    A low-res clip (B, 3, 1 + j, h, w) is brought to the high-res latent grid (C, 1 + ``temporal_factor`` j,
    ``spatial_factor`` h/8, ...): upsampled in pixels, then encoded (``lowres_path="pixel"``, the default), or
    encoded, then upsampled as a latent (``"latent"``). The pixel path is measured better: latent codes are not
    equivariant to resizing (benchmarks/RESULTS.md, "super-resolution conditioning"). In training the clip is the
    batch's own high-res clip, downsampled (area filter in space, every ``temporal_factor``-th frame), and the
    clean latent is diffused with the model's schedule to a level drawn uniformly from [0, ``max_aug_level``]; at
    sampling one level, ``aug_level``, is used (a cascade stage may set its own). The level goes into the
    backbone's AdaLN conditioning, so the stage learns to tolerate the artifacts of the stage before it.

    The same object describes a trained stage in its model file (``walt.pipeline.SuperResolution`` is this
    class).
    """

    spatial_factor: int = 2  # high-res / low-res side (1: temporal super-resolution only)
    temporal_factor: int = 1  # 2: frame rate x2 (17 frames from 9)
    lowres_path: Literal["pixel", "latent"] = "pixel"
    aug_level: float = 0.1  # the augmentation level at sampling time
    max_aug_level: float = 0.5  # training levels are uniform in [0, max_aug_level]

    def __post_init__(self) -> None:
        s, t = self.spatial_factor, self.temporal_factor
        if not isinstance(s, int) or s < 1 or t not in (1, 2) or s * t == 1:
            raise ValueError(f"spatial_factor >= 1 and temporal_factor in (1, 2), not both 1; got {s}, {t}")
        if self.lowres_path not in ("pixel", "latent"):
            raise ValueError(f"lowres_path must be 'pixel' or 'latent', got {self.lowres_path!r}")
        for name in ("aug_level", "max_aug_level"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a diffusion time in [0, 1], got {getattr(self, name)}")

    def latent(self, tokenizer, lowres_video: Tensor, chunk_size: int | None = None) -> Tensor:
        """The clean conditioning latent of a low-res clip: (B, 3, T_lr, h, w) -> (B, C, T', H', W')."""
        s, t = self.spatial_factor, self.temporal_factor
        return lowres_latent(tokenizer, lowres_video, s, t, self.lowres_path, chunk_size)

    def of_highres(self, tokenizer, video: Tensor, chunk_size: int | None = None) -> Tensor:
        """The clean conditioning latent of a high-res clip's low-res counterpart: (B, 3, T, H, W) ->
        (B, C, T', H', W'), the latent grid of the clip itself."""
        low = downsample_video(video, self.spatial_factor, self.temporal_factor)  # (B, 3, T_lr, h, w)
        return self.latent(tokenizer, low, chunk_size)  # (B, C, T', H', W')


@dataclass
class Conditioner:
    """Builds the conditioning of a training batch (see the module docstring).

    Args:
        label_dropout: probability of replacing a label by the null label (-1), for guidance.
        text_encoder: the frozen text encoder of a text-conditional backbone (``text_dim`` set); its token
            states reach the backbone through cross-attention. Not part of any checkpoint.
        text_dropout: probability of replacing a caption by the null prompt ``""`` (no text token: the same
            null condition guidance uses at sampling time).
        frame_prediction_prob: probability that a sample is trained to continue given frames (a backbone built
            with ``context_frames``): 1 .. ``max_context_frames`` latent frames are given, the loss covers the rest.
        max_context_frames: most latent frames given in frame-prediction training.
        lowres: the low-res input of a super-resolution stage (a backbone built with ``lowres=True``).

    Whether labels and context frames are made, and the tokenizer and schedule of the low-res input, are the
    backbone's and the training module's: :meth:`for_model` gives a copy that knows them.
    """

    label_dropout: float = 0.1
    text_encoder: TextEncoder | None = None
    text_dropout: float = 0.1
    frame_prediction_prob: float = 0.0
    max_context_frames: int = 2
    lowres: LowresConditioning | None = None
    labels: bool = field(default=False, init=False)  # the backbone takes class labels
    context: bool = field(default=False, init=False)  # the backbone takes context frames

    def __post_init__(self) -> None:
        # Out of range, these would train without a word (a probability of 3); `walt fit` shows the error first.
        check_probability("label_dropout", self.label_dropout)
        check_probability("text_dropout", self.text_dropout)
        check_probability("frame_prediction_prob", self.frame_prediction_prob)
        check_int("max_context_frames", self.max_context_frames, 1)
        self._tokenizer: Any = None  # what the low-res input is made with (for_model)
        self._schedule: Any = None
        self._chunk_size: int | None = None

    def for_model(
        self, backbone, tokenizer=None, schedule=None, tokenizer_chunk_size: int | None = None
    ) -> Conditioner:
        """A copy for ``backbone``: the labels and context frames it takes; the low-res input made with
        ``tokenizer`` and noised with ``schedule`` (the model's own). Checks that the text encoder, frame
        prediction and low-res input given here are what the backbone was built for."""
        _check_text_encoder(backbone, self.text_encoder)
        if self.frame_prediction_prob > 0 and not backbone.context_frames:
            raise ValueError("frame_prediction_prob > 0 needs a backbone built with context_frames=True")
        if backbone.lowres and self.lowres is None:
            raise ValueError(
                "the backbone takes a low-res input (lowres=True): give the conditioner a lowres "
                "(walt.conditioning.LowresConditioning) saying how it is made"
            )
        if self.lowres is not None:
            if not backbone.lowres:
                raise ValueError(
                    "a super-resolution backbone must be built with lowres=True (WALT(lowres=True))"
                )
            if tokenizer is None:
                raise ValueError(
                    "super-resolution makes its low-res inputs from pixels: give it the tokenizer"
                )
        bound = copy.copy(self)
        bound.labels, bound.context = backbone.num_classes is not None, bool(backbone.context_frames)
        bound._tokenizer, bound._schedule, bound._chunk_size = tokenizer, schedule, tokenizer_chunk_size
        return bound

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
        if self._tokenizer is None:
            raise ValueError("the conditioner makes low-res inputs once bound to a tokenizer (for_model)")
        with torch.no_grad():
            clean = self.lowres.of_highres(self._tokenizer, pixel_video(batch), self._chunk_size)
        if clean.shape != z.shape:
            raise ValueError(
                f"low-res latent {tuple(clean.shape)} does not match the target {tuple(z.shape)}"
            )
        level = (
            torch.rand(z.shape[0], device=z.device, generator=generator) * self.lowres.max_aug_level
        )  # (B,)
        return augment_lowres(clean, level, self._schedule, generator), level  # (B, C, T, H, W), (B,)


def _check_text_encoder(backbone, text_encoder: TextEncoder | None) -> None:
    if backbone.text_dim is None:
        if text_encoder is not None:
            raise ValueError(
                "a text_encoder was given but the backbone has no text_dim: set text_dim to its width"
            )
        return
    if text_encoder is None:
        raise ValueError(
            f"the backbone is text-conditional (text_dim={backbone.text_dim}) but no text_encoder was given; "
            "add one, e.g. walt.conditioning.MiniLMTextEncoder (384-d) or T5TextEncoder"
        )
    if text_encoder.dim != backbone.text_dim:
        raise ValueError(
            f"the text encoder gives {text_encoder.dim}-d tokens but the backbone has text_dim={backbone.text_dim}; "
            "make them equal"
        )
