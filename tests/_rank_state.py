"""A callback for the 2-process DDP test: each rank writes what it trained on and the weights it ended with."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankState(L.Callback):
    """Writes ``rank<r>.pt`` in ``folder``: the labels of each training batch, the backbone and EMA weights at the
    end of training, and one draw from the rank's torch random stream."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.labels: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.labels.append(batch["label"].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        state = {
            "labels": self.labels,
            "backbone": {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in pl_module.ema.state_dict().items()},
            "draw": torch.rand(4),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


class SaveGatheredWeights(L.Callback):
    """Writes ``rank<r>.pt`` in ``folder``: every parameter and buffer of the module as this rank sees it with the
    FSDP shards gathered (``summon_full_params``, a collective every rank enters), under the names of the
    unwrapped module, so they compare key for key with a checkpoint's ``state_dict``. Written when training ends,
    or with ``at_step`` after that optimizer step (when that step's checkpoint is written), or with ``at_start``
    when training starts (in a resumed run: the state just restored from the checkpoint)."""

    def __init__(self, folder: str, at_step: int | None = None, at_start: bool = False) -> None:
        self.folder = Path(folder)
        self.at_step, self.at_start = at_step, at_start

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start:
            self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at_step is not None and trainer.global_step == self.at_step:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_step is None and not self.at_start:
            self._save(trainer, pl_module)

    def _save(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            named = [*pl_module.named_parameters(), *pl_module.named_buffers()]
            state = {_strip(name, wrappers): t.detach().clone().cpu() for name, t in named}
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def _strip(name: str, parts: tuple[str, ...]) -> str:
    for part in parts:
        name = name.replace(part, "")
    return name
