"""Super-resolution stages of the cascade: a WALT that generates a high-res latent given an upsampled low-res one.

The training step, EMA, self-conditioning, guidance and sampler are :class:`BaseDiffusionModule`'s; this module
adds only how the low-res input is made (from the batch's own videos, on the fly) and fed in, with
noise-conditioning augmentation (Imagen, Imagen Video; W.A.L.T section 5.3).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from walt.conditioning import (
    LowresConditioning,
    augment_lowres,
    downsample_video,
    lowres_latent,
    pixel_video,
    upsample_video,
)
from walt.data.transforms import to_uint8
from walt.diffusion import CosineSchedule, ZeroTerminalSNRLinearSchedule
from walt.lightning.diffusion import BaseDiffusionModule, Setting, adamw_for_diffusion
from walt.lightning.video_logging import add_video
from walt.pipeline import SuperResolution
from walt.tokenizer import CausalVAE
from walt.transformer import WALT

__all__ = ["SuperResolutionModule"]

LowresPath = Literal["pixel", "latent"]


class SuperResolutionModule(BaseDiffusionModule):
    """Spatial (x ``spatial_factor``) and/or temporal (frame rate x ``temporal_factor``) super-resolution.

    Batches hold high-res pixel videos (``video`` (B, 3, T, H, W)); each is downsampled to its low-res
    counterpart (area filter in space, every other frame in time), which is brought back to the high-res latent
    grid and channel-concatenated with the noisy latent (``Conditioning.lowres``).

    The low-res video is upsampled in pixel space and then encoded (``lowres_path="pixel"``, the default),
    rather than encoded at low resolution and upsampled in latent space (``"latent"``). Measured with the
    quickstart tokenizer on its own data (``benchmarks/sr_conditioning.py``, x2 in space): the pixel path's
    conditioning latent is within MSE 0.0023 of the high-res latent it stands for (normalized units) and decodes
    to 22.8 dB, the tokenizer's own 22.9 dB; the latent path is off by MSE 1.04 (the latents' whole variance) and
    decodes to 17.7 dB. Latent codes are not equivariant to resizing, so an upsampled low-res latent is not
    the latent of an upsampled video. The price is encoding at the high resolution (4x the pixels).

    Noise-conditioning augmentation: in training the clean low-res latent is diffused with the model's own
    schedule to a level drawn uniformly from [0, ``max_aug_level``]; the level goes to the AdaLN conditioning
    (``Conditioning.aug_level``), so at sampling time one level (``sample_aug_level``, or per call) is chosen,
    which makes the stage robust to the artifacts of the stage before it.

    Args (the rest as in :class:`BaseDiffusionModule`):
        backbone: a WALT built with ``lowres=True`` (patch size 2 in W.A.L.T's SR stages).
        tokenizer: the frozen autoencoder (required: low-res inputs are made from pixels).
        spatial_factor: high-res / low-res side ratio (1 for temporal-only super-resolution).
        temporal_factor: 2 = frame-rate x2 (17 frames from 9), 1 = none.
        lowres_path: "pixel" (upsample pixels, then encode) or "latent" (encode, then upsample the latent).
        max_aug_level: training augmentation levels are uniform in [0, max_aug_level].
        sample_aug_level: the default level at sampling time.

    The conditioner (``conditioner.lowres``) draws the training levels and augments the low-res latent.
    """

    max_aug_level = Setting("conditioner.lowres")

    def __init__(
        self,
        backbone: WALT,
        tokenizer: CausalVAE,
        tokenizer_weights: str | None = None,
        spatial_factor: int = 2,
        temporal_factor: int = 1,
        lowres_path: LowresPath = "pixel",
        max_aug_level: float = 0.5,
        sample_aug_level: float = 0.1,
        schedule: ZeroTerminalSNRLinearSchedule | CosineSchedule | None = None,
        optimizer: OptimizerCallable = adamw_for_diffusion,
        warmup_steps: int = 1000,
        ema_decay: float | None = 0.9999,
        label_dropout: float = 0.1,
        self_condition_prob: float = 0.9,
        sample_steps: int = 50,
        num_log_samples: int = 4,
        video_fps: float = 8.0,
        tokenizer_chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        if not backbone.lowres:
            raise ValueError("a super-resolution backbone must be built with lowres=True (WALT(lowres=True))")
        if tokenizer is None:
            raise ValueError("super-resolution makes its low-res inputs from pixels: give it the tokenizer")
        if spatial_factor < 1 or temporal_factor not in (1, 2) or spatial_factor * temporal_factor == 1:
            raise ValueError(
                f"spatial_factor >= 1 and temporal_factor in (1, 2), not both 1; got {spatial_factor}, "
                f"{temporal_factor}"
            )
        if lowres_path not in ("pixel", "latent"):
            raise ValueError(f"lowres_path must be 'pixel' or 'latent', got {lowres_path!r}")
        for name, level in (("max_aug_level", max_aug_level), ("sample_aug_level", sample_aug_level)):
            if not 0.0 <= level <= 1.0:
                raise ValueError(f"{name} is a diffusion time in [0, 1], got {level}")
        super().__init__(
            backbone,
            tokenizer,
            tokenizer_weights,
            schedule=schedule,
            optimizer=optimizer,
            warmup_steps=warmup_steps,
            ema_decay=ema_decay,
            label_dropout=label_dropout,
            self_condition_prob=self_condition_prob,
            sample_steps=sample_steps,
            num_log_samples=num_log_samples,
            video_fps=video_fps,
            tokenizer_chunk_size=tokenizer_chunk_size,
            compile=compile,
        )
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.lowres_path = lowres_path
        self.conditioner.lowres = LowresConditioning(self._clean_lowres, max_aug_level, self.schedule)
        self.sample_aug_level = sample_aug_level
        self._log_lowres: tuple[Tensor, Tensor | None] | None = None  # low-res videos and labels to upsample

    # ---- the low-res input ---------------------------------------------------------------------------------

    @torch.no_grad()
    def lowres_latent(self, lowres_video: Tensor) -> Tensor:
        """Clean conditioning latent on the high-res latent grid: (B, 3, T_lr, h, w) -> (B, C, T', H', W')."""
        return lowres_latent(
            self.tokenizer,
            lowres_video,
            self.spatial_factor,
            self.temporal_factor,
            self.lowres_path,
            self.tokenizer_chunk_size,
        )

    def augment(self, lowres: Tensor, level: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Diffuses the clean low-res latent (B, C, T, H, W) to per-sample times ``level`` (B,)."""
        return augment_lowres(lowres, level, self.schedule, generator)

    def _clean_lowres(self, video: Tensor) -> Tensor:
        """The clean conditioning latent of a high-res clip's low-res counterpart: (B, 3, T, H, W) ->
        (B, C, T', H', W')."""
        low = downsample_video(video, self.spatial_factor, self.temporal_factor)  # (B, 3, T_lr, h, w)
        return self.lowres_latent(low)  # (B, C, T', H', W')

    # ---- sampling ----------------------------------------------------------------------------------------

    def super_resolution_settings(self) -> SuperResolution:
        return SuperResolution(
            self.spatial_factor, self.temporal_factor, self.lowres_path, self.sample_aug_level
        )

    # ---- validation videos: low-res input (upsampled in pixels) above the model's output ------------------

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx == 0 and self.num_log_samples > 0:
            n = self.num_log_samples
            low = downsample_video(pixel_video(batch)[:n], self.spatial_factor, self.temporal_factor)
            self._log_lowres = (low, batch["label"][:n] if self.backbone.num_classes is not None else None)

    def on_validation_epoch_end(self) -> None:
        if self._log_lowres is None or not self._logs_samples_here():
            return
        low, labels = self._log_lowres
        videos = self.pipeline().generate(
            labels=labels, lowres=low, output="float", progress=False
        )  # (n, 3, T, H, W)
        inputs = upsample_video(low, self.spatial_factor, self.temporal_factor).clamp(
            -1, 1
        )  # (n, 3, T, H, W)
        grid = torch.cat([torch.cat(list(inputs), dim=-1), torch.cat(list(videos), dim=-1)], dim=-2)
        add_video(
            self.logger.experiment,
            "upsampled",
            to_uint8(grid).cpu().numpy(),
            self.global_step,
            self.video_fps,
        )
