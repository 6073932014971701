"""A model's parts as JSON: ``{"class_path": ..., "init_args": {...}}`` for each, rebuilt from an allow-list.

The description names a class, so loading one must not import whatever it names: only the classes below can
be built, which keeps a model folder data, never code.
"""

from __future__ import annotations

from typing import Any

from walt.checkpoint import CheckpointError
from walt.conditioning import MiniLMTextEncoder, T5TextEncoder, TextEncoder, TransformersTextEncoder
from walt.config import json_ready
from walt.diffusion import CosineSchedule, ZeroTerminalSNRLinearSchedule
from walt.tokenizer import CausalVAE
from walt.transformer import WALT

__all__ = ["PART_CLASSES", "ModelFileError", "build_part", "describe_part"]

# role -> public class path -> class
PART_CLASSES: dict[str, dict[str, type]] = {
    "backbone": {"walt.transformer.WALT": WALT},
    "tokenizer": {"walt.tokenizer.CausalVAE": CausalVAE},
    "schedule": {
        "walt.diffusion.ZeroTerminalSNRLinearSchedule": ZeroTerminalSNRLinearSchedule,
        "walt.diffusion.CosineSchedule": CosineSchedule,
    },
    "text_encoder": {
        "walt.conditioning.MiniLMTextEncoder": MiniLMTextEncoder,
        "walt.conditioning.T5TextEncoder": T5TextEncoder,
        "walt.conditioning.TransformersTextEncoder": TransformersTextEncoder,
    },
}

# Arguments that describe where a part ran, not what it computes: left out of a shareable description.
LOCAL_ARGS = {"text_encoder": ("cache_dir", "batch_size", "memory_items")}


class ModelFileError(CheckpointError):
    """A model file or folder is not what it claims to be (wrong format, missing part, unknown class)."""


def describe_part(role: str, part: Any) -> dict[str, Any]:
    """The JSON description of ``part`` in ``role`` (its class and recorded constructor arguments)."""
    paths = {cls: path for path, cls in PART_CLASSES[role].items()}
    while type(part) not in paths and hasattr(part, "module"):
        part = part.module  # a wrapper (FSDP unit) around the part: describe what it wraps
    if type(part) not in paths:
        raise TypeError(
            f"a {type(part).__name__} cannot be saved as the {role}; model files hold {', '.join(paths.values())}"
        )
    init_args = {k: v for k, v in part.init_args.items() if k not in LOCAL_ARGS.get(role, ())}
    description = {"class_path": paths[type(part)], "init_args": json_ready(init_args, f"{role}.init_args")}
    if isinstance(part, TextEncoder):
        description["identity"] = part.identity  # which encoder, exactly: checked against the one loaded
    return description


def build_part(role: str, description: dict[str, Any], **overrides: Any) -> Any:
    """Builds the part a description names (``overrides`` replace recorded arguments, e.g. a local T5 path)."""
    if not isinstance(description, dict) or "class_path" not in description:
        raise ModelFileError(f"the {role} description has no class_path: {description!r}")
    cls = PART_CLASSES[role].get(description["class_path"])
    if cls is None:
        allowed = ", ".join(PART_CLASSES[role])
        raise ModelFileError(
            f"the {role} is a {description['class_path']!r}, which walt does not build from a model file "
            f"(allowed: {allowed})"
        )
    return cls(**{**description.get("init_args", {}), **overrides})
