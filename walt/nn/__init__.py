"""Shared neural-network primitives, one copy each. Imports nothing else from walt."""

from walt.nn.conv import CausalCache, CausalConv3d, causal_repeat_time

__all__ = ["CausalCache", "CausalConv3d", "causal_repeat_time"]
