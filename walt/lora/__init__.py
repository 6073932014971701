"""LoRA adapters of trained walt models, through PEFT (``pip install 'walt[lora]'``).

Training: :class:`walt.lightning.LoRAFineTune`, a callback of ``walt fit``, loads a trained model, wraps the
chosen layers in LoRA, freezes the rest and writes the adapter file. Inference: ``Pipeline.load_adapter(path,
scale=...)`` (several at once), ``merge_adapters()``, ``set_adapter_scale(...)``. This package holds what both
share: which layers (:func:`target_modules`), the adapter file (:func:`read_adapter`, :func:`write_adapter`) and
the adapters of a pipeline (:class:`AdapterSet`). PEFT is imported only when an adapter is made or loaded.
"""

from walt.lora.adapter import (
    BLOCKS,
    LAYERS,
    AdapterError,
    LoRASpec,
    adapter_tensors,
    add_classes,
    base_identity,
    block_kind,
    describe_adapter,
    inject_lora,
    read_adapter,
    require_peft,
    split_training_state,
    target_modules,
    write_adapter,
)
from walt.lora.adapters import AdapterSet

__all__ = [
    "BLOCKS",
    "LAYERS",
    "AdapterError",
    "AdapterSet",
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
