"""LightningModules and training utilities: :class:`DiffusionModule` (the base model, super-resolution stages
and distillation rounds, by configuration), :class:`TokenizerModule`, and what they share."""

from walt.lightning.checkpoint import AtomicCheckpointIO, PeriodicCheckpoint
from walt.lightning.cooldown import LearningRateCooldown
from walt.lightning.diffusion import DiffusionModule
from walt.lightning.distillation import Teacher
from walt.lightning.ema import EMA
from walt.lightning.finetune import FineTune, LoRAFineTune
from walt.lightning.legacy import BaseDiffusionModule, DistillationModule, SuperResolutionModule
from walt.lightning.module import WaltModule
from walt.lightning.strategies import WaltFSDPStrategy
from walt.lightning.tokenizer import TokenizerModule

__all__ = [
    "EMA",
    "AtomicCheckpointIO",
    "BaseDiffusionModule",
    "DiffusionModule",
    "DistillationModule",
    "FineTune",
    "LearningRateCooldown",
    "LoRAFineTune",
    "PeriodicCheckpoint",
    "SuperResolutionModule",
    "Teacher",
    "TokenizerModule",
    "WaltFSDPStrategy",
    "WaltModule",
]
