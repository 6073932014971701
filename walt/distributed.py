"""What training and sampling must know about FSDP, in one place: how a model is cut into FSDP units, and what
FSDP rules out.

:class:`walt.lightning.WaltFSDPStrategy` wraps with :data:`FSDP_UNITS` and checkpoints the activations of
:data:`FSDP_CHECKPOINTED` unless its config names other policies (configs/distributed/fsdp.yaml names none).
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy, Strategy

from walt.transformer import WALT
from walt.transformer.block import WindowBlock

__all__ = ["FSDP_CHECKPOINTED", "FSDP_UNITS", "check_compile", "is_fsdp"]

# Each transformer block is one FSDP unit (gathered just before its forward, freed after), and each WALT is a
# unit of its own. The latter is what keeps the EMA correct: a diffusion module holds two WALTs, the trained
# backbone and its EMA copy (ema.module), and EMA.update pairs their named_parameters. Wrapped by the same
# policy, the two have identical FSDP layouts, so every rank holds matching shards of the live and the averaged
# weights and the update is shard against shard, with no gathering. (Wrapping only the blocks would put both
# WALTs' embeddings and output layers into the one root unit, where their shards would not line up.) The EMA
# thus costs 1/N of its size per GPU, like the weights.
FSDP_UNITS: frozenset[type] = frozenset({WindowBlock, WALT})
# Each block's activations are recomputed in the backward pass instead of kept.
FSDP_CHECKPOINTED: frozenset[type] = frozenset({WindowBlock})


def is_fsdp(strategy: Strategy | None) -> bool:
    """Whether parameters are sharded: a sampling forward is then a collective every rank must enter, and a part
    outside the training forward (the tokenizer) holds only its shard."""
    return isinstance(strategy, FSDPStrategy)


def check_compile(strategy: Strategy | None) -> None:
    """Refuses ``compile: true`` (the caller compiles) under FSDP before the first step.

    Measured on 2 H200s (benchmarks/RESULTS.md): dynamo cannot trace FSDP's unshard hooks inside the
    whole-model graph (``Unsupported method call ... data_ptr``), and the run would crash at its first step.
    """
    if is_fsdp(strategy):
        raise ValueError(
            "compile: true does not work under FSDP (the whole-model graph cannot hold FSDP's per-block "
            "gathering); set model.init_args.compile to false with configs/distributed/fsdp.yaml"
        )
