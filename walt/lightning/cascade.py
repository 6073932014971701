"""The cascade: a base model's latents go through super-resolution stages, then are decoded in chunks.

A cascade YAML lists the stages in order, the first a base model and the rest super-resolution modules:

    stages:
      - {config: configs/base/ucf101_128.yaml, checkpoint: base.ckpt, steps: 50, guidance: 1.0}
      - {config: configs/sr/sr1_256x448.yaml, checkpoint: sr1.ckpt, steps: 50, aug_level: 0.1}
      - {config: configs/sr/sr2_512x896.yaml, checkpoint: sr2.ckpt, steps: 25, aug_level: 0.1}
    decode_chunk_size: 1   # latent frames per decoder chunk (the causal cache bounds memory)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from walt.lightning.super_resolution import SuperResolutionModule
from walt.tokenizer import CausalVAE

__all__ = ["Cascade", "CascadeStage", "decode_latents", "read_cascade", "upsample_stage"]


@dataclass
class CascadeStage:
    """One stage: the training config and checkpoint, and its sampler settings."""

    config: str
    checkpoint: str
    steps: int | None = None  # None = the module's sample_steps
    guidance: float = 1.0
    eta: float = 0.0
    aug_level: float | None = None  # super-resolution only; None = the module's sample_aug_level


@dataclass
class Cascade:
    stages: list[CascadeStage]
    decode_chunk_size: int | None = 1


def read_cascade(path: str | Path) -> Cascade:
    """Parses and checks a cascade YAML (see the module docstring); errors name the stage and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cascade file not found: {path}")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'stages' list (base first, then SR)")
    unknown = set(spec) - {"stages", "decode_chunk_size"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: stages, decode_chunk_size")
    fields = {f.name for f in dataclasses.fields(CascadeStage)}
    stages = []
    for i, entry in enumerate(spec["stages"]):
        if not isinstance(entry, dict) or not {"config", "checkpoint"} <= set(entry):
            raise ValueError(f"{path}: stage {i} needs 'config' and 'checkpoint'")
        if set(entry) - fields:
            raise ValueError(
                f"{path}: stage {i} has unknown keys {sorted(set(entry) - fields)}; allowed: {sorted(fields)}"
            )
        if i == 0 and entry.get("aug_level") is not None:
            raise ValueError(
                f"{path}: stage 0 is the base model; aug_level belongs to super-resolution stages"
            )
        stages.append(CascadeStage(**entry))
    chunk = spec.get("decode_chunk_size", 1)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(
            f"{path}: decode_chunk_size is a number of latent frames >= 1 (or null), got {chunk!r}"
        )
    return Cascade(stages, chunk)


@torch.no_grad()
def decode_latents(
    tokenizer: CausalVAE, z: Tensor, chunk_size: int | None, batch_size: int, device: torch.device | str
) -> Tensor:
    """Normalized latents (N, C, T, h, w) -> pixels (N, 3, T', H, W) in [-1, 1] on the CPU, a batch at a time."""
    videos = [
        tokenizer.decode(z[i : i + batch_size].to(device), chunk_size).clamp(-1, 1).cpu()
        for i in range(0, z.shape[0], batch_size)
    ]
    return torch.cat(videos)


@torch.no_grad()
def upsample_stage(
    module: SuperResolutionModule,
    lowres: Tensor,
    lowres_tokenizer: CausalVAE,
    stage: CascadeStage,
    labels: Tensor | None,
    generator: torch.Generator,
    batch_size: int,
    decode_chunk_size: int | None = 1,
) -> Tensor:
    """The stage's high-res latents (N, C, T', H', W') on the CPU for the previous stage's latents ``lowres``.

    The previous latents are decoded (with the previous stage's tokenizer, in causal chunks) to the low-res
    video the stage was trained to upsample.
    """
    if not isinstance(module, SuperResolutionModule):
        raise ValueError(
            f"a stage after the first must be a SuperResolutionModule, got {type(module).__name__}"
        )
    if labels is not None and module.sampling_backbone.num_classes is None:
        labels = None  # only class-conditional stages take the labels
    out = []
    for i in range(0, lowres.shape[0], batch_size):
        video = decode_latents(
            lowres_tokenizer, lowres[i : i + batch_size], decode_chunk_size, batch_size, module.device
        )
        z = module.upsample_latents(
            video,
            aug_level=stage.aug_level,
            generator=generator,
            labels=None if labels is None else labels[i : i + batch_size],
            guidance=stage.guidance,
            steps=stage.steps,
            eta=stage.eta,
        )
        out.append(z.cpu())
    return torch.cat(out)
