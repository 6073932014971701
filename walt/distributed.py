"""What training and sampling must know about FSDP: what it rules out, in one place.

The wrap policy itself is set in the strategy's config (configs/distributed/fsdp.yaml): each WindowBlock and
each WALT is one FSDP unit.
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy, Strategy

__all__ = ["check_compile", "is_fsdp"]


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
