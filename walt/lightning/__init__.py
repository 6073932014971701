"""LightningModules and training utilities."""

from walt.lightning.diffusion import BaseDiffusionModule
from walt.lightning.distillation import DistillationModule
from walt.lightning.ema import EMA
from walt.lightning.super_resolution import SuperResolutionModule
from walt.lightning.tokenizer import TokenizerModule

__all__ = ["EMA", "BaseDiffusionModule", "DistillationModule", "SuperResolutionModule", "TokenizerModule"]
