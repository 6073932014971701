"""Reading and writing walt's weight files safely: ``walt fit`` checkpoints and safetensors files.

A checkpoint is read with ``torch.load(weights_only=True)``, passed explicitly, so that neither PyTorch's default
nor ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` can turn it off: PyTorch's restricted unpickler accepts tensors and
plain containers only, so a malicious file posing as a checkpoint is refused before any of its code can run.

Every weight file walt writes carries :func:`weights_sha256` of its tensors, written with them: a checkpoint
under ``walt_integrity`` (written by the training modules), a safetensors file in its header's metadata. Reading
recomputes it and refuses a file whose weights changed since (a flipped bit, a bad disk or copy), and refuses
NaN or infinite weights whether or not a hash was recorded. Files from an older walt, without a hash, are read
with a warning.

A checkpoint written by ``walt fit`` (:class:`walt.lightning.AtomicCheckpointIO`) also carries
:func:`sha256_of_entries`: one hash per top-level entry other than the weights (optimizer state, random streams,
loop counters, model description, ...), which a resume depends on as much as on the weights. Reading refuses an
entry that changed or that was not written with the file; an entry removed on purpose (the optimizer state of a
checkpoint stripped for sharing) is no damage and passes.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from walt.atomic import write_atomic

__all__ = [
    "INTEGRITY_KEY",
    "CheckpointError",
    "check_checkpoint",
    "check_checkpoint_file",
    "check_weights",
    "is_sharded",
    "load_weights_only",
    "local_tensors",
    "module_weights",
    "nonfinite_weights",
    "read_checkpoint",
    "read_weights",
    "sha256_of_entries",
    "sign_checkpoint",
    "weights_sha256",
    "write_weights",
]

INTEGRITY_KEY = "walt_integrity"  # in a checkpoint: {"weights_sha256": ...} of its state_dict
SHA256_METADATA = "weights_sha256"  # in a safetensors header: the same hash of the file's tensors
ENTRIES_SHA256 = "entries_sha256"  # in a checkpoint's walt_integrity: {entry: hash} of its other entries

_PICKLE_START = b"\x80"  # the PROTO opcode that starts a pickle (torch's format before its zip archive)


class CheckpointError(ValueError):
    """A file is not the checkpoint or model file it claims to be."""


def check_checkpoint_file(path: str | Path) -> Path:
    """Refuses, naming the file, what cannot be a checkpoint before ``torch.load`` reads it: torch's own errors
    for these name neither the file nor the problem (a bare ``EOFError`` for an empty file; random bytes are
    called an unsafe pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"{path} is an empty file (0 bytes), not a checkpoint: was its copy or write cut short?"
        )
    with path.open("rb") as f:
        first = f.read(1)
    if first != _PICKLE_START and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a checkpoint: its {size} bytes are neither a PyTorch archive nor a pickle "
            "(a truncated copy, or another kind of file?)"
        )
    return path


def weights_sha256(state: Mapping[str, Any]) -> str:
    """sha256 over a state dict's tensors in name order: each one's name, dtype, shape and bytes (its values as
    laid out in memory, whatever device or storage it lives in). Entries that are not tensors are left out."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_weights(state: Mapping[str, Any], recorded: str | None, source: object) -> None:
    """Raises :class:`CheckpointError` naming ``source`` when the weights differ from the hash ``recorded`` with
    them, or hold NaN or infinite values; ``recorded`` None (a file from an older walt) skips the hash, with a
    warning."""
    if recorded is None:
        warnings.warn(
            f"{source} carries no weights hash (written by an older walt): read unverified", stacklevel=2
        )
    elif weights_sha256(state) != recorded:
        raise CheckpointError(
            f"{source} is corrupt: its weights do not match the hash written with them (the file changed after "
            "it was written: a bad disk, copy or download); use an earlier checkpoint or a fresh copy"
        )
    bad = nonfinite_weights(state)
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} of its weight tensors hold NaN or infinite values ({', '.join(bad[:3])}, ...): "
            "the training had diverged when it was written; use an earlier checkpoint"
        )


def nonfinite_weights(state: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [
        k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()
    ]


def local_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict as this process holds them: of a sharded one (FSDP's ``sharded`` state dict:
    ShardedTensor or DTensor values), this rank's part of each, flattened; plain tensors as they are. Entries that
    are not tensors are left out."""
    local = {}
    for name, value in state.items():
        if hasattr(value, "local_shards"):  # torch.distributed._shard.sharded_tensor.ShardedTensor
            parts = [shard.tensor.reshape(-1) for shard in value.local_shards()]
            local[name] = torch.cat(parts) if parts else torch.empty(0, dtype=value.dtype)
        elif hasattr(value, "to_local"):  # torch.distributed.tensor.DTensor
            local[name] = value.to_local()
        elif torch.is_tensor(value):
            local[name] = value
    return local


def is_sharded(state: Mapping[str, Any]) -> bool:
    """Whether a state dict holds sharded tensors (each process a part of them): see :func:`local_tensors`."""
    return any(hasattr(v, "local_shards") or hasattr(v, "to_local") for v in state.values())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict, read without running any pickled code, its weights checked (:func:`check_weights`)."""
    path = check_checkpoint_file(path)
    checkpoint = load_weights_only(path)
    check_checkpoint(checkpoint, path)
    return checkpoint


def load_weights_only(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` (``kwargs`` passed on; ``map_location`` "cpu" unless given) whose
    every failure is a :class:`CheckpointError` naming the file and the problem in one line.

    On a file that is not a checkpoint, the weights-only unpickler fails in many ways besides its own
    ``UnpicklingError`` (a malicious pickle's forbidden global): random bytes that start like a pickle end in an
    ``IndexError``, ``KeyError``, ``UnicodeDecodeError`` or ``EOFError`` from deep inside it. All of them mean the
    same, and none lets a pickled object run code."""
    kwargs.setdefault("map_location", "cpu")
    try:
        with warnings.catch_warnings():
            # Garbage that starts like a pickle claims some protocol; torch warns about it before failing.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, weights_only=True, **kwargs)
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err.strerror or err}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, LookupError,
            TypeError, struct.error, zipfile.BadZipFile, OverflowError, MemoryError) as err:  # fmt: skip
        raise CheckpointError(
            f"{path} is not a readable walt checkpoint: {_reason(err)} (a checkpoint holds only tensors and "
            "plain containers; anything else is refused unread)"
        ) from None


def check_checkpoint(checkpoint: object, source: object) -> None:
    """Raises :class:`CheckpointError` naming ``source`` unless ``checkpoint`` is a ``walt fit`` checkpoint's
    dict whose weights pass :func:`check_weights` against the hash it carries."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{source} is not a walt fit checkpoint (no state_dict)")
    integrity = checkpoint.get(INTEGRITY_KEY)
    recorded = integrity.get("weights_sha256") if isinstance(integrity, dict) else None
    check_weights(checkpoint["state_dict"], recorded, source)
    entries = integrity.get(ENTRIES_SHA256) if isinstance(integrity, dict) else None
    if isinstance(entries, dict):  # written by walt fit since the entries were hashed
        changed = [k for k, v in sha256_of_entries(checkpoint).items() if entries.get(k) != v]
        if changed:
            raise CheckpointError(
                f"{source} is corrupt: its {', '.join(map(str, changed))} do not match the hash written with "
                "them (the file changed after it was written: a bad disk, copy or download; resuming from it "
                "would not continue the run it saved); use an earlier checkpoint or a fresh copy"
            )


def write_weights(state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Writes ``state`` as a safetensors file (atomically: :func:`walt.atomic.write_atomic`) whose metadata holds
    ``metadata`` and the tensors' :func:`weights_sha256`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    header = {**metadata, SHA256_METADATA: weights_sha256(tensors)}
    return write_atomic(path, safetensors_bytes(tensors, metadata=header))


def sha256_of_entries(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """A sha256 for each top-level entry of a checkpoint but its weights (``state_dict``, which
    :func:`weights_sha256` covers) and ``walt_integrity``: every tensor's dtype, shape and bytes, and every other
    value's type and value, in the order stored (a pickle keeps the order of dicts). Written by
    :func:`sign_checkpoint`, checked by :func:`check_checkpoint`."""
    hashes = {}
    for key, value in checkpoint.items():
        if key not in ("state_dict", INTEGRITY_KEY):
            digest = hashlib.sha256()
            _update(digest, value)
            hashes[str(key)] = digest.hexdigest()
    return hashes


def sign_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Records :func:`sha256_of_entries` in ``checkpoint``'s ``walt_integrity`` (beside the weights' hash that the
    training module wrote there), just before the checkpoint is written."""
    integrity = checkpoint.get(INTEGRITY_KEY)
    integrity = dict(integrity) if isinstance(integrity, dict) else {}
    integrity[ENTRIES_SHA256] = sha256_of_entries(checkpoint)
    checkpoint[INTEGRITY_KEY] = integrity


# Values whose repr is their value, the same before writing and after reading: hashed by type and repr. Any other
# object (none occurs in walt's checkpoints; torch's weights-only reader would refuse most) by its type only, so
# that a repr holding a memory address can never make a sound file look damaged.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _update(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"mapping {len(value)}\0".encode())
        for key, item in value.items():
            _update(digest, key)
            _update(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"{type(value).__name__} {len(value)}\0".encode())
        for item in value:
            _update(digest, item)
    elif isinstance(value, set | frozenset):  # unordered: a set of strings iterates in a per-process order
        digest.update(f"set {len(value)}\0".encode())
        for item in sorted(value, key=repr):
            _update(digest, item)
    elif isinstance(value, _PLAIN):
        digest.update(f"{type(value).__name__} {value!r}\0".encode())
    else:
        digest.update(f"{type(value).__module__}.{type(value).__qualname__}\0".encode())


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against the hash in its metadata (:func:`check_weights`)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(SHA256_METADATA)
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a safetensors file ({err}); weights are read only from safetensors"
        ) from None
    check_weights(state, recorded, path)
    return state


def module_weights(
    state: dict[str, torch.Tensor], live_prefix: str, use_ema: bool = True, source: object = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], str]:
    """One module's weights from a training module's ``state_dict``: its EMA copy (``ema.module.*``) when there
    is one and ``use_ema``, else the live weights under ``live_prefix`` (e.g. ``"backbone."``), with the prefix
    removed. Returns the weights and which they are ("ema" or "live")."""
    has_ema = any(k.startswith("ema.module.") for k in state)
    if use_ema and not has_ema:
        warnings.warn(f"{source} has no EMA weights: the trained weights are used", stacklevel=2)
    prefix = "ema.module." if use_ema and has_ema else live_prefix
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError(f"{source} holds no '{prefix}*' weights: is it the right kind of checkpoint?")
    return weights, "ema" if prefix == "ema.module." else "live"


def _reason(err: Exception) -> str:
    """The line of a loading error that says what is wrong. For a refused pickle that is the unpickler's own
    line ("Trying to load unsupported GLOBAL posix.system ..."), not PyTorch's boilerplate around it, whose first
    line suggests loading the file with weights_only=False, which walt never does."""
    boilerplate = (
        "Weights only load failed",
        "Please file an issue",
        "Check the documentation",
        "Please use",
    )
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(err).splitlines()]
    meaningful = [line for line in lines if line and not line.startswith(boilerplate)]
    if isinstance(err, (pickle.UnpicklingError, RuntimeError, ValueError)) and meaningful:
        return meaningful[0][:300]
    detail = f": {meaningful[0]}" if meaningful else ""  # e.g. IndexError: pop from empty list
    return f"its bytes break the unpickler ({type(err).__name__}{detail})"[:300]
