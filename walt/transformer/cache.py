"""First-block caching: reuse the deeper blocks' work between denoising steps where it would barely change.

Between neighbouring denoising steps a diffusion transformer's hidden states change slowly over much of the
trajectory. First-block caching (ParaAttention's FBCache; TeaCache makes the same bet with the time embedding)
runs the first block on every step and compares its residual with the one of the last step that ran every
block. While the relative change stays under a threshold, the other blocks are skipped and their residual from
that last full step is added instead. The first block is the probe because its output is cheap and moves with
the input; the comparison is against the last *full* step, not the previous one, so small changes cannot pile
up unseen.

The decision is one per call, for the whole batch: the saving is a skipped batched pass. A sample's result
therefore depends on the batch it is drawn in once the cache is on (with ``threshold = 0`` it is off and exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

from walt.conditioning import Conditioning
from walt.transformer.model import WALT, BlockInputs

__all__ = ["FirstBlockCache", "relative_change"]


def relative_change(new: Tensor, reference: Tensor) -> float:
    """mean |new - reference| / mean |reference|, in float32; against an all-zero reference, 0 if ``new`` is
    zero too (nothing changed: a block whose gates are still at their zero initialization) and inf otherwise."""
    new, reference = new.float(), reference.float()
    change, scale = (new - reference).abs().mean(), reference.abs().mean()
    # one host sync per call: the ratio, with the all-zero reference resolved on the device
    ratio = torch.where(scale > 0, change / scale, torch.where(change > 0, torch.inf, 0.0))
    return ratio.item()


def _head(model: WALT, x: Tensor, t: Tensor, cond: Conditioning | None) -> tuple[Tensor, Tensor, BlockInputs]:
    h0, inputs = model.embed(x, t, cond)  # (B, T, H', W', D)
    h1 = model.run_blocks(h0, inputs, 0, 1)  # (B, T, H', W', D)
    return h1, h1 - h0, inputs


def _tail(model: WALT, h1: Tensor, inputs: BlockInputs) -> tuple[Tensor, Tensor]:
    h = model.run_blocks(h1, inputs, 1)  # (B, T, H', W', D)
    # The residual is kept in float32: in bf16, h1 + (h - h1) would round away from h even where nothing changed.
    return model.final_layer(h, inputs.c_act), h.float() - h1.float()  # (B, C, T, H, W), (B, T, H', W', D)


def _final(model: WALT, h1: Tensor, residual: Tensor, inputs: BlockInputs) -> Tensor:
    h = (h1.float() + residual).to(h1.dtype)  # (B, T, H', W', D)
    return model.final_layer(h, inputs.c_act)  # (B, C, T, H, W)


_COMPILED: dict[tuple[str, str | None], object] = {}


def _compiled(fn, mode: str | None):
    # One compiled wrapper per piece and mode for the process: Dynamo caches graphs on the function's code and
    # guards on the model it is given, so every cache of every sampling run reuses them.
    key = (fn.__name__, mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, fullgraph=True, mode=mode)
    return _COMPILED[key]


class FirstBlockCache:
    """A ``model(x, t, cond) -> v`` that skips blocks 2..N of ``model`` on calls where the first block's residual
    moved by less than ``threshold`` (relative mean absolute change) since the last call that ran them all.

    Build one per sampling run: it holds the state of one trajectory (the batch it was first called with).
    ``threshold = 0`` runs every block on every call and returns exactly what ``model`` returns. Typical values
    are 0.05 to 0.2: the larger, the more calls are cached and the further the samples drift from the uncached
    ones (measure the cost, e.g. by FVD, before relying on it). ``compile=True`` runs the pieces through
    ``torch.compile`` (worth it on a GPU), in its ``mode`` (e.g. "reduce-overhead"). ``full_passes`` and
    ``cached_passes`` count the two kinds of call.
    """

    def __init__(self, model: WALT, threshold: float, compile: bool = False, mode: str | None = None) -> None:
        if not threshold >= 0:
            raise ValueError(f"the cache threshold is a relative change >= 0 (0 = off), got {threshold}")
        if len(model.blocks) < 2:
            raise ValueError("first-block caching needs a model with at least 2 blocks")
        self.model = model
        self.threshold = float(threshold)
        self.full_passes = 0
        self.cached_passes = 0
        self._head = _compiled(_head, mode) if compile else _head
        self._tail = _compiled(_tail, mode) if compile else _tail
        self._final = _compiled(_final, mode) if compile else _final
        self._probe: Tensor | None = None  # the first block's residual at the last full pass
        self._residual: Tensor | None = None  # blocks 2..N's residual at the last full pass

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """x (B, C, T, H, W), t (B,) or (B, T) -> v (B, C, T, H, W), as ``model`` computes it or cached."""
        h1, probe, inputs = self._head(self.model, x, t, cond)  # (B, T, H', W', D) each
        if self._reusable(probe):
            self.cached_passes += 1
            return self._final(self.model, h1, self._residual, inputs)  # (B, C, T, H, W)
        v, self._residual = self._tail(self.model, h1, inputs)  # (B, C, T, H, W), (B, T, H', W', D)
        self._probe = probe
        self.full_passes += 1
        return v

    def _reusable(self, probe: Tensor) -> bool:
        if self.threshold == 0 or self._probe is None or self._probe.shape != probe.shape:
            return False
        return relative_change(probe, self._probe) < self.threshold

    @property
    def stats(self) -> dict[str, int]:
        return {"full": self.full_passes, "cached": self.cached_passes}
