"""Reading ``walt fit`` checkpoints safely, and picking one module's weights out of them.

A checkpoint is read with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler accepts tensors and
plain containers only, so a malicious file posing as a checkpoint is refused before any of its code can run.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "check_checkpoint_file", "module_weights", "read_checkpoint"]

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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict, read without running any pickled code."""
    path = check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{path} is not a readable walt checkpoint: {str(err).splitlines()[0][:300]} (a checkpoint holds "
            "only tensors and plain containers; anything else is refused unread)"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a walt fit checkpoint (no state_dict)")
    return checkpoint


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
