"""The random stream of training: one per rank, and saved in checkpoints so a resumed run continues exactly.

Everything a training step draws (diffusion times, noise, dropout, frame-prediction counts) comes from the
global torch stream. :class:`walt.lightning.WaltModule` applies these: it seeds each rank's stream when a fit
starts and saves and restores the stream with every checkpoint.
"""

from __future__ import annotations

import torch

__all__ = ["rng_states", "seed_per_rank", "set_rng_states"]


def seed_per_rank(rank: int) -> None:
    """Gives each data-parallel rank its own reproducible stream.

    ``seed_everything`` gives every rank the same seed, so the ranks would draw the same timesteps, noise and
    dropout for their different samples: correlated draws, fewer distinct (t, noise) pairs per step. A base
    drawn from the shared stream (the same on all ranks, and after a resume the same as the restored state)
    plus the rank gives each rank a stream of its own.
    """
    base = int(torch.randint(2**62, (1,)).item())
    torch.manual_seed(base + rank)


def rng_states() -> dict:
    """The CPU and CUDA streams' states, as tensors (checkpoints holding them load with weights_only=True)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    """Restores what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
