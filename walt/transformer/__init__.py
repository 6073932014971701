"""walt.transformer: the window-attention diffusion backbone."""

from walt.transformer.block import FinalLayer, WindowBlock, window_attention
from walt.transformer.cache import FirstBlockCache, relative_change
from walt.transformer.model import WALT, WALT_WINDOWS, BlockInputs
from walt.transformer.presets import presets

__all__ = [
    "WALT",
    "WALT_WINDOWS",
    "BlockInputs",
    "FinalLayer",
    "FirstBlockCache",
    "WindowBlock",
    "presets",
    "relative_change",
    "window_attention",
]
