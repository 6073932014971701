"""Exponential moving average of a module's weights, kept as a frozen copy of the module."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA(nn.Module):
    """Frozen copy of `model` whose parameters track an exponential moving average of the live ones.

    `update(model)` after each optimizer step sets ema = d * ema + (1 - d) * live for floating-point
    parameters and copies buffers (normalization statistics, latent statistics) verbatim. Being a submodule of
    the LightningModule, the average is saved in checkpoints as `<name>.module.*` and moves with `.to()`.

    With ``warmup`` the decay of update n (from 0) is d = min(decay, (1 + n) / (10 + n)): a fixed 0.999 would
    still give the random initial weights a share of 0.999^1000 = 37% after 1000 steps, so short runs would be
    judged (and sampled) by a blurred-in initialization; the warm-up lets the average forget it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.module.eval()  # the average is only ever used for inference
        return self

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return float(self._decay())

    def _decay(self) -> Tensor:
        # A tensor on the counter's device: reading the counter on the host would sync a GPU every step.
        if not self.warmup:
            return torch.tensor(self.decay, dtype=torch.float64, device=self.num_updates.device)
        n = self.num_updates.double()  # float64: the same decay as computed on the host
        return ((1 + n) / (10 + n)).clamp(max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = dict(model.named_parameters())
        weight = 1.0 - self._decay()
        for name, ema_param in self.module.named_parameters():
            ema_param.lerp_(live[name].detach().to(ema_param.dtype), weight.to(ema_param.dtype))
        live_buffers = dict(model.named_buffers())
        for name, ema_buffer in self.module.named_buffers():
            ema_buffer.copy_(live_buffers[name])
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
