"""Adaptive LayerNorm modulation with a shared projection and per-block low-rank updates (AdaLN-LoRA)."""

from __future__ import annotations

from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN affine transform; `shift` and `scale` broadcast against `x`."""
    return x * (1 + scale) + shift


class AdaLNLoRA(nn.Module):
    """Per-block rank-r update of a modulation that one shared MLP computes for all blocks.

    DiT gives every block its own Linear(D, 6D) on the conditioning vector, which is 6D^2 parameters per
    block (1/3 of a block for D = 1152). W.A.L.T computes the modulation once with a shared MLP and adds a
    per-block low-rank correction: mod_l = shared(c) + up_l(down_l(silu(c))), 7rD parameters per block.
    `up` is zero-initialized by the owning model so that every block starts from the shared modulation.
    """

    def __init__(self, dim: int, rank: int, num_chunks: int = 6) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"AdaLN-LoRA rank must be >= 1, got {rank}")
        self.num_chunks = num_chunks
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, num_chunks * dim, bias=False)

    def forward(self, shared: Tensor, c_act: Tensor) -> tuple[Tensor, ...]:
        """shared (..., num_chunks * D) from the shared MLP; c_act (..., D) = silu(conditioning).

        Returns `num_chunks` tensors of shape (..., D).
        """
        mod = shared + self.up(self.down(c_act))  # (..., num_chunks * D)
        return mod.chunk(self.num_chunks, dim=-1)
