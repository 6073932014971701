"""walt.transformer: the window-attention diffusion backbone."""

from walt.transformer.block import FinalLayer, WindowBlock, window_attention
from walt.transformer.model import WALT, WALT_WINDOWS
from walt.transformer.presets import presets

__all__ = ["WALT", "WALT_WINDOWS", "FinalLayer", "WindowBlock", "presets", "window_attention"]
