"""Training strategies whose checkpoints go through walt's checks.

Lightning's ``FSDPStrategy`` reads and writes checkpoints itself rather than through the trainer's checkpoint
writer, so under it the checks of :class:`walt.lightning.checkpoint.AtomicCheckpointIO` never ran: it reads a
checkpoint file with its own lazy unpickler, a plain ``pickle.Unpickler`` that imports whatever the file names
(a malicious checkpoint runs its code on every rank, whatever ``weights_only`` says), without the weights hash;
and its sharded checkpoints are written in place, file by file, and read by ``torch.distributed.checkpoint``,
which unpickles their ``.metadata`` without restriction. :class:`WaltFSDPStrategy` is that strategy with walt's
reading and writing (see its docstring for what each kind of checkpoint gets).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.fabric.strategies.fsdp import (
    _METADATA_FILENAME,
    _get_full_state_dict_context,
    _get_sharded_state_dict_context,
    _has_fsdp_modules,
    _is_sharded_checkpoint,
)
from lightning.fabric.strategies.model_parallel import _load_raw_module_state
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.checkpoint import FileSystemReader

from walt.atomic import remove_orphans, replace_folder, staging_name, write_atomic
from walt.checkpoint import (
    CheckpointError,
    check_checkpoint,
    check_checkpoint_file,
    load_weights_only,
    local_tensors,
    nonfinite_weights,
)
from walt.distributed import FSDP_CHECKPOINTED, FSDP_UNITS
from walt.lightning.checkpoint import AtomicCheckpointIO

__all__ = ["MANIFEST", "WaltFSDPStrategy", "verify_manifest", "write_manifest"]

MANIFEST = "walt_integrity.json"  # in a sharded checkpoint folder: the sha256 of each of its files


class WaltFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (the same arguments: ``configs/distributed/fsdp.yaml``) whose checkpoints are
    read and written as walt reads and writes them, and which wraps walt's FSDP units by default
    (:data:`walt.distributed.FSDP_UNITS`, activations of :data:`~walt.distributed.FSDP_CHECKPOINTED`
    recomputed). Also registered as ``strategy: walt_fsdp``.

    **A full checkpoint** (``state_dict_type: full``, walt's default: one file, the state gathered on rank 0,
    the same file a single-GPU run writes) is checked on every rank exactly as ``walt sample`` checks it
    (:func:`walt.checkpoint.read_checkpoint`): unpickled with ``weights_only=True``, so a file posing as a
    checkpoint runs no code; the sha256 of its weights recomputed against the one written with them; NaN and
    infinite weights refused. It is memory-mapped, so the ranks of one machine share one copy of it. It is
    written by rank 0 through :class:`~walt.lightning.checkpoint.AtomicCheckpointIO` (this strategy's default
    writer): whole or not at all.

    **A sharded checkpoint** (``state_dict_type: sharded``: a folder with each rank's shards, written by
    ``torch.distributed.checkpoint``) is written into a temporary folder beside its destination; rank 0 records
    the sha256 of each of its files in :data:`MANIFEST`, and the folder then replaces the old one in one step
    (:func:`walt.atomic.replace_folder`), so a kill leaves the old checkpoint or the new one, never a mix of
    shards. Reading it, rank 0 checks every file against that record (a folder without one, e.g. written by
    Lightning's own strategy, is read with a warning); every rank unpickles ``meta.pt`` with
    ``weights_only=True``, the ``.metadata`` index with an unpickler that accepts only its own record types,
    and any non-tensor entry only after a weights-only unpickling of the very same bytes succeeded; once loaded,
    each rank refuses NaN or infinite values in its shards. What is not checked: the hash of the weights
    themselves (no rank holds them whole; the file hashes catch the same damage: a flipped bit, a copy cut
    short), files a rank reads that rank 0 cannot see (the check assumes one folder all ranks share), and a
    file changed between rank 0's check and the ranks' reading. Like the weights hash, the record guards
    against damage, not a forger, who can rewrite it: that is the unpicklers' part.

    Every rank checks, and all stop (each with the reason it found, or saying another rank refused) if any
    refuses, so no rank is left waiting in a collective. ``weights_only=False`` is refused.

    `walt fit/validate/test` use it for Lightning's spelling too (``class_path:
    lightning.pytorch.strategies.FSDPStrategy`` or ``strategy: fsdp``: :class:`walt.cli.WaltCLI` makes that
    strategy this one, arguments unchanged); a ``Trainer`` built in Python gets the checks only with this class.
    """

    strategy_name = "walt_fsdp"
    _registered_strategies: ClassVar[list[str]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # walt's units and activation checkpointing (walt.distributed says why) unless the config names others.
        for name, policy in (
            ("auto_wrap_policy", FSDP_UNITS),
            ("activation_checkpointing_policy", FSDP_CHECKPOINTED),
        ):
            if kwargs.get(name) is None:
                kwargs[name] = set(policy)
        super().__init__(*args, **kwargs)

    @property
    def checkpoint_io(self) -> CheckpointIO:
        # Lightning's default writer (TorchCheckpointIO, which stages in $TMPDIR and moves the file: truncated by
        # a kill) is replaced by walt's atomic one, as walt fit does for every other strategy.
        io_ = self._checkpoint_io
        if io_ is None or type(io_) is TorchCheckpointIO:
            self._checkpoint_io = io_ = AtomicCheckpointIO()
        elif isinstance(io_, _WrappingCheckpointIO):
            io_.checkpoint_io = (
                AtomicCheckpointIO()
            )  # e.g. AsyncCheckpointIO: atomic inside, unless configured
        return io_

    @checkpoint_io.setter
    def checkpoint_io(self, io_: CheckpointIO) -> None:
        self._checkpoint_io = io_

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if not torch.distributed.is_available():
            return
        strategy_registry.register(
            "walt_fsdp", cls, description="FSDP whose checkpoints are read and written with walt's checks"
        )
        cls._registered_strategies.append("walt_fsdp")

    # ---- writing ----------------------------------------------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if self._state_dict_type != "sharded" or storage_options is not None:
            # full: rank 0 writes through self.checkpoint_io (atomic); storage_options: Lightning's TypeError
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        staged = Path(self.broadcast(str(staging_name(path))))  # rank 0's name, for every rank
        if self.is_global_zero:
            remove_orphans(path)  # folders of saves killed midway
        self.barrier("walt_fsdp_staging")
        try:
            # Lightning's sharded writer (each rank's shards, then rank 0's meta.pt), into the staging folder.
            super().save_checkpoint(checkpoint, staged)
            self.barrier("walt_fsdp_written")
            if self.is_global_zero:
                write_manifest(staged)
                replace_folder(staged, path)
        except BaseException:
            if self.is_global_zero:
                shutil.rmtree(staged, ignore_errors=True)  # the old checkpoint stays as it was
            raise
        self.barrier("walt_fsdp_in_place")

    # ---- reading ----------------------------------------------------------------------------------------------

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(
                "walt checkpoints hold only tensors and plain containers: they load with weights_only=True"
            )
        path = Path(self.broadcast(str(checkpoint_path)))  # every rank reads what rank 0 names
        if _is_sharded_checkpoint(path):
            return self._load_sharded(path)
        if path.is_dir():
            raise CheckpointError(
                f"{path} is a folder without {_METADATA_FILENAME}: neither a checkpoint file nor a sharded "
                "checkpoint (a copy cut short?)"
            )
        return self._load_full(path)

    def _load_full(self, path: Path) -> dict[str, Any]:
        """As Lightning 2.6's ``FSDPStrategy.load_checkpoint`` loads a checkpoint file, reading it with
        :func:`walt.checkpoint.read_checkpoint`'s checks instead of its unrestricted lazy unpickler."""
        checkpoint, refusal = None, None
        try:
            check_checkpoint_file(path)
            # Memory-mapped (a zip archive only): the ranks of a machine share the file's pages, as Lightning's
            # lazy loading meant to, rather than each holding a copy of the whole state.
            checkpoint = load_weights_only(path, mmap=zipfile.is_zipfile(path))
            check_checkpoint(checkpoint, path)
        except (CheckpointError, FileNotFoundError) as err:
            refusal = err
        self._all_accept(refusal, path)
        assert checkpoint is not None
        assert self.model is not None and self.lightning_module is not None
        _load_raw_module_state(
            checkpoint.pop("state_dict"),
            module=self.model,
            world_size=self.world_size,
            strict=self.lightning_module.strict_loading,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer_states = checkpoint.get("optimizer_states")
        if optimizer_states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(self.optimizers) != len(optimizer_states):
            raise RuntimeError(
                f"You have configured {len(self.optimizers)} optimizers but the checkpoint contains"
                f" {len(optimizer_states)} optimizers to load. Please resume training with the same number"
                " of optimizers or edit the checkpoint manually to remove states."
            )
        with _get_full_state_dict_context(self.model, world_size=self.world_size, rank0_only=False):
            for optimizer, opt_state in zip(self.optimizers, optimizer_states):
                if opt_state["state"] and isinstance(next(iter(opt_state["state"])), int):
                    # saved by a plain (unsharded) optimizer: keyed by parameter index
                    opt_state = FSDP.rekey_optim_state_dict(
                        opt_state, OptimStateKeyType.PARAM_NAME, self.model
                    )
                opt_state = FSDP.optim_state_dict_to_load(
                    optim_state_dict=opt_state, model=self.model, optim=optimizer
                )
                optimizer.load_state_dict(opt_state)
        return checkpoint

    def _load_sharded(self, path: Path) -> dict[str, Any]:
        """As Lightning 2.6's ``FSDPStrategy.load_checkpoint`` loads a sharded checkpoint folder, with every file
        checked (see the class docstring)."""
        metadata, refusal = None, None
        try:
            if self.is_global_zero:
                verify_manifest(path)
            metadata = load_weights_only(path / _METADATA_FILENAME)
            if not isinstance(metadata, dict):
                raise CheckpointError(
                    f"{path / _METADATA_FILENAME} is not a checkpoint's metadata (not a dict)"
                )
            _SafeReader(path).read_metadata()  # refused here, by name, rather than inside the collective load
        except (CheckpointError, FileNotFoundError) as err:
            refusal = err
        self._all_accept(refusal, path)
        assert metadata is not None and self.model is not None and self.lightning_module is not None

        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # (A module without FSDP units, which FSDP's context rejects, has its plain state dict.)
        sharded = _get_sharded_state_dict_context if _has_fsdp_modules(self.model) else contextlib.nullcontext
        with sharded(self.model):
            module_state = {"model": self.model.state_dict()}
            with _refusals_named():
                load(module_state, storage_reader=_SafeReader(path))
            bad = nonfinite_weights(local_tensors(module_state["model"]))
            refusal = None
            if bad:
                refusal = CheckpointError(
                    f"{path}: {len(bad)} of its weight tensors hold NaN or infinite values ({', '.join(bad[:3])}, "
                    "...): the training had diverged when it was written; use an earlier checkpoint"
                )
            self._all_accept(refusal, path)
            self.model.load_state_dict(module_state["model"], strict=self.lightning_module.strict_loading)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
                for idx, optimizer in enumerate(self.optimizers):
                    key = f"optimizer_{idx}"
                    with _refusals_named():
                        state = load_sharded_optimizer_state_dict(
                            model_state_dict=module_state["model"],
                            optimizer_key=key,
                            storage_reader=_SafeReader(path),
                        )
                    optimizer.load_state_dict(
                        FSDP.optim_state_dict_to_load(
                            optim_state_dict=state[key], model=self.model, optim=optimizer
                        )
                    )
        return metadata

    def _all_accept(self, refusal: Exception | None, path: Path) -> None:
        """Raises on every rank if any rank refused the checkpoint: its own reason where it has one."""
        accepted = self.reduce_boolean_decision(refusal is None, all=True)
        if refusal is not None:
            raise refusal
        if not accepted:
            raise CheckpointError(f"{path} was refused on another rank (its error above says why)")


if "walt_fsdp" not in StrategyRegistry:  # `strategy: walt_fsdp` in a config or on the command line
    WaltFSDPStrategy.register_strategies(StrategyRegistry)


# ---- sharded checkpoints: the record of their files and safe reading ----------------------------------------


@contextlib.contextmanager
def _refusals_named() -> Iterator[None]:
    """``torch.distributed.checkpoint`` gathers every rank's failure into one ``CheckpointException`` (a
    BaseException, raised on every rank, whose text is each rank's traceback): a refusal of walt's reader inside
    it comes out as that :class:`CheckpointError`, one line naming the file."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        refusal = next((e for e, _ in err.failures.values() if isinstance(e, CheckpointError)), None)
        if refusal is None:
            raise
        raise CheckpointError(str(refusal)) from None


def write_manifest(folder: str | Path) -> Path:
    """Writes :data:`MANIFEST` into ``folder``: the sha256 of each file under it (by its path relative to it)."""
    folder = Path(folder)
    files = {
        f.relative_to(folder).as_posix(): _file_sha256(f) for f in sorted(folder.rglob("*")) if f.is_file()
    }
    files.pop(MANIFEST, None)
    return write_atomic(folder / MANIFEST, json.dumps({"sha256": files}, indent=1, sort_keys=True))


def verify_manifest(folder: str | Path) -> None:
    """Raises :class:`CheckpointError` naming the file when a file of a sharded checkpoint ``folder`` is missing
    or differs from the hash :func:`write_manifest` recorded; a folder without a record is read with a warning."""
    folder = Path(folder)
    record = folder / MANIFEST
    if not record.is_file():
        warnings.warn(
            f"{folder} carries no {MANIFEST} (written by Lightning's FSDPStrategy or an older walt): its files are "
            "read unverified",
            stacklevel=2,
        )
        return
    try:
        files = json.loads(record.read_text())["sha256"]
        assert isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{record} is not a readable record of the checkpoint's files") from None
    for name in (_METADATA_FILENAME, ".metadata"):
        if name not in files:
            raise CheckpointError(f"{record} does not record {name}: it is not this checkpoint's record")
    for name, recorded in sorted(files.items()):
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{folder} is incomplete: {name} is missing (a copy cut short?)")
        if _file_sha256(file) != recorded:
            raise CheckpointError(
                f"{file} is corrupt: it does not match the hash written with it (the file changed after it was "
                "written: a bad disk, copy or download); use an earlier checkpoint or a fresh copy"
            )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles the ``.metadata`` index of a ``torch.distributed.checkpoint`` folder, accepting only the types
    such an index is made of: its record classes, dtypes, sizes, layouts, paths. Any other global (``os.system``
    in a forged index) is refused before it is looked up."""

    _MODULES: ClassVar[tuple[str, ...]] = (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
    )
    _OTHERS: ClassVar[set[tuple[str, str]]] = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES:
            value = super().find_class(module, name)
            if isinstance(value, type) and value.__module__ == module:  # a record class (dataclass or enum)
                return value
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        elif (module, name) in self._OTHERS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a checkpoint index may not load {module}.{name}")


class _SafeReader(FileSystemReader):
    """``torch.distributed.checkpoint``'s file reader with its two unrestricted unpicklings made safe: the
    ``.metadata`` index goes through :class:`_MetadataUnpickler`, and an entry stored as bytes (anything not a
    tensor) reaches the load planner, which unpickles it without restriction, only once a weights-only
    unpickling of the very same bytes succeeded. (Tensors are read with ``weights_only=True`` already.)"""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self._get_metadata_path(kwargs.get("rank")))  # .metadata (__<rank>.metadata: per rank)
        try:
            with path.open("rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(
                f"{path.parent} has no .metadata: not a complete sharded checkpoint"
            ) from None
        except Exception as err:  # any failure of the unpickler on a forged or damaged file
            raise CheckpointError(f"{path} is not a readable checkpoint index: {err}") from None
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, _WeightsOnlyBytes(planner, self.path))


class _WeightsOnlyBytes:
    """A load planner whose ``load_bytes`` first unpickles the bytes with ``weights_only=True``: the planner's
    own unrestricted unpickling then only ever sees bytes that hold plain data."""

    def __init__(self, planner: Any, path: Any) -> None:
        self._planner, self._path = planner, path

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = value.getvalue()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{self._path}: the entry {read_item.dest_index.fqn} is refused unread: it holds more than tensors "
                f"and plain containers ({str(err).strip().splitlines()[-1][:200] if str(err).strip() else err!r})"
            ) from None
        self._planner.load_bytes(read_item, io.BytesIO(data))
