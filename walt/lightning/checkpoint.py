"""Checkpoints that survive a killed run: written often enough, and never left half-written.

:class:`PeriodicCheckpoint` keeps ``last.ckpt`` fresh by steps and by time, so a run killed at any moment loses
at most one interval; :class:`AtomicCheckpointIO` writes each file under a temporary name in the destination's own
folder and renames it into place, so a kill during the write leaves the previous checkpoint whole, and reads the
checkpoint a run resumes from as :func:`walt.checkpoint.read_checkpoint` does. `walt fit`
(:class:`walt.cli.WaltCLI`) installs both in every run.
"""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from walt.atomic import write_atomic
from walt.checkpoint import check_checkpoint, check_checkpoint_file, read_checkpoint, sign_checkpoint

__all__ = ["AtomicCheckpointIO", "PeriodicCheckpoint", "atomic_torch_save", "continue_log_versions"]

LOG_VERSIONS = "walt_log_versions"  # checkpoint key: the version of each of the run's loggers


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that leaves ``path`` either as it was or complete, never truncated
    (:func:`walt.atomic.write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`atomic_torch_save` for local paths.

    Lightning's own writer stages the file in ``$TMPDIR`` and moves it into place: across filesystems the move
    is a copy, so a kill during it truncates the checkpoint (measured: 3 of 3 kills with ``$TMPDIR`` on tmpfs left
    ``last.ckpt`` at 0 B or cut short), and the staged file is orphaned. Remote URLs (``s3://``...) keep
    Lightning's writer."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        sign_checkpoint(checkpoint)  # the hash of each entry but the weights (optimizer, loops, RNG, ...)
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """What ``walt fit/validate/test --ckpt_path`` read, as walt's loaders read it: with ``weights_only=True``
        passed explicitly (Lightning leaves it unset, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into a
        full unpickling that runs whatever code the file holds), its weights checked against their hash."""
        if _is_local_file_protocol(path):
            return read_checkpoint(path)
        checkpoint = super().load_checkpoint(path, map_location, weights_only=True)
        check_checkpoint(checkpoint, path)
        return checkpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` every ``every_n_train_steps`` optimizer steps or every ``train_time_interval`` of
    training, whichever comes first, and when training ends, so a killed run loses at most one interval.

    ``every_n_train_steps`` saves at multiples of N (1000, 2000, ...) and, with ``save_top_k: -1``, also keeps
    each of these as ``epoch=E-step=S.ckpt``. ``train_time_interval`` ("DD:HH:MM:SS", as ``trainer.max_time``)
    rewrites ``last.ckpt`` only. ``null`` turns either off; with both off the run is saved only at its end.
    `walt fit` adds one to every run (the ``checkpoint:`` section of a config sets it); the folder is
    ``<default_root_dir>/checkpoints`` unless ``dirpath`` is given.

    Lightning's ``ModelCheckpoint`` takes steps or time but not both, and with ``save_top_k: 0`` it writes
    ``last.ckpt`` only at the end of training; this subclass decides when to save and leaves the writing,
    naming and resume bookkeeping to it.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        every_n_train_steps: int | None = 1000,
        train_time_interval: str | timedelta | None = "00:00:10:00",
        save_top_k: int = 0,
        filename: str | None = None,
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(
                f"checkpoint every_n_train_steps={every_n_train_steps}: give a positive step count, or null to "
                "save by time only"
            )
        # Lightning's own triggers are set to 0 (off): it cannot combine steps with time, so this class decides.
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            save_last=True,
            save_top_k=save_top_k,
            every_n_train_steps=0,
            every_n_epochs=0,
        )
        self.every_n_steps = every_n_train_steps or 0
        self.interval = parse_interval(train_time_interval)
        self._step_seen = 0
        self._saved_at = time.monotonic()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The loggers' versions (lightning_logs/version_N), so that a resumed run logs on where it left off
        # (walt.cli.WaltCLI) rather than in a new version folder per resume.
        checkpoint[LOG_VERSIONS] = [logger.version for logger in trainer.loggers]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_seen = trainer.global_step  # a resumed run counts from its restored step
        self._saved_at = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._steps_due(trainer.global_step):
            self._save(trainer, keep=True)
        elif self._time_due(trainer):
            self._save(trainer, keep=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, keep=False)  # skipped when the last step is saved already

    def _steps_due(self, step: int) -> bool:
        # A multiple of N crossed since the last batch, rather than step % N == 0: the tokenizer's GAN phase
        # advances the step by 2 per batch and would skip every odd multiple.
        seen, self._step_seen = self._step_seen, step
        return self.every_n_steps > 0 and step // self.every_n_steps > seen // self.every_n_steps

    def _time_due(self, trainer: L.Trainer) -> bool:
        if self.interval is None:
            return False
        due = time.monotonic() - self._saved_at >= self.interval.total_seconds()
        return trainer.strategy.broadcast(due)  # rank 0 decides: ranks whose clocks differ must not diverge

    def _save(self, trainer: L.Trainer, keep: bool) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        metrics = self._monitor_candidates(trainer)
        if keep:
            self._save_topk_checkpoint(trainer, metrics)
        self._save_last_checkpoint(trainer, metrics)
        self._saved_at = time.monotonic()


def parse_interval(value: str | timedelta | None) -> timedelta | None:
    """``"DD:HH:MM:SS"`` (the form of ``trainer.max_time``) as a timedelta; a timedelta or None as given."""
    if value is None or isinstance(value, timedelta):
        return value
    parts = str(value).split(":")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(
            f"checkpoint train_time_interval={value!r}: give days:hours:minutes:seconds as trainer.max_time "
            "does, e.g. '00:00:10:00' for 10 minutes, or null to save by steps only"
        )
    days, hours, minutes, seconds = (int(p) for p in parts)
    interval = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if interval.total_seconds() <= 0:
        raise ValueError(f"checkpoint train_time_interval={value!r} is zero: give a positive time, or null")
    return interval


def continue_log_versions(trainer: L.Trainer, ckpt_path: str | Path | None) -> None:
    """Gives the trainer's loggers the versions recorded in the checkpoint a run resumes from, so the resumed run
    appends to its own ``lightning_logs/version_N`` (TensorBoard shows one curve) instead of starting
    ``version_N+1`` at every resume. Loggers given a version in the config, and checkpoints that recorded none
    (written before walt recorded them, or by another callback), are left as they are."""
    if ckpt_path is None or not _is_local_file_protocol(ckpt_path) or not Path(ckpt_path).is_file():
        return  # "last", "hpc", a URL: Lightning resolves those itself
    check_checkpoint_file(ckpt_path)  # an empty or foreign file fails here, by name, before anything starts
    try:  # memory-mapped: only the small entry read here is loaded, however large the checkpoint
        versions = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get(LOG_VERSIONS)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError):
        return  # e.g. torch's pre-zip format, which cannot be mapped: the resume reads it as usual
    if not isinstance(versions, list) or len(versions) != len(trainer.loggers):
        return
    for logger, version in zip(trainer.loggers, versions):
        # Lightning's loggers take a version only in their constructor; one left unset (``_version`` None)
        # picks the next free number on first use, which has not happened yet when fitting starts.
        if getattr(logger, "_version", False) is None and isinstance(version, int | str):
            logger._version = version


def install_atomic_io(trainer: L.Trainer) -> None:
    """Makes the trainer's checkpoint writer an :class:`AtomicCheckpointIO`, unless it was configured with a writer
    of its own (an async or remote one); a wrapping writer gets the atomic one inside."""
    strategy = trainer.strategy
    io = strategy.checkpoint_io  # Lightning creates its default here on first access
    inner = getattr(io, "checkpoint_io", None)  # _WrappingCheckpointIO (e.g. AsyncCheckpointIO)
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif type(inner) is TorchCheckpointIO:
        io.checkpoint_io = AtomicCheckpointIO()
