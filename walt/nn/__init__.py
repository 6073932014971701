"""Shared neural-network primitives, one copy each. Imports nothing else from walt."""

from walt.nn.attention import Attention
from walt.nn.conv import CausalCache, CausalConv3d, causal_repeat_time
from walt.nn.embedding import LabelEmbedding, ScalarEmbedding, sinusoidal_features
from walt.nn.mlp import Mlp
from walt.nn.modulation import AdaLNLoRA, modulate
from walt.nn.patch import PatchEmbed3D, PatchUnembed3D
from walt.nn.position import SpatioTemporalPositionEmbedding
from walt.nn.resample import LANCZOS_LOBES, lanczos_kernels, lanczos_upsample2x
from walt.nn.window import (
    fit_window,
    pad_to_windows,
    padded_grid,
    window_attention_mask,
    window_merge,
    window_partition,
)

__all__ = [
    "LANCZOS_LOBES",
    "AdaLNLoRA",
    "Attention",
    "CausalCache",
    "CausalConv3d",
    "LabelEmbedding",
    "Mlp",
    "PatchEmbed3D",
    "PatchUnembed3D",
    "ScalarEmbedding",
    "SpatioTemporalPositionEmbedding",
    "causal_repeat_time",
    "fit_window",
    "lanczos_kernels",
    "lanczos_upsample2x",
    "modulate",
    "pad_to_windows",
    "padded_grid",
    "sinusoidal_features",
    "window_attention_mask",
    "window_merge",
    "window_partition",
]
