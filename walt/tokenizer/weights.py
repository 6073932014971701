"""Loading trained tokenizer weights into a :class:`CausalVAE`, for every part of walt that needs them (the
diffusion modules, ``walt encode``), without the command-line code of ``walt encode``."""

from __future__ import annotations

from pathlib import Path

from walt.checkpoint import module_weights, read_checkpoint, read_weights
from walt.tokenizer.vae import CausalVAE

__all__ = ["load_vae_weights"]


def load_vae_weights(vae: CausalVAE, checkpoint: str | Path, use_ema: bool = True) -> str:
    """Loads a TokenizerModule checkpoint (.ckpt) or a bare tokenizer state dict (.safetensors) into `vae`.

    Returns which weights were used ("ema", "vae" or "file").
    """
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".safetensors":
        if not checkpoint.is_file():
            raise FileNotFoundError(f"tokenizer weights not found: {checkpoint}")
        vae.load_state_dict(read_weights(checkpoint))
        return "file"
    state = read_checkpoint(checkpoint)["state_dict"]
    weights, which = module_weights(state, "vae.", use_ema, checkpoint)
    vae.load_state_dict(weights)
    return "ema" if which == "ema" else "vae"
