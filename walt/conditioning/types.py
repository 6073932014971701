"""The conditioning a denoiser receives besides the noisy latent and the diffusion time."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Conditioning:
    """Optional conditioning signals for one batch of B samples with latents (B, C, T, H, W).

    A model uses exactly the signals it was built for and rejects the others.

    labels: (B,) or (B, T) int64 class indices; -1 is the null label (classifier-free guidance).
    text: (B, L, D_text) text-encoder token states.
    text_mask: (B, L) bool, True for real tokens, False for padding.
    context: (B, C, T, H, W) latents of known frames (frame prediction, image-to-video); only the
        positions where `context_mask` is 1 are read.
    context_mask: (B, 1, T, H, W) in {0, 1} (bool or float), 1 where `context` is known.
    lowres: (B, C, T, H, W) low-resolution latent already upsampled to the output latent size
        (super-resolution).
    aug_level: (B,) or (B, T) noise-augmentation level in [0, 1] applied to `lowres`.
    self_cond: (B, C, T, H, W) the model's previous estimate (self-conditioning); None = no estimate.
    is_image: (B,) bool, True where a sample holds T independent images packed along time instead of a
        video, so mixed image/video batches share one tensor. Give such samples per-frame `t`, `labels`
        and `aug_level` of shape (B, T).
    guidance: (B,) float classifier-free guidance scale w, an input of a guidance-distilled model (built with
        `guidance_input`), which then computes the guided prediction in one pass; 1 = conditional.
    """

    labels: Tensor | None = None
    text: Tensor | None = None
    text_mask: Tensor | None = None
    context: Tensor | None = None
    context_mask: Tensor | None = None
    lowres: Tensor | None = None
    aug_level: Tensor | None = None
    self_cond: Tensor | None = None
    is_image: Tensor | None = None
    guidance: Tensor | None = None
