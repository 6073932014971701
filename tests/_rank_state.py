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
