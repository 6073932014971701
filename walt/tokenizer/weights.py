"""Loading trained tokenizer weights into a :class:`CausalVAE`, for every part of walt that needs them (the
diffusion modules, ``walt encode``), without the command-line code of ``walt encode``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from walt.checkpoint import module_weights, read_checkpoint, read_weights
from walt.config import json_ready
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
    contents = read_checkpoint(checkpoint)
    _check_architecture(vae, contents, checkpoint)
    weights, which = module_weights(contents["state_dict"], "vae.", use_ema, checkpoint)
    vae.load_state_dict(weights)
    return "ema" if which == "ema" else "vae"


def _check_architecture(vae: CausalVAE, contents: dict[str, Any], path: Path) -> None:
    """Refuses weights trained with other constructor arguments. Some differ in no tensor shape (how the decoder
    resizes: ``upsampler`` resize, lanczos or kaiser, ``modulation_upsample``), so they would load and decode
    wrongly."""
    described = contents.get("walt_tokenizer")
    if not isinstance(described, dict) or not isinstance(described.get("init_args"), dict):
        return  # a checkpoint from before tokenizers described themselves: only the shapes are checked
    recorded, current = described["init_args"], json_ready(vae.init_args, "tokenizer.init_args")
    differ = sorted(k for k in recorded.keys() & current.keys() if recorded[k] != current[k])
    if differ:
        settings = ", ".join(f"{k}: {recorded[k]!r} (here {current[k]!r})" for k in differ)
        raise ValueError(
            f"{path} was trained with {settings}: build the autoencoder as it was trained, from the run's own "
            "config.yaml (Lightning saves it in the run's log folder) or with walt.pipeline.load_tokenizer"
        )
