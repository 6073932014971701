"""LoRA adapters of a WALT backbone, through PEFT: which layers they adapt, putting them in, and their file.

An adapter adds a low-rank update ``(alpha / rank) * B A`` to chosen linear layers of the backbone's blocks, with
``B`` zero at first (so a fresh adapter leaves the model's output exactly as it was), and may add classes: rows of
the label table the base model never had. Everything else stays frozen.

Layers, by the block kinds of :class:`walt.transformer.WALT` (a block whose window spans one frame is *spatial*,
any other *spatiotemporal*): ``attn`` (self-attention's fused ``qkv`` and output ``proj``), ``cross_attn`` (the
same two in the text cross-attention of a text-to-video model) and ``mlp`` (``fc1``, ``fc2``).

The adapter file is one safetensors file: the low-rank matrices under PEFT's names (``blocks.3.attn.qkv.lora_A.weight``),
the added classes' embeddings (``label_embed.new_classes``, one row per class) and, in its header, the hash of its
tensors (:func:`walt.checkpoint.write_weights`) and a JSON description (:func:`describe_adapter`): rank, alpha,
layers, blocks, the target modules, the added class names, and the base model it was trained on, identified by
the sha256 of its backbone weights, so that loading it onto another model is refused.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

import walt
from walt.checkpoint import CheckpointError, read_weights, weights_sha256, write_weights
from walt.nn import LabelEmbedding
from walt.pipeline.parts import ModelFileError, describe_part
from walt.transformer import WALT

__all__ = [
    "ADAPTER_FORMAT",
    "BLOCKS",
    "LAYERS",
    "AdapterError",
    "LoRASpec",
    "adapter_tensors",
    "add_classes",
    "base_identity",
    "block_kind",
    "describe_adapter",
    "inject_lora",
    "read_adapter",
    "require_peft",
    "split_training_state",
    "target_modules",
    "write_adapter",
]

ADAPTER_FORMAT = "walt-adapter"
ADAPTER_FORMAT_VERSION = 1
DESCRIPTION_KEY = "walt_adapter"  # in the safetensors header: the JSON description
NEW_CLASSES_KEY = "label_embed.new_classes"  # the added classes' embeddings (k, D)
TOKENS_KEY = "label_embed.table.token_adapter.trainable_tokens_delta"  # PEFT's name for them in training
TRAINING_NAME = "default"  # the adapter's name inside a LoRA run

BLOCKS = ("all", "spatial", "spatiotemporal")
LAYERS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.qkv", "attn.proj"),
    "cross_attn": ("cross_attn.qkv", "cross_attn.proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
}
# What a description records of the base model's architecture; settings of how it runs are left out.
RUNTIME_ARGS = ("gradient_checkpointing", "fp32_residual")


class AdapterError(ModelFileError):
    """An adapter file is missing, damaged, not an adapter, or made for another model (one line, names the file)."""


def require_peft():
    """The ``peft`` package, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "LoRA fine-tuning and adapters need PEFT: pip install 'walt[lora]' (or pip install peft)"
        ) from err
    return peft


@dataclass(frozen=True)
class LoRASpec:
    """What an adapter adapts: ``rank`` and ``alpha`` (the update is scaled by alpha / rank; None = rank, a scale
    of 1), which ``blocks`` ("all", "spatial", "spatiotemporal"), which ``layers`` of each block ("attn",
    "cross_attn", "mlp"; a layer the model lacks, such as cross-attention in a class-conditional model, is
    skipped), LoRA ``dropout``, and ``new_classes``: names of classes the adapter adds to the label table."""

    rank: int = 8
    alpha: float | None = None
    blocks: str = "all"
    layers: tuple[str, ...] = ("attn", "cross_attn", "mlp")
    dropout: float = 0.0
    new_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (or null for alpha = rank), got {self.alpha!r}")
        if self.blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {', '.join(BLOCKS)}, got {self.blocks!r}")
        unknown = [name for name in self.layers if name not in LAYERS]
        if unknown or not self.layers:
            raise ValueError(
                f"layers must be a non-empty list of {', '.join(LAYERS)}, got {list(self.layers)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if len(set(self.new_classes)) != len(self.new_classes) or not all(self.new_classes):
            raise ValueError(f"new_classes must be distinct non-empty names, got {list(self.new_classes)}")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "new_classes", tuple(self.new_classes))

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def block_kind(backbone: WALT, index: int) -> str:
    """ "spatial" when block ``index`` attends within single frames (its window's time extent is 1), else
    "spatiotemporal"."""
    return "spatial" if backbone.windows[index % len(backbone.windows)][0] == 1 else "spatiotemporal"


def target_modules(backbone: WALT, blocks: str = "all", layers: Sequence[str] = tuple(LAYERS)) -> list[str]:
    """Names (relative to the backbone) of the linear layers an adapter of these ``blocks`` and ``layers`` wraps."""
    modules = dict(backbone.named_modules())
    names = [
        f"blocks.{i}.{suffix}"
        for i in range(len(backbone.blocks))
        if blocks == "all" or block_kind(backbone, i) == blocks
        for layer in layers
        for suffix in LAYERS[layer]
        if isinstance(modules.get(f"blocks.{i}.{suffix}"), nn.Linear)
    ]
    if not names:
        raise ValueError(
            f"no layer of the backbone matches blocks={blocks!r}, layers={list(layers)} (its windows: "
            f"{list(backbone.windows)}; cross_attn exists only in text-conditional models)"
        )
    return names


def base_identity(backbone: WALT, source: str | None = None) -> dict[str, Any]:
    """What an adapter records of the model it is trained on: the sha256 of its backbone weights
    (:func:`walt.checkpoint.weights_sha256`, which a pipeline recomputes to refuse another base), its class
    count and architecture (class path and constructor arguments), and where it was loaded from."""
    description = describe_part("backbone", backbone)
    for name in RUNTIME_ARGS:
        description["init_args"].pop(name, None)
    return {
        "weights_sha256": weights_sha256(backbone.state_dict()),
        "num_classes": backbone.num_classes,
        "backbone": description,
        "source": source,
    }


def describe_adapter(spec: LoRASpec, targets: Sequence[str], base: dict[str, Any]) -> dict[str, Any]:
    """The JSON description written with an adapter (see the module docstring)."""
    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "walt_version": walt.__version__,
        "rank": spec.rank,
        "alpha": spec.lora_alpha,
        "dropout": spec.dropout,
        "blocks": spec.blocks,
        "layers": list(spec.layers),
        "target_modules": list(targets),
        "new_classes": list(spec.new_classes),
        "base": base,
    }


def add_classes(backbone: WALT, count: int) -> list[int]:
    """Grows the backbone's label table by ``count`` classes and returns their indices (the first is the old
    class count). Every new row starts as the null label's embedding, so a new class first means "no class"; the
    old classes and the null label (kept in the last row) embed exactly as before. The recorded constructor
    arguments follow, so the grown model describes itself."""
    if backbone.label_embed is None:
        raise ValueError(
            "the backbone is not class-conditional (num_classes is None): it has no classes to add to"
        )
    old = backbone.label_embed
    n = old.num_classes
    weight = old.table.weight
    grown = LabelEmbedding(n + count, weight.shape[1]).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        grown.table.weight[:n] = weight[:n]
        grown.table.weight[n:] = weight[n]  # the null row, for the new classes and (last) as the null row
    grown.table.weight.requires_grad_(weight.requires_grad)
    backbone.label_embed = grown
    backbone.num_classes = n + count
    backbone.init_args["num_classes"] = n + count
    return list(range(n, n + count))


def inject_lora(
    backbone: WALT, description: dict[str, Any], name: str, train_classes: Sequence[int] = ()
) -> None:
    """Wraps the description's target modules of ``backbone`` in PEFT LoRA layers named ``name`` (B = 0: the
    output is unchanged). With ``train_classes`` (training) those rows of the label table become trainable too
    (PEFT's trainable tokens), and every other weight of the backbone is frozen."""
    peft = require_peft()
    from peft.functional import inject_adapter_in_model

    config = peft.LoraConfig(
        r=int(description["rank"]),
        lora_alpha=float(description["alpha"]),
        lora_dropout=float(description.get("dropout", 0.0)),
        target_modules=list(description["target_modules"]),
        trainable_token_indices={"label_embed.table": list(train_classes)} if train_classes else None,
        bias="none",
    )
    with warnings.catch_warnings():  # several adapters on one model are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, backbone, adapter_name=name)


def adapter_tensors(backbone: WALT, name: str, new_classes: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """The adapter ``name``'s tensors as the file holds them: PEFT's LoRA state (names without the adapter's)
    and the added classes' embeddings (rows ``new_classes`` of the label table, or their trained values)."""
    from peft.functional import get_peft_model_state_dict

    state = {k: v.detach() for k, v in get_peft_model_state_dict(backbone, adapter_name=name).items()}
    tokens = state.pop(TOKENS_KEY, None)
    if new_classes:
        state[NEW_CLASSES_KEY] = (
            tokens if tokens is not None else backbone.label_embed.table.weight[list(new_classes)]
        )
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_adapter(path: str | Path, tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> Path:
    """Writes the adapter file (atomically, its tensors' hash in the header; :func:`walt.checkpoint.write_weights`)."""
    return write_weights(
        tensors,
        path,
        {"format": ADAPTER_FORMAT, DESCRIPTION_KEY: json.dumps(description, sort_keys=True)},
    )


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter file's tensors and description, checked: its tensors against the hash written with them (and
    finite), its format and version, and its tensors against the description. Raises :class:`AdapterError`."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path} is not a safetensors file ({err}): not a walt adapter") from None
    if header.get("format") != ADAPTER_FORMAT or DESCRIPTION_KEY not in header:
        what = header.get("format") or "no walt format"
        raise AdapterError(
            f"{path} is not a walt adapter ({what}); adapters are written by LoRA fine-tuning runs"
        )
    try:
        description = json.loads(header[DESCRIPTION_KEY])
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: its adapter description is not valid JSON ({err})") from None
    if int(description.get("format_version", 0)) > ADAPTER_FORMAT_VERSION:
        raise AdapterError(
            f"{path} was written by a newer walt (adapter format {description['format_version']}); upgrade walt"
        )
    try:
        tensors = read_weights(path)
    except CheckpointError as err:
        raise AdapterError(str(err)) from None
    _check_tensors(tensors, description, path)
    return tensors, description


def _check_tensors(tensors: dict[str, torch.Tensor], description: dict[str, Any], path: Path) -> None:
    expected = {f"{m}.lora_{x}.weight" for m in description["target_modules"] for x in "AB"}
    if description["new_classes"]:
        expected.add(NEW_CLASSES_KEY)
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterError(
            f"{path}: its tensors do not match its description (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    rows = tensors.get(NEW_CLASSES_KEY)
    if rows is not None and (rows.ndim != 2 or rows.shape[0] != len(description["new_classes"])):
        raise AdapterError(
            f"{path}: {NEW_CLASSES_KEY} has shape {tuple(rows.shape)} for {len(description['new_classes'])} classes"
        )


def split_training_state(
    state: dict[str, torch.Tensor], description: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA run's backbone ``state_dict`` (PEFT's names: ``...qkv.base_layer.weight``,
    ``...qkv.lora_A.default.weight``, the label table under its trainable-tokens wrapper) -> the base model's
    weights as they were before training (the frozen ones, the label table without the added rows) and the
    adapter's tensors, named as in an adapter file."""
    base: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    lora = re.compile(rf"(.*)\.lora_([AB])\.{TRAINING_NAME}\.weight")
    table = "label_embed.table.token_adapter."
    for key, value in state.items():
        match = lora.fullmatch(key)
        if match:
            tensors[f"{match[1]}.lora_{match[2]}.weight"] = value
        elif key == f"{TOKENS_KEY}.{TRAINING_NAME}":
            tensors[NEW_CLASSES_KEY] = value
        elif key.startswith(table):
            base["label_embed.table." + key[len(table) :].removeprefix("base_layer.")] = value
        else:
            base[key.replace(".base_layer.", ".")] = value
    added = len(description["new_classes"])
    if added:  # the grown table: the base's classes, the added rows, the null row last
        grown = base["label_embed.table.weight"]
        base["label_embed.table.weight"] = torch.cat([grown[: -1 - added], grown[-1:]])
    return base, tensors
