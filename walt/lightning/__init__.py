"""LightningModules and training utilities."""

from walt.lightning.ema import EMA
from walt.lightning.tokenizer import TokenizerModule

__all__ = ["EMA", "TokenizerModule"]
