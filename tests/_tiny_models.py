"""Tiny models built in seconds without training, for tests that need a model to generate with (not a trained
one): a 2-layer backbone at a 17x32x32 video size, the tiny tokenizer, random weights so every input matters."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from walt.conditioning import TextEncoder
from walt.pipeline import Pipeline
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT

CLASS_NAMES = ["red circle moving left", "red circle moving right", "blue circle moving left"]


class WordEncoder(TextEncoder):
    """A stand-in text encoder: one fixed random 8-d token per word, no model to load."""

    dim = 8

    @property
    def identity(self) -> str:
        return "tests.WordEncoder"

    def _encode_batch(self, texts: list[str], device: torch.device) -> list[torch.Tensor]:
        return [torch.stack([self._word(w) for w in text.split()]) for text in texts]

    def _word(self, word: str) -> torch.Tensor:
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(word.encode())))


def tiny_pipeline(
    classes: bool = True, text: bool = False, context: bool = False, steps: int = 2
) -> Pipeline:
    """A class-conditional (``classes``), text-to-video (``text``) and/or frame-prediction (``context``) model."""
    backbone = WALT(
        in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=(5, 4, 4),
        num_classes=len(CLASS_NAMES) if classes else None, text_dim=WordEncoder.dim if text else None,
        context_frames=context,
    )  # fmt: skip
    tokenizer = CausalVAE(**presets["tiny"], variational=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (backbone, tokenizer):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return Pipeline(
        backbone.eval().requires_grad_(False), tokenizer.eval().requires_grad_(False),
        text_encoder=WordEncoder() if text else None, class_names=CLASS_NAMES if classes else None,
        sample_steps=steps,
    )  # fmt: skip


def write_tiny_model(folder: Path) -> Path:
    """A class-conditional model folder, as `walt export` writes one."""
    return tiny_pipeline().save_pretrained(folder)
