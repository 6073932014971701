"""FSDP on CPU processes (gloo), for tests/test_distributed.py: torch's FSDP runs there when given
``device_id=cpu``, which Lightning's strategy leaves unset (it passes the GPU index, None on a CPU)."""

from __future__ import annotations

import torch
import torch.distributed.fsdp as torch_fsdp

from walt.lightning import WaltFSDPStrategy


class _OnCPU(torch_fsdp.FullyShardedDataParallel):
    def __init__(self, *args, device_id=None, **kwargs) -> None:
        super().__init__(*args, device_id=torch.device("cpu"), **kwargs)


class CPUFSDP(WaltFSDPStrategy):
    """WaltFSDPStrategy whose FSDP units are built on the CPU; everything else, checkpoints included, is
    WaltFSDPStrategy's."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # Lightning's _setup_model imports FullyShardedDataParallel from torch.distributed.fsdp when called.
        wrapper = torch_fsdp.FullyShardedDataParallel
        torch_fsdp.FullyShardedDataParallel = _OnCPU
        try:
            return super()._setup_model(model)
        finally:
            torch_fsdp.FullyShardedDataParallel = wrapper
