"""LightningModules and training utilities."""

from walt.lightning.checkpoint import AtomicCheckpointIO, PeriodicCheckpoint
from walt.lightning.diffusion import BaseDiffusionModule
from walt.lightning.distillation import DistillationModule
from walt.lightning.ema import EMA
from walt.lightning.finetune import FineTune, LoRAFineTune
from walt.lightning.module import WaltModule
from walt.lightning.strategies import WaltFSDPStrategy
from walt.lightning.super_resolution import SuperResolutionModule
from walt.lightning.tokenizer import TokenizerModule

__all__ = [
    "EMA",
    "AtomicCheckpointIO",
    "BaseDiffusionModule",
    "DistillationModule",
    "FineTune",
    "LoRAFineTune",
    "PeriodicCheckpoint",
    "SuperResolutionModule",
    "TokenizerModule",
    "WaltFSDPStrategy",
    "WaltModule",
]
