"""Callbacks and data for the kill tests (tests/test_checkpointing.py, tests/test_tokenizer_module.py), loaded by
``walt fit`` / ``walt encode`` in a subprocess by class_path: a record of every step, a pause where the test kills
the process, ballast that makes a checkpoint slow to write, and a dataset that pauses at an item."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from walt.data import SyntheticVideos


class RecordSteps(L.Callback):
    """Appends one JSON line per training batch to ``path``: the step, the loss and a checksum of the batch, flushed
    at once, so what a killed process trained on survives it."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {
            "step": trainer.global_step,
            "loss": float(outputs["loss"]),
            "batch": sum(float(v.double().sum()) for v in batch.values() if isinstance(v, torch.Tensor)),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class PauseAt(L.Callback):
    """At the end of step ``step`` (before that step's checkpoint, which Lightning's checkpoint callbacks write
    after every other callback) writes ``flag`` and waits, for the test to kill the process there."""

    def __init__(self, step: int, flag: str) -> None:
        self.step, self.flag = step, Path(flag)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.flag.write_text(str(self.step))
            time.sleep(120)


class Ballast(L.Callback):
    """Adds ``megabytes`` of zeros to every checkpoint, so writing one takes long enough to be killed during."""

    def __init__(self, megabytes: int) -> None:
        self.megabytes = megabytes

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["ballast"] = torch.zeros(self.megabytes * 2**18)  # float32: 4 bytes each


class PausingVideos(SyntheticVideos):
    """Synthetic clips that, the first time item ``pause_at`` is read (while ``flag`` does not exist), write
    ``flag`` and wait, for the test to kill the reading process (`walt encode`) there."""

    def __init__(self, pause_at: int, flag: str, num_samples: int, num_frames: int, resolution: int) -> None:
        super().__init__(num_samples=num_samples, num_frames=num_frames, resolution=resolution)
        self.pause_at, self.flag = pause_at, Path(flag)

    def __getitem__(self, index: int) -> dict:
        if index == self.pause_at and not self.flag.exists():
            self.flag.write_text(str(index))
            time.sleep(120)
        return super().__getitem__(index)
