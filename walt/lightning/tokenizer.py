"""Lightning training of the causal tokenizer: autoencoder and discriminator, optimized alternately."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.optim import Optimizer

from walt.checks import check_int, check_positive
from walt.data.transforms import to_uint8
from walt.lightning.ema import EMA
from walt.lightning.module import OptimizerFactory, WaltModule
from walt.lightning.video_logging import add_video
from walt.metrics.pixel import SSIM_WINDOW, chroma_error, pooled_grid_ratio, psnr, ssim
from walt.tokenizer.losses import TokenizerLoss, frames_as_images
from walt.tokenizer.vae import CausalVAE


def adam_for_gan(params: Iterable) -> Optimizer:
    """Default optimizer of both networks: Adam lr 1e-4, betas (0.5, 0.9) as in VQGAN."""
    return torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9))


class TokenizerModule(WaltModule):
    """Trains a `CausalVAE` with reconstruction/perceptual/KL losses and, optionally, a 3D discriminator.

    Manual optimization: each batch takes one autoencoder step, then (once the loss's `gan_start_step` is
    reached) one discriminator step. `train_steps` counts batches and is what `gan_start_step` refers to
    (Lightning's `global_step` counts optimizer steps, two per batch once the GAN is on). A non-finite loss of
    either network stops the run, and diverged weights are never saved (:class:`walt.lightning.WaltModule`).

    Args:
        vae: the autoencoder being trained.
        loss: the objective (`TokenizerLoss`), holding the perceptual network if any.
        discriminator: e.g. `Discriminator3D`; None trains without the adversarial term.
        optimizer, discriminator_optimizer: callables params -> optimizer.
        ema_decay: keep an EMA of the autoencoder (used for validation) when set.
        gradient_clip: max gradient norm of each network; None disables clipping.
        val_metrics: extra metrics `metric(x_rec, x)` on frames (N, 3, H, W) in [-1, 1] (e.g. LPIPS),
            logged as `val/<name>`; PSNR, L1 and (for frames of at least 11x11) SSIM are always logged, and
            for RGB clips the chroma error and the grid ratio at the tokenizer's spatial factor.
        num_log_videos: clips of the first validation batch logged side by side (input | reconstruction).
        video_fps: frame rate of the logged videos.
    """

    def __init__(
        self,
        vae: CausalVAE,
        loss: TokenizerLoss,
        discriminator: nn.Module | None = None,
        optimizer: OptimizerFactory = adam_for_gan,
        discriminator_optimizer: OptimizerFactory = adam_for_gan,
        ema_decay: float | None = None,
        gradient_clip: float | None = 1.0,
        val_metrics: dict[str, nn.Module] | None = None,
        num_log_videos: int = 2,
        video_fps: float = 8.0,
    ) -> None:
        super().__init__()
        check_int("num_log_videos", num_log_videos, 0)
        check_positive("video_fps", video_fps)
        if gradient_clip is not None:
            check_positive("gradient_clip", gradient_clip)
        self.automatic_optimization = False
        self.vae = vae
        self.loss = loss
        self.discriminator = discriminator
        self.optimizer_factory = optimizer
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.ema = EMA(vae, ema_decay) if ema_decay is not None else None
        self.gradient_clip = gradient_clip
        self.val_metrics = nn.ModuleDict(val_metrics or {})
        for metric in self.val_metrics.values():
            metric.requires_grad_(False)
        self.num_log_videos = num_log_videos
        self.video_fps = video_fps
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The checkpoint describes its autoencoder, so `walt evaluate` and the pipeline can rebuild it."""
        from walt.pipeline.parts import describe_part

        super().on_save_checkpoint(checkpoint)
        checkpoint["walt_tokenizer"] = describe_part("tokenizer", self.vae)

    @property
    def inference_vae(self) -> CausalVAE:
        """The weights used for validation and export: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.vae

    def configure_optimizers(self) -> list[Optimizer]:
        optimizers = [self.optimizer_factory(self.vae.parameters())]
        if self.discriminator is not None:
            optimizers.append(self.discriminator_optimizer_factory(self.discriminator.parameters()))
        return optimizers

    def _optimizers(self) -> tuple:
        opts = self.optimizers()
        return tuple(opts) if isinstance(opts, list | tuple) else (opts,)

    def _step(self, optimizer, loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip is not None:
            self.clip_gradients(optimizer, self.gradient_clip, gradient_clip_algorithm="norm")
        optimizer.step()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = batch["video"]  # (B, 3, T, H, W)
        opts = self._optimizers()
        step = int(self.train_steps)
        gan = self.discriminator is not None and self.loss.gan_active(step)

        mean, logvar = self.vae.encode_moments(x)  # (B, C, 1+k, h, w) each
        z = mean if logvar is None else mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        x_rec = self.vae.decode_raw(z)  # (B, 3, T, H, W)
        logits_fake = None
        if gan:
            self.discriminator.requires_grad_(False)  # the autoencoder step must not train D
            logits_fake = self.discriminator(x_rec)  # (B, 1, T', H', W')
        last_layer = self.vae.last_decoder_layer
        loss, logs = self.loss.generator_loss(x, x_rec, mean, logvar, logits_fake, last_layer)
        self._step(opts[0], loss)

        if gan:
            self.discriminator.requires_grad_(True)
            penalty = self.loss.penalty_due(step)
            real = x.detach().requires_grad_(penalty)
            logits_real = self.discriminator(real)  # (B, 1, T', H', W')
            logits_fake = self.discriminator(x_rec.detach())  # (B, 1, T', H', W')
            d_loss, d_logs = self.loss.discriminator_loss(real, logits_real, logits_fake, penalty)
            self._step(opts[1], d_loss)
            logs.update(d_logs)

        if self.ema is not None:
            self.ema.update(self.vae)
        self.train_steps += 1
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False)
        self.log("train/rec_loss", logs["rec"], prog_bar=True)
        return loss.detach()

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["video"]  # (B, 3, T, H, W)
        vae = self.inference_vae
        x_rec = vae.decode_raw(vae.encode_moments(x)[0]).clamp(-1, 1)  # (B, 3, T, H, W)
        values = {"val/psnr": psnr(x_rec, x).mean().float(), "val/l1": (x_rec - x).abs().mean()}
        if min(x.shape[-2:]) >= SSIM_WINDOW:  # SSIM needs one whole Gaussian window per frame
            values["val/ssim"] = ssim(x_rec, x).mean().float()
        if x.shape[1] == 3:  # colour drift shows in chroma before PSNR notices it
            values["val/chroma_error"] = chroma_error(x_rec, x).mean().float()
        factor = vae.spatial_factor
        if min(x.shape[-2:]) > 3 * factor:  # a grid of the latent cells at any phase: about 1 without one
            # the outermost cells are left out: padding marks a frame's border, and that is no grid
            values["val/grid_ratio"] = pooled_grid_ratio(x_rec, factor, margin=factor).float()
        for name, metric in self.val_metrics.items():
            values[f"val/{name}"] = metric(frames_as_images(x_rec), frames_as_images(x)).float().mean()
        self.log_dict(values, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0:
            self._log_videos(x, x_rec)

    def _log_videos(self, x: Tensor, x_rec: Tensor) -> None:
        if self.global_rank != 0 or not isinstance(self.logger, TensorBoardLogger):
            return
        side_by_side = torch.cat([x, x_rec], dim=-1)  # (B, 3, T, H, 2W)
        for i in range(min(self.num_log_videos, x.shape[0])):
            frames = to_uint8(side_by_side[i]).cpu().numpy()  # (T, H, 2W, 3)
            tag = f"val/reconstruction_{i}"
            add_video(self.logger.experiment, tag, frames, self.global_step, self.video_fps)
