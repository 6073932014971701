"""Causal 3D tokenizer-autoencoder: model, presets, loading trained weights, discriminator and training losses."""

from walt.tokenizer.presets import presets
from walt.tokenizer.vae import CausalVAE
from walt.tokenizer.weights import load_vae_weights

__all__ = ["CausalVAE", "load_vae_weights", "presets"]
