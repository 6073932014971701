"""Causal 3D tokenizer-autoencoder: model, presets, discriminator and training losses."""

from walt.tokenizer.presets import presets
from walt.tokenizer.vae import CausalVAE

__all__ = ["CausalVAE", "presets"]
