"""Fine-tuning a trained model with ``walt fit``: every weight (:class:`FineTune`) or a LoRA adapter
(:class:`LoRAFineTune`).

Both are callbacks (``trainer.callbacks`` in the config), so the training modules stay as they are: the config's
model section describes the trained model's architecture (the config it was trained with, then the fine-tuning
config over it), and the callback, in ``setup`` (before the optimizer is made, and before a resumed run's
checkpoint is restored over it), loads the trained weights (a ``walt export`` folder or a ``walt fit``
checkpoint, its EMA weights by default) into the module's backbone and tokenizer, after checking that they
describe the same architecture, and adds the classes the run teaches. The optimizer then receives the parameters
left trainable (``configure_optimizers`` takes those of the backbone that require gradients).

A LoRA run freezes the backbone and trains only the adapter and the added classes' embeddings; at the end it
writes the adapter file (a few MB: :mod:`walt.lora`), whose description records what it applies to, the base
model's identity included. Both write ``finetune.json`` beside the checkpoints: trainable parameters, steps, time
per step, peak GPU memory.

EMA: a LoRA run keeps none (``ema_decay: null``; the callback refuses an EMA). The base is frozen, so an EMA copy
would be a second copy of the whole model to average weights that never move; the adapter's own updates are few
(hundreds of steps) and low-rank, and what is trained is what is shared: one adapter, no choice between a live
and an averaged one. Full fine-tuning keeps the module's EMA if it has one, restarted from the loaded weights.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from walt.atomic import write_atomic
from walt.distributed import is_fsdp
from walt.lora import (
    LoRASpec,
    adapter_tensors,
    add_classes,
    base_identity,
    describe_adapter,
    inject_lora,
    require_peft,
    target_modules,
    write_adapter,
)
from walt.lora.adapter import RUNTIME_ARGS, TRAINING_NAME
from walt.pipeline.parts import ModelFileError, describe_part

__all__ = ["FineTune", "LoRAFineTune"]

RECORD_FILE = "finetune.json"


class FineTune(Callback):
    """Full fine-tuning of a trained model (see the module docstring).

    Args:
        init_from: the trained model: a ``walt export`` folder or a ``walt fit`` checkpoint.
        new_classes: names of classes to add (a class-conditional model): they get the next label indices,
            each starting as the null label's embedding, and the data labels them so.
        weights: a checkpoint's ``"ema"`` weights (default) or its ``"live"`` ones.
    """

    method = "full"

    def __init__(
        self,
        init_from: str,
        new_classes: Sequence[str] | None = None,
        weights: Literal["ema", "live"] = "ema",
    ) -> None:
        super().__init__()
        if weights not in ("ema", "live"):
            raise ValueError(f"weights must be 'ema' or 'live', got {weights!r}")
        self.init_from = str(init_from)
        self.new_classes = tuple(new_classes or ())
        if len(set(self.new_classes)) != len(self.new_classes) or not all(self.new_classes):
            raise ValueError(f"new_classes must be distinct non-empty names, got {list(self.new_classes)}")
        self.weights = weights
        self.base: dict[str, Any] | None = None  # the trained model's identity (walt.lora.base_identity)
        self.class_indices: list[int] = []
        self._prepared = False
        self._record: dict[str, Any] = {}
        self._batch_ends: list[float] = []

    # ---- before training: the trained weights, the added classes ---------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._prepared:  # fit, then test in one process: once
            return
        trained = self._load_trained(pl_module)
        self.base = base_identity(trained.backbone, self.init_from)
        self.prepare(trainer, pl_module, trained.backbone.state_dict())
        if trained.class_names:
            pl_module.set_class_names([*trained.class_names, *self.new_classes])
        self._prepared = True

    def prepare(
        self, trainer: L.Trainer, pl_module: L.LightningModule, state: dict[str, torch.Tensor]
    ) -> None:
        """Every backbone weight trains; the EMA (if any) restarts from the trained weights."""
        ema = getattr(pl_module, "ema", None)
        for model in (pl_module.backbone, *([ema.module] if ema is not None else [])):
            model.load_state_dict(state)
            self.class_indices = add_classes(model, len(self.new_classes)) if self.new_classes else []

    def _load_trained(self, pl_module: L.LightningModule):
        """The trained model as a pipeline, its parts checked against the module's and copied into them."""
        from walt.pipeline import load_model

        if not hasattr(pl_module, "backbone"):
            raise TypeError(
                f"{type(self).__name__} fine-tunes diffusion modules (with a backbone), not {type(pl_module).__name__}"
            )
        try:
            trained = load_model(self.init_from, weights=self.weights)
        except FileNotFoundError as err:
            raise ModelFileError(f"{type(self).__name__}.init_from: {err}") from None
        if trained.adapters:
            raise ModelFileError(
                f"{self.init_from} is a LoRA run's checkpoint: fine-tune its base model instead"
            )
        parts = [
            ("backbone", pl_module.backbone, trained.backbone),
            ("schedule", pl_module.schedule, trained.schedule),
        ]
        if getattr(pl_module, "tokenizer", None) is not None:
            parts.append(("tokenizer", pl_module.tokenizer, trained.tokenizer))
        for role, mine, theirs in parts:
            problems = _differences(describe_part(role, mine), describe_part(role, theirs))
            if problems:
                raise ModelFileError(
                    f"{self.init_from} does not fit the config's {role}: {'; '.join(problems)}. Make the config's "
                    f"model section describe the trained model (its model.json, or its checkpoint's walt_model)"
                )
        if getattr(pl_module, "tokenizer", None) is not None:
            # the latent space the base model was trained in, its normalization included
            pl_module.tokenizer.load_state_dict(trained.tokenizer.state_dict())
        return trained

    # ---- during and after training: the record -----------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        adapter = (".lora_", "trainable_tokens")
        backbone = [p for n, p in pl_module.backbone.named_parameters() if not any(a in n for a in adapter)]
        self._record = {
            "method": self.method,
            "init_from": self.init_from,
            "base_weights_sha256": self.base["weights_sha256"],
            "new_classes": list(self.new_classes),
            "trainable_parameters": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "backbone_parameters": sum(p.numel() for p in backbone),
            "first_step": int(trainer.global_step),
            "device": str(device),
            "peak_process_memory_before_training_bytes": peak_process_memory(),
            "start": time.perf_counter(),
        }
        self._batch_ends = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._batch_ends.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record = dict(self._record)
        start = record.pop("start")
        ends = self._batch_ends[min(5, len(self._batch_ends) // 2) :]  # past compilation and warm-up
        steady = [b - a for a, b in itertools.pairwise(ends)]
        record.update(
            steps=int(trainer.global_step) - record.pop("first_step"),
            train_seconds=time.perf_counter() - start,
            seconds_per_step=statistics.median(steady) if steady else None,
            peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            peak_process_memory_bytes=peak_process_memory(),
        )
        record.update(self.finish(trainer, pl_module, record))
        self._write_record(trainer, record)

    def finish(
        self, trainer: L.Trainer, pl_module: L.LightningModule, record: dict[str, Any]
    ) -> dict[str, Any]:
        """What a subclass writes at the end of training; returns entries for the record."""
        return {}

    @rank_zero_only
    def _write_record(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        write_atomic(Path(trainer.default_root_dir) / RECORD_FILE, json.dumps(record, indent=2) + "\n")


class LoRAFineTune(FineTune):
    """LoRA fine-tuning of a trained model (see the module docstring): the backbone is frozen, LoRA layers of
    ``rank`` wrap the chosen linear layers, and only they (and the added classes' embeddings) train.

    Args:
        init_from, new_classes, weights: as :class:`FineTune`.
        rank: the rank of each update.
        alpha: the update is scaled by alpha / rank; None = rank (a scale of 1).
        blocks: "all", "spatial" (blocks that attend within frames) or "spatiotemporal".
        layers: which layers of each block: "attn" (qkv, proj), "cross_attn" (the same in a text model's
            cross-attention), "mlp" (fc1, fc2); layers the model lacks are skipped.
        dropout: LoRA dropout on the adapted layers' inputs.
        adapter: the adapter file written when training ends (default ``<default_root_dir>/adapter.safetensors``).
    """

    method = "lora"

    def __init__(
        self,
        init_from: str,
        rank: int = 8,
        alpha: float | None = None,
        blocks: Literal["all", "spatial", "spatiotemporal"] = "all",
        layers: Sequence[Literal["attn", "cross_attn", "mlp"]] = ("attn", "cross_attn", "mlp"),
        dropout: float = 0.0,
        new_classes: Sequence[str] | None = None,
        weights: Literal["ema", "live"] = "ema",
        adapter: str | None = None,
    ) -> None:
        super().__init__(init_from, new_classes, weights)
        self.spec = LoRASpec(rank, alpha, blocks, tuple(layers), dropout, self.new_classes)
        self.adapter = adapter
        self.description: dict[str, Any] | None = None
        require_peft()

    def prepare(
        self, trainer: L.Trainer, pl_module: L.LightningModule, state: dict[str, torch.Tensor]
    ) -> None:
        if getattr(pl_module, "ema", None) is not None:
            raise ValueError(
                "LoRAFineTune: a LoRA run keeps no EMA of the model: set model.init_args.ema_decay: null (the base "
                "is frozen, and the adapter that trains is the one written)"
            )
        if is_fsdp(trainer.strategy):
            raise ValueError("LoRAFineTune: LoRA runs train on one device or with DDP, not FSDP")
        backbone = pl_module.backbone
        backbone.load_state_dict(state)
        targets = target_modules(backbone, self.spec.blocks, self.spec.layers)
        self.description = describe_adapter(self.spec, targets, self.base)
        self.class_indices = add_classes(backbone, len(self.new_classes)) if self.new_classes else []
        inject_lora(backbone, self.description, TRAINING_NAME, self.class_indices)  # freezes the rest

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # What the checkpoint's backbone is: Pipeline.from_pretrained(checkpoint) loads the base with this adapter.
        checkpoint["walt_lora"] = self.description

    def finish(
        self, trainer: L.Trainer, pl_module: L.LightningModule, record: dict[str, Any]
    ) -> dict[str, Any]:
        path = Path(self.adapter) if self.adapter else Path(trainer.default_root_dir) / "adapter.safetensors"
        description = {
            **self.description,
            "training": {k: record[k] for k in ("steps", "trainable_parameters")},
        }
        if trainer.is_global_zero:
            tensors = adapter_tensors(pl_module.backbone, TRAINING_NAME, self.class_indices)
            write_adapter(path, tensors, description)
        return {
            "adapter": str(path),
            "adapter_bytes": path.stat().st_size if path.is_file() else None,
            "rank": self.spec.rank,
            "blocks": self.spec.blocks,
            "target_modules": len(self.description["target_modules"]),
        }


def _differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """How two part descriptions differ: the class, or each constructor argument that is not a runtime setting."""
    if mine["class_path"] != theirs["class_path"]:
        return [f"a {mine['class_path']} in the config, a {theirs['class_path']} in the model"]
    a, b = mine["init_args"], theirs["init_args"]
    keys = sorted((set(a) | set(b)) - set(RUNTIME_ARGS))
    return [
        f"{k}={a.get(k)!r} in the config, {b.get(k)!r} in the model" for k in keys if a.get(k) != b.get(k)
    ]


def peak_process_memory() -> int | None:
    """The process's peak resident memory so far, in bytes (None where the platform does not report it). On a
    CPU run this is the training's memory: its growth during training is what the optimizer states and
    activations took."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes
