"""What every walt training module shares: a run that diverges stops, and what it saves and loads is checked.

:class:`WaltModule` is the base of the tokenizer, diffusion, super-resolution and distillation modules:

- a non-finite loss stops training before the backward pass, so the weights never take a NaN step;
- a checkpoint is refused (the run stops, the files already written stay as they are) when its weights hold NaN
  or infinite values or have exploded, so ``last.ckpt`` is never replaced by a diverged model;
- every checkpoint carries the sha256 of its weights (:data:`walt.checkpoint.INTEGRITY_KEY`), which
  :func:`walt.checkpoint.read_checkpoint` checks (a sharded FSDP checkpoint, which no rank holds whole, carries
  its files' hashes instead: :class:`walt.lightning.strategies.WaltFSDPStrategy`);
- the random stream (:mod:`walt.rng`): each data-parallel rank draws from a stream of its own (timesteps, noise,
  dropout, posterior samples), and every checkpoint carries the stream (CPU and CUDA generators), which a resume
  restores, so a resumed run draws the same as the uninterrupted one;
- ``load_from_checkpoint`` reads with ``weights_only=True``, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from torch import Tensor
from torch.optim import Optimizer

from walt.checkpoint import (
    INTEGRITY_KEY,
    is_sharded,
    local_tensors,
    nonfinite_weights,
    read_checkpoint,
    weights_sha256,
)
from walt.rng import rng_states, seed_per_rank, set_rng_states

__all__ = ["GROWTH_LIMIT", "OptimizerFactory", "WaltModule", "weight_scales"]

# What a config's ``optimizer:`` builds: a function of the trainable parameters (``class_path: torch.optim.AdamW``
# with its ``init_args`` but the parameters). The same type as Lightning's OptimizerCallable, without importing
# Lightning's CLI module into the training modules.
OptimizerFactory = Callable[[Iterable], Optimizer]

# How much the RMS of a trained part's weights may grow between two checkpoints of a run (or from the run's
# start to its first checkpoint) before the weights count as exploded. Adam-type optimizers move each weight by
# about the learning rate per step at most, and far less in practice: 300 steps of the tests' 2-layer backbone at
# lr 5e-3 (10x W.A.L.T's) grow its RMS 1.12x (0.101 -> 0.113). A diverged run grows it by orders of magnitude:
# a base model's "last" checkpoint held weights of 2.5e8 and sampled garbage, and one AdamW step at lr 1e10
# grows the RMS 4e10x. 100x lies far from both.
GROWTH_LIMIT = 100.0


class WaltModule(L.LightningModule):
    """The base of walt's training modules (see the module docstring). A subclass that overrides
    ``on_fit_start``, ``on_save_checkpoint``, ``on_load_checkpoint`` or ``on_train_start`` calls ``super()``'s."""

    def __init__(self) -> None:
        super().__init__()
        self._weight_scales: dict[str, float] | None = None  # per trained part, at the last check that passed
        self._scales_step: int | None = None  # the step of those scales
        self._saved_step: int | None = None  # the step of the last checkpoint known to be written

    # ---- a diverging run stops ----------------------------------------------------------------------------

    def on_before_backward(self, loss: Tensor) -> None:
        # Here rather than in each training_step: Lightning calls it before every backward pass, that of
        # automatic optimization and each manual_backward (the tokenizer's two networks) alike.
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite loss ({loss.detach().float().sum().item()}) at step "
                f"{self.global_step}; the run stops here, before the weights take this step, and the checkpoints "
                "already written are kept. Lower the learning rate, or check the data and its normalization."
            )

    # ---- the random stream --------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        # Lightning seeds every rank alike (seed_everything); each rank then derives its own stream, or the ranks
        # would draw the same timesteps, noise and dropout for their different samples.
        if self.trainer.world_size > 1:
            seed_per_rank(self.global_rank)

    def on_train_start(self) -> None:
        # Every rank takes part: under FSDP gathering the state dict is collective. Rank 0 alone checks the
        # weights, except in FSDP's sharded state dict, where each rank holds a part of them.
        state = self.trainer.strategy.lightning_module_state_dict()
        if is_sharded(state):
            self._weight_scales = weight_scales(
                local_tensors(state), self._trained_parts(), self._sum_over_ranks
            )
        elif self.trainer.is_global_zero:
            self._weight_scales = weight_scales(state, self._trained_parts())
        self._scales_step = self.global_step
        self._saved_step = self.global_step if self.trainer.ckpt_path else None

    # ---- what is saved is checked and signed --------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        writes = self._trainer is None or self.trainer.is_global_zero  # Lightning writes on rank 0 only
        sharded = is_sharded(state)  # FSDP's sharded state dict: every rank writes (and checks) its part
        if sharded:
            problem = self._first_problem(self._divergence(local_tensors(state), self._sum_over_ranks))
        else:
            problem = self._divergence(state) if writes else None
            if self._trainer is not None:
                problem = self.trainer.strategy.broadcast(problem)  # every rank stops, not rank 0 alone
        if problem is not None:
            before = (
                f"the last checkpoint written is from step {self._saved_step}"
                if self._saved_step is not None
                else "no checkpoint of this run was written before"
            )
            raise FloatingPointError(
                f"{type(self).__name__}: refusing to save a checkpoint at step {self.global_step}: {problem}. "
                f"Training has diverged; nothing is written and the files already there are kept ({before}). "
                "Resume from an earlier checkpoint with a lower learning rate, or check the data."
            )
        if writes and not sharded:
            # A sharded checkpoint's files are hashed by walt's FSDP strategy instead (no rank holds the whole
            # state to hash; walt.lightning.strategies.WaltFSDPStrategy).
            checkpoint[INTEGRITY_KEY] = {"weights_sha256": weights_sha256(state)}
        self._saved_step = self.global_step
        # Lightning restores weights, optimizer and loop state but not the random stream, which draws the
        # diffusion timesteps and noise, dropout, and the tokenizer's posterior samples: saved here (as tensors,
        # so checkpoints load with weights_only=True), so a resumed run follows the uninterrupted one step for step.
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:  # absent from checkpoints written before the stream was saved
            set_rng_states(checkpoint["rng_states"])

    def _divergence(
        self, state: Mapping[str, Any], reduce: Callable[[Tensor], Tensor] | None = None
    ) -> str | None:
        """Why ``state`` must not be saved (non-finite or exploded weights), or None; remembers its scales.
        ``reduce`` sums over the ranks where each holds a part of the weights."""
        bad = nonfinite_weights(state)
        if bad:
            return f"{len(bad)} of its weight tensors hold NaN or infinite values ({', '.join(bad[:3])}, ...)"
        if self._weight_scales is None:  # saved outside fit (nothing to compare with): finiteness only
            return None
        scales = weight_scales(state, list(self._weight_scales), reduce)
        for part, before in self._weight_scales.items():
            now = scales.get(part, before)
            if before > 0 and now > GROWTH_LIMIT * before:
                return (
                    f"the RMS of its {part} weights grew {now / before:.3g}x since step {self._scales_step} "
                    f"({before:.3g} -> {now:.3g}; more than {GROWTH_LIMIT:g}x counts as exploded)"
                )
        self._weight_scales, self._scales_step = scales, self.global_step
        return None

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        strategy = self.trainer.strategy  # on the ranks' device: NCCL reduces CUDA tensors only
        return strategy.reduce(tensor.to(strategy.root_device), reduce_op="sum").cpu()

    def _first_problem(self, problem: str | None) -> str | None:
        """The first rank's problem, on every rank: for checks where each rank looked at its own part."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return problem
        problems: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(problems, problem)
        return next((p for p in problems if p is not None), None)

    def _trained_parts(self) -> list[str]:
        """The top-level submodules with trainable parameters (the backbone; the autoencoder and discriminator):
        frozen ones (a tokenizer, an EMA copy, loss networks) never change, and would dilute the measure."""
        return [n for n, m in self.named_children() if any(p.requires_grad for p in m.parameters())]

    # ---- loading ------------------------------------------------------------------------------------------

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path | IO,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> WaltModule:
        """Lightning's ``load_from_checkpoint``, reading the file as walt's loaders do: a local file is first
        checked by :func:`walt.checkpoint.read_checkpoint` (weights hash, finite weights), and the file is
        unpickled with ``weights_only=True`` passed explicitly, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
        does not override (it only overrides calls that leave ``weights_only`` unset)."""
        if weights_only is False:
            raise ValueError(
                "walt checkpoints hold only tensors and plain containers: they load with weights_only=True"
            )
        if isinstance(checkpoint_path, (str, os.PathLike)) and _is_local_file_protocol(checkpoint_path):
            read_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs
        )


def weight_scales(
    state: Mapping[str, Any], parts: list[str], reduce: Callable[[Tensor], Tensor] | None = None
) -> dict[str, float]:
    """The RMS of the floating-point tensors under each top-level name in ``parts`` (``"backbone"`` covers
    ``backbone.*``), accumulated in float64; parts with no such tensor are left out. ``reduce`` sums the
    per-part sums and counts over the ranks, where each holds a part of every tensor (FSDP's sharded state)."""
    sums = dict.fromkeys(parts, 0.0)
    counts = dict.fromkeys(parts, 0)
    for name, tensor in state.items():
        part = name.split(".", 1)[0]
        if part in sums and torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel():
            sums[part] += float(tensor.detach().double().square().sum())
            counts[part] += tensor.numel()
    if reduce is not None:
        totals = reduce(torch.tensor([[sums[p], counts[p]] for p in parts], dtype=torch.float64)).tolist()
        sums, counts = ({p: row[i] for p, row in zip(parts, totals)} for i in (0, 1))
    return {part: math.sqrt(sums[part] / counts[part]) for part in parts if counts[part]}
