"""Learning-rate cooldown at the end of a run's budget, whether the budget is steps, epochs or time.

W.A.L.T-style recipes here train at a constant rate (after warmup) and stop on `trainer.max_time` or
`trainer.max_steps`. Decaying the rate to zero over the last part of a fixed budget is known to buy most of
what a longer run would (the warmup-stable-decay schedules); with `max_time` the end is a time, so the schedule
has to follow Lightning's own clock rather than a step count fixed in advance.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import Callback, Timer

from walt.checks import check_positive


def cooldown_factor(progress: float, fraction: float) -> float:
    """1 until ``1 - fraction`` of the budget is spent, then linearly down to 0 at its end."""
    return min(1.0, max(0.0, (1.0 - progress) / fraction))


def budget_progress(trainer: L.Trainer) -> float | None:
    """The spent part of the run's budget, in [0, 1]: the larger of the step and the time fraction (the run
    stops at whichever ends first). None when the run has neither an end in steps or epochs nor `max_time`."""
    fractions = []
    total_steps = trainer.estimated_stepping_batches
    if math.isfinite(total_steps) and total_steps > 0:
        fractions.append(trainer.global_step / total_steps)
    for callback in trainer.callbacks:
        remaining = callback.time_remaining() if isinstance(callback, Timer) else None
        if remaining is not None:
            elapsed = callback.time_elapsed()
            fractions.append(elapsed / max(elapsed + remaining, 1e-9))
    return min(1.0, max(fractions)) if fractions else None


class LearningRateCooldown(Callback):
    """Scales every optimizer's learning rate by `cooldown_factor` before each training batch.

    It multiplies whatever rate the module's own scheduler set (the diffusion module's warmup, say), and
    with no scheduler the rate the optimizer started with. Resumed runs continue the schedule: Lightning's
    timer and step count are in the checkpoint. On several GPUs every rank takes rank 0's progress, so that
    their clocks' small differences never give the replicas different rates. Logs ``train/lr_factor``.

    YAML, under ``trainer:``::

        callbacks:
          - class_path: walt.lightning.LearningRateCooldown
            init_args: {fraction: 0.2}

    Args:
        fraction: the last part of the budget over which the rate falls to zero, in (0, 1].
    """

    def __init__(self, fraction: float = 0.2) -> None:
        super().__init__()
        check_positive("fraction", fraction)
        if fraction > 1:
            raise ValueError(
                f"fraction must be in (0, 1], the part of the run that cools down; got {fraction}"
            )
        self.fraction = fraction
        # (optimizer, param group) -> the rate before the cooldown's factor, and the rate this callback last set.
        # Both are checkpointed: a resumed optimizer comes back with the cooled rate, which is not the base.
        self._scheduled: dict[tuple[int, int], float] = {}
        self._set: dict[tuple[int, int], float] = {}

    def state_dict(self) -> dict:
        return {"scheduled": list(self._scheduled.items()), "set": list(self._set.items())}

    def load_state_dict(self, state_dict: dict) -> None:
        self._scheduled = {tuple(k): v for k, v in state_dict["scheduled"]}
        self._set = {tuple(k): v for k, v in state_dict["set"]}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if budget_progress(trainer) is None:
            raise ValueError(
                "LearningRateCooldown needs the run's end: set trainer.max_steps, trainer.max_epochs or "
                "trainer.max_time"
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        progress = budget_progress(trainer) or 0.0
        if trainer.world_size > 1:  # each rank's clock reads a little differently: all take rank 0's rate
            progress = trainer.strategy.broadcast(progress, src=0)
        factor = cooldown_factor(progress, self.fraction)
        for i, optimizer in enumerate(trainer.optimizers):
            for j, group in enumerate(optimizer.param_groups):
                key = (i, j)
                # A rate other than the one set here comes from a scheduler (or the start): it is the new base.
                if key not in self._set or group["lr"] != self._set[key]:
                    self._scheduled[key] = group["lr"]
                group["lr"] = self._scheduled[key] * factor
                self._set[key] = group["lr"]
        pl_module.log("train/lr_factor", factor, on_step=True, on_epoch=False)
