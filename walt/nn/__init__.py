"""Shared neural-network primitives, one copy each. Imports nothing else from walt."""

from walt.nn.attention import Attention
from walt.nn.conv import CausalCache, CausalConv3d, causal_repeat_time
from walt.nn.embedding import LabelEmbedding, ScalarEmbedding, sinusoidal_features
from walt.nn.mlp import Mlp
from walt.nn.modulation import AdaLNLoRA, modulate
from walt.nn.patch import PatchEmbed3D, PatchUnembed3D
from walt.nn.position import SpatioTemporalPositionEmbedding
from walt.nn.resample import (
    KAISER_BETA,
    KAISER_CUTOFF,
    KAISER_RADIUS,
    LANCZOS_LOBES,
    kaiser_kernels,
    lanczos_kernels,
    lanczos_upsample2x,
    upsample2x,
)
from walt.nn.window import (
    fit_window,
    pad_to_windows,
    padded_grid,
    window_attention_mask,
    window_merge,
    window_partition,
)

__all__ = [
    "KAISER_BETA",
    "KAISER_CUTOFF",
    "KAISER_RADIUS",
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
    "kaiser_kernels",
    "lanczos_kernels",
    "lanczos_upsample2x",
    "modulate",
    "pad_to_windows",
    "padded_grid",
    "sinusoidal_features",
    "upsample2x",
    "window_attention_mask",
    "window_merge",
    "window_partition",
]
