"""FP8 matmuls for the backbone: torchao's float8 training, and its FP8 inference, on the blocks' attention and
MLP linears.

Only the four large linears of each block (qkv, the attention output, the MLP's two) are converted: they hold
almost all of the matmul FLOPs, while the embeddings, the AdaLN projections and the output layer are small and
precision-sensitive. torchao's ``Float8Linear`` keeps the weights and their state-dict keys as they are (high
precision; the casts happen per matmul), so checkpoints load into an unconverted model and back.

Whether it pays depends on the width: at W.A.L.T-XL's 1152 the separate casts cost more than the faster matmuls
save (benchmarks/RESULTS.md); measure on your model before training with it.

For sampling, :func:`quantize_float8_inference` stores those weights in FP8 once (one scale per output row, or
one per tensor) and casts only the activations per call, so the weight casts of training are gone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from walt.transformer.model import WALT

__all__ = [
    "FLOAT8_LAYERS",
    "FLOAT8_RECIPES",
    "check_float8_device",
    "check_float8_layers",
    "convert_to_float8",
    "float8_linear_names",
    "quantize_float8_inference",
]

FLOAT8_RECIPES = ("tensorwise", "rowwise")
# The blocks' linears FP8 can take, by their name inside a block. The MLP's two hold two thirds of a block's
# matmul FLOPs and the larger inner dimension, so they may gain where the attention's do not.
FLOAT8_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# Hopper (9.0), Ada (8.9) and later have FP8 tensor cores; torch's scaled matmul refuses anything older.
FLOAT8_MIN_CAPABILITY = (8, 9)
# The cast kernels and the FP8 matmul need both dimensions divisible by 16.
FLOAT8_ALIGNMENT = 16


def check_float8_layers(layers: Sequence[str]) -> tuple[str, ...]:
    """``layers`` as a tuple; an empty list or a name outside :data:`FLOAT8_LAYERS` is refused."""
    layers = tuple(layers)
    unknown = sorted(set(layers) - set(FLOAT8_LAYERS))
    if unknown or not layers:
        raise ValueError(f"float8 layers must be some of {', '.join(FLOAT8_LAYERS)}, got {list(layers)}")
    return layers


def float8_linear_names(model: WALT, layers: Sequence[str] = FLOAT8_LAYERS) -> list[str]:
    """The linears that FP8 converts: of each block's attention qkv and output and its MLP's two layers, those
    in ``layers`` whose dimensions are both multiples of 16."""
    layers = check_float8_layers(layers)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith("blocks."):
            continue
        leaf = name.split(".", 2)[2]
        aligned = module.in_features % FLOAT8_ALIGNMENT == 0 and module.out_features % FLOAT8_ALIGNMENT == 0
        if leaf in layers and aligned:
            names.append(name)
    return names


def convert_to_float8(model: WALT, recipe: str, layers: Sequence[str] = FLOAT8_LAYERS) -> WALT:
    """Swaps :func:`float8_linear_names` (of ``layers``) for torchao's ``Float8Linear`` with ``recipe``
    ("tensorwise": one scale per tensor; "rowwise": one per row, more accurate, slower casts), in place. Needs
    torchao."""
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"unknown float8 recipe {recipe!r}; choose one of {', '.join(FLOAT8_RECIPES)}")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise ImportError(f"float8 training needs torchao: pip install 'walt[fp8]' ({err})") from None
    chosen = set(float8_linear_names(model, layers))
    # The weight gradient's inner dimension is the token count, which images, small grids or odd batches do not
    # make a multiple of 16 as the FP8 matmul needs: pad it (a copy only where it is not).
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), pad_inner_dim=True)
    convert_to_float8_training(
        model,
        config=config,
        module_filter_fn=lambda module, name: name in chosen,
    )
    return model


def quantize_float8_inference(model: WALT, recipe: str, layers: Sequence[str] = FLOAT8_LAYERS) -> WALT:
    """Stores :func:`float8_linear_names`' weights in FP8 for inference, in place: "rowwise" keeps one scale per
    output row (and per token for the activations), "tensorwise" one per tensor. Each call then casts only its
    activations. The model can no longer be trained or saved as a plain checkpoint. Needs torchao and a GPU with
    FP8 tensor cores (:func:`check_float8_device`)."""
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"unknown float8 recipe {recipe!r}; choose one of {', '.join(FLOAT8_RECIPES)}")
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            PerTensor,
            quantize_,
        )
    except ImportError as err:
        raise ImportError(f"FP8 sampling needs torchao: pip install 'walt[fp8]' ({err})") from None
    chosen = set(float8_linear_names(model, layers))
    modules = dict(model.named_modules())
    for name in chosen:
        # FP8 sampling runs under bf16 autocast: torchao quantizes per-row scales only from bf16 weights, and
        # its scaled matmul takes the bias in the output's dtype
        modules[name].to(torch.bfloat16)
    granularity = PerRow() if recipe == "rowwise" else PerTensor()
    quantize_(
        model,
        # torchao's global Inductor settings would change every later compilation, the bf16 ones included
        Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False),
        filter_fn=lambda module, name: name in chosen,
    )
    for name, module in model.named_modules():
        if name in chosen:
            module.register_forward_pre_hook(_autocast_input)
    return model


def _autocast_input(module: nn.Module, args: tuple) -> tuple:
    """The quantized linear's input in the autocast dtype. An FP8 weight's matmul is dispatched before autocast
    sees it and returns the input's dtype: under autocast the modulated LayerNorm hands it float32, which would
    double the output's memory traffic, and FP8 matmuls with per-row scales may refuse a float32 output."""
    x = args[0]
    device = x.device.type
    # torch.amp.is_autocast_available is not traceable by torch.compile; these two devices are all FP8 runs on
    if device not in ("cuda", "cpu") or not torch.is_autocast_enabled(device):
        return args
    return (x.to(torch.get_autocast_dtype(device)), *args[1:])


def check_float8_device(
    device: torch.device, fix: str = "train without float8 (model.init_args.float8: null)"
) -> None:
    """Refuses a device without FP8 tensor cores, naming it and ``fix``, what to do instead."""
    if device.type != "cuda":
        raise ValueError(
            f"FP8 matmuls need an NVIDIA GPU with FP8 tensor cores (Ada, Hopper or newer); this run is on "
            f"{device.type}: {fix} here"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"FP8 matmuls need FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); {name} has "
            f"{capability[0]}.{capability[1]}: {fix} here"
        )
