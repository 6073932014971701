"""The LoRA adapters loaded onto one pipeline's backbone: loading (base checked), scales, merging.

:class:`AdapterSet` is what :class:`walt.pipeline.Pipeline` delegates its adapter methods to. Several adapters
can be active at once: their low-rank updates add up, each times its own scale. The classes an adapter adds
become plain rows of the label table (appended after the classes already there, whatever index they had in
training: the update does not depend on it), named by the adapter.

Merging adds every active update, at its scale, into the frozen weights (``W + s (alpha / r) B A``): sampling then
costs what the base model costs. ``unmerge`` subtracts them again, which restores the weights up to float
rounding (about 1e-7 of their size), not bit for bit. ``merge_and_unload`` makes it permanent: the backbone is a
plain :class:`walt.transformer.WALT` again, which a model folder can hold.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from walt.checkpoint import weights_sha256
from walt.lora.adapter import (
    NEW_CLASSES_KEY,
    AdapterError,
    adapter_tensors,
    add_classes,
    inject_lora,
    read_adapter,
    write_adapter,
)
from walt.transformer import WALT

__all__ = ["AdapterSet"]


class AdapterSet:
    """Adapters on ``backbone`` (see the module docstring). ``class_names`` is the pipeline's list, extended in
    place with the classes adapters add."""

    def __init__(self, backbone: WALT, class_names: list[str]) -> None:
        self.backbone = backbone
        self.class_names = class_names
        # the backbone's hash before any adapter: what adapters are checked against
        self.base_sha256: str | None = None
        # name -> scale, source, description, added class indices
        self.entries: dict[str, dict[str, Any]] = {}
        self.merged = False

    # ---- loading ---------------------------------------------------------------------------------------------

    def load(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Loads the adapter file ``path`` at ``scale`` under ``name`` (default: the file's stem); returns the
        name. Refuses (:class:`walt.lora.AdapterError`, one line) a missing or damaged file, one trained on
        another base model, a name in use, and loading while merged."""
        tensors, description = read_adapter(path)
        return self.add(tensors, description, scale, name or _name_from(Path(path)), str(path))

    def add(
        self,
        tensors: dict[str, torch.Tensor],
        description: dict[str, Any],
        scale: float = 1.0,
        name: str = "adapter",
        source: str = "the adapter",
    ) -> str:
        """Puts an adapter given by its tensors and description (as :func:`walt.lora.read_adapter` returns
        them) on the backbone under ``name``; ``source`` names it in errors (see :meth:`load`)."""
        _check_scale(scale)
        _check_name(name)
        if self.merged:
            raise AdapterError(
                f"cannot load {source} while adapters are merged: call unmerge_adapters() first"
            )
        if name in self.entries:
            raise AdapterError(f"an adapter named {name!r} is loaded already: give another name")
        self._check_base(description, source)
        self._check_shapes(tensors, description, source)  # before anything changes
        added = self._add_classes(tensors.get(NEW_CLASSES_KEY), description["new_classes"], source)
        inject_lora(self.backbone, description, name)
        self._load_lora(tensors, name, source)
        self.entries[name] = {
            "scale": float(scale),
            "source": source,
            "description": description,
            "classes": added,
        }
        self.set_scale(name, scale)
        self._activate()
        return name

    def _check_base(self, description: dict[str, Any], source: str) -> None:
        if self.base_sha256 is None:  # the first adapter: the backbone is still the base model
            self.base_sha256 = weights_sha256(self.backbone.state_dict())
        recorded = description["base"]["weights_sha256"]
        if recorded != self.base_sha256:
            trained_on = description["base"].get("source") or "another model"
            raise AdapterError(
                f"{source} was trained on another base model ({trained_on}, backbone weights sha256 "
                f"{recorded[:12]}...) than this one ({self.base_sha256[:12]}...): load it onto the model it was "
                "trained on"
            )

    def _check_shapes(
        self, tensors: dict[str, torch.Tensor], description: dict[str, Any], source: str
    ) -> None:
        modules = dict(self.backbone.named_modules())
        rank = int(description["rank"])
        for target in description["target_modules"]:
            layer = modules.get(target)
            layer = getattr(layer, "base_layer", layer)  # already wrapped by another adapter
            if not isinstance(layer, torch.nn.Linear):
                raise AdapterError(
                    f"{source} adapts {target}, which this model does not have as a linear layer"
                )
            for key, shape in ((f"{target}.lora_A.weight", (rank, layer.in_features)),
                               (f"{target}.lora_B.weight", (layer.out_features, rank))):  # fmt: skip
                if tuple(tensors[key].shape) != shape:
                    raise AdapterError(
                        f"{source}: {key} has shape {tuple(tensors[key].shape)}, the model needs {shape}"
                    )
        rows = tensors.get(NEW_CLASSES_KEY)
        if rows is not None:
            if self.backbone.label_embed is None:
                raise AdapterError(f"{source} adds classes, but the model is not class-conditional")
            if rows.shape[1] != self.backbone.label_embed.table.weight.shape[1]:
                raise AdapterError(
                    f"{source}: its class embeddings are {rows.shape[1]}-d, the model's are not"
                )
            taken = [n for n in description["new_classes"] if n in self.class_names]
            if taken:
                raise AdapterError(f"{source} adds classes that exist already: {taken}")

    def _add_classes(self, rows: torch.Tensor | None, names: list[str], source: str) -> list[int]:
        if not names:
            return []
        named = len(self.class_names) == self.backbone.num_classes
        indices = add_classes(self.backbone, len(names))
        with torch.no_grad():
            table = self.backbone.label_embed.table.weight
            table[indices] = rows.to(table)
        if named:
            self.class_names.extend(names)
        return indices

    def _load_lora(self, tensors: dict[str, torch.Tensor], name: str, source: str) -> None:
        from peft.functional import set_peft_model_state_dict

        state = {k: v for k, v in tensors.items() if k != NEW_CLASSES_KEY}
        result = set_peft_model_state_dict(self.backbone, state, adapter_name=name)
        if result.unexpected_keys:
            raise AdapterError(f"{source}: the model has no place for {result.unexpected_keys[:3]}")
        self.backbone.requires_grad_(False)

    # ---- scales, merging -------------------------------------------------------------------------------------

    def set_scale(self, name: str, scale: float) -> None:
        """Multiplies adapter ``name``'s update by ``scale`` (0 turns it off; the classes it adds stay)."""
        from peft.tuners.lora import LoraLayer

        _check_scale(scale)
        if name not in self.entries:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self.entries) or 'none'}")
        if self.merged:
            raise AdapterError(
                "cannot change a scale while adapters are merged: call unmerge_adapters() first"
            )
        for module in self.backbone.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(name, scale)
        self.entries[name]["scale"] = float(scale)

    def merge(self) -> None:
        """Adds every adapter's update, at its scale, into the weights (sampling at the base model's cost)."""
        if self.merged or not self.entries:
            return
        for layer in self._layers():
            layer.merge(adapter_names=[n for n in self.entries if n in layer.lora_A])
        self.merged = True

    def unmerge(self) -> None:
        """Subtracts the merged updates again (the weights come back up to float rounding)."""
        if not self.merged:
            return
        for layer in self._layers():
            if layer.merged:
                layer.unmerge()
        self.merged = False

    def merge_and_unload(self) -> None:
        """Merges every adapter for good and removes the LoRA layers: the backbone becomes a plain WALT (with
        the added classes), which a model folder can hold; no adapter is loaded afterwards."""
        modules = dict(self.backbone.named_modules())
        wrapped = {id(m) for m in self._layers()}
        for full_name, layer in [(n, m) for n, m in modules.items() if id(m) in wrapped]:
            if not layer.merged:
                layer.merge(adapter_names=[n for n in self.entries if n in layer.lora_A])
            parent_name, _, child = full_name.rpartition(".")
            setattr(modules[parent_name] if parent_name else self.backbone, child, layer.get_base_layer())
        if hasattr(self.backbone, "peft_config"):
            del self.backbone.peft_config
        self.entries.clear()
        self.merged = False
        self.base_sha256 = None  # the merged model is a new base

    def save(self, name: str, path: str | Path) -> Path:
        """Writes adapter ``name`` as an adapter file (what it was loaded from, or trained into)."""
        if name not in self.entries:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self.entries) or 'none'}")
        if self.merged:
            raise AdapterError(
                "cannot save an adapter while adapters are merged: call unmerge_adapters() first"
            )
        entry = self.entries[name]
        return write_adapter(
            path, adapter_tensors(self.backbone, name, entry["classes"]), entry["description"]
        )

    def summary(self) -> dict[str, dict[str, Any]]:
        """name -> {scale, source, rank, classes}: what is loaded, for records such as samples.json."""
        return {
            name: {
                "scale": e["scale"],
                "source": e["source"],
                "rank": e["description"]["rank"],
                "new_classes": e["description"]["new_classes"],
            }
            for name, e in self.entries.items()
        }

    def _layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.backbone.modules() if isinstance(m, LoraLayer)]

    def _activate(self) -> None:
        """Every loaded adapter active (PEFT activates only the newest one it injects), none trainable."""
        from peft.functional import set_adapter

        set_adapter(self.backbone, list(self.entries), inference_mode=True)


def _check_scale(scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise AdapterError(f"an adapter's scale must be a finite number, got {scale!r}")


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise AdapterError(f"adapter names are identifiers (letters, digits, _), got {name!r}")


def _name_from(path: Path) -> str:
    """An adapter name from a file name: its stem, other characters as _ ("horse-r8.safetensors" -> horse_r8)."""
    name = re.sub(r"\W", "_", path.stem.split(".")[0]) or "adapter"
    return name if not name[0].isdigit() else f"a_{name}"
