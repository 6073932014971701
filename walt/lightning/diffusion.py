"""The base latent diffusion model: a WALT backbone trained with v-prediction on tokenizer latents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from walt.checkpoint import read_checkpoint
from walt.checks import check_int, check_positive, check_probability
from walt.conditioning import Conditioner, Conditioning, TextEncoder, frames_to_generate
from walt.data.transforms import to_uint8
from walt.diffusion import CosineSchedule, VPrediction, ZeroTerminalSNRLinearSchedule
from walt.distributed import check_compile, is_fsdp
from walt.lightning.ema import EMA
from walt.lightning.module import WaltModule
from walt.lightning.video_logging import add_video
from walt.pipeline import Pipeline, SuperResolution, describe_pipeline
from walt.rng import seed_per_rank
from walt.tokenizer import CausalVAE, load_vae_weights
from walt.transformer import WALT

__all__ = ["BaseDiffusionModule"]


def adamw_for_diffusion(params) -> Optimizer:
    """W.A.L.T's optimizer: AdamW, lr 5e-4 (with warmup), no weight decay on the default path."""
    return torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.0)


class Setting:
    """A module attribute that is a setting of one of its parts (``"objective"``, ``"conditioner.lowres"``):
    reading and setting it reach the part, so the value exists once."""

    def __init__(self, part: str) -> None:
        self.path = part.split(".")

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def _part(self, module: object) -> object:
        for name in self.path:
            module = getattr(module, name)
        return module

    def __get__(self, module: object, owner: type | None = None) -> object:
        return self if module is None else getattr(self._part(module), self.name)

    def __set__(self, module: object, value: object) -> None:
        setattr(self._part(module), self.name, value)


class BaseDiffusionModule(WaltModule):
    """Trains ``backbone`` to predict v on latents, conditioned on what the backbone was built for.

    Batches hold either pixels (``video`` (B, 3, T, H, W), encoded by the frozen ``tokenizer``) or latents
    (``latent`` (B, C, T', H', W'), e.g. from :class:`walt.data.LatentShards`), plus ``label`` for a
    class-conditional backbone and ``caption`` (list of str) for a text-conditional one. Image batches (T = 1)
    train through the same step.

    Args:
        backbone: the denoiser.
        tokenizer: the frozen autoencoder; needed to train on pixels and to decode samples.
        tokenizer_weights: a TokenizerModule checkpoint or the ``vae.safetensors`` written by ``walt encode``
            (which holds the latent normalization); loaded at construction.
        schedule: the noise schedule (default: linear betas rescaled to zero terminal SNR).
        optimizer: builds the optimizer from the trainable parameters.
        warmup_steps: linear learning-rate warmup, then constant.
        ema_decay: EMA of the backbone, used for sampling; None disables it.
        label_dropout: probability of replacing a label by the null label (-1), for guidance.
        text_encoder: the frozen text encoder of a text-conditional backbone (``text_dim`` set); its token
            embeddings reach the backbone through cross-attention. Not part of the checkpoint.
        text_dropout: probability of replacing a caption by the null prompt ``""`` (no text token: the same
            null condition guidance uses at sampling time).
        self_condition_prob: probability that a sample gets the model's own x0 estimate as input.
        frame_prediction_prob: probability that a sample is trained to continue given frames (a backbone built
            with ``context_frames``): 1 .. ``max_context_frames`` latent frames are given, the loss covers the rest.
        max_context_frames: most latent frames given in frame-prediction training.
        train_only_spatiotemporal: freeze everything but the spatiotemporal blocks and the temporal position
            embedding (Video LDM's temporal alignment of a pretrained image model).
        sample_steps / num_log_samples: DDIM steps and class-conditional videos logged after each validation.
        tokenizer_chunk_size: latent frames per tokenizer chunk when encoding or decoding (the causal cache
            bounds memory on large videos; results are identical); None = one pass.
        compile: ``torch.compile`` the backbone and its EMA copy (whole graph, in place, so checkpoints keep
            their keys); on a GPU it roughly halves the step time (benchmarks/RESULTS.md), at a compilation
            cost of a minute or so per input shape at the start of a run.

    The loss is ``objective`` (:class:`walt.diffusion.VPrediction`) and the batch's conditioning
    ``conditioner`` (:class:`walt.conditioning.Conditioner`); the dropout and self-conditioning settings
    below are theirs.
    """

    schedule = Setting("objective")
    text_encoder = Setting("conditioner")
    label_dropout = Setting("conditioner")
    text_dropout = Setting("conditioner")
    frame_prediction_prob = Setting("conditioner")
    max_context_frames = Setting("conditioner")
    self_condition_prob = Setting("objective")

    def __init__(
        self,
        backbone: WALT,
        tokenizer: CausalVAE | None = None,
        tokenizer_weights: str | None = None,
        schedule: ZeroTerminalSNRLinearSchedule | CosineSchedule | None = None,
        optimizer: OptimizerCallable = adamw_for_diffusion,
        warmup_steps: int = 1000,
        ema_decay: float | None = 0.9999,
        label_dropout: float = 0.1,
        text_encoder: TextEncoder | None = None,
        text_dropout: float = 0.1,
        self_condition_prob: float = 0.9,
        frame_prediction_prob: float = 0.0,
        max_context_frames: int = 2,
        train_only_spatiotemporal: bool = False,
        sample_steps: int = 50,
        num_log_samples: int = 4,
        video_fps: float = 8.0,
        tokenizer_chunk_size: int | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # Out of range, these would train without a word (a probability of 3, a negative warmup); `walt fit`
        # shows the error before the first step.
        check_probability("label_dropout", label_dropout)
        check_probability("text_dropout", text_dropout)
        check_probability("self_condition_prob", self_condition_prob)
        check_probability("frame_prediction_prob", frame_prediction_prob)
        check_int("warmup_steps", warmup_steps, 0)
        check_int("max_context_frames", max_context_frames, 1)
        check_int("sample_steps", sample_steps, 1)
        check_int("num_log_samples", num_log_samples, 0)
        check_positive("video_fps", video_fps)
        if frame_prediction_prob > 0 and not backbone.context_frames:
            raise ValueError("frame_prediction_prob > 0 needs a backbone built with context_frames=True")
        _check_text_encoder(backbone, text_encoder)
        self.backbone = backbone
        self.tokenizer = tokenizer
        if tokenizer is not None:
            if tokenizer_weights is not None:
                load_vae_weights(tokenizer, tokenizer_weights)
            tokenizer.requires_grad_(False).eval()
        self.objective = VPrediction(
            schedule or ZeroTerminalSNRLinearSchedule(),
            self_condition_prob if backbone.self_conditioning else 0.0,
        )
        self.conditioner = Conditioner(
            labels=backbone.num_classes is not None,
            text_encoder=text_encoder,  # frozen, outside the state dict
            context=backbone.context_frames,
            label_dropout=label_dropout,
            text_dropout=text_dropout,
            frame_prediction_prob=frame_prediction_prob,
            max_context_frames=max_context_frames,
        )
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.sample_steps = sample_steps
        self.num_log_samples = num_log_samples
        self.video_fps = video_fps
        self.tokenizer_chunk_size = tokenizer_chunk_size
        if train_only_spatiotemporal:
            _freeze_spatial(backbone)
        self.ema = EMA(backbone, ema_decay) if ema_decay is not None else None
        self.compile_models = compile
        if compile:
            backbone.compile(fullgraph=True)
            if self.ema is not None:
                self.ema.module.compile(fullgraph=True)
        self._latent_shape: tuple[int, ...] | None = None  # seen in validation; shapes the logged samples
        self._log_prompts: list[str] = []  # captions of the first validation batch, for text models
        self._class_names: list[str] = []  # read from the training data when first asked for

    # ---- training ----------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> BaseDiffusionModule:
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()  # frozen: never in training mode
        return self

    def configure_optimizers(self):
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        warmup = max(self.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self._loss(batch, train=True)  # a non-finite one stops the run (WaltModule.on_before_backward)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size(batch))
        return loss

    def setup(self, stage: str) -> None:
        if self.compile_models:
            check_compile(self.trainer.strategy)

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:
            seed_per_rank(self.global_rank)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end, which Lightning calls after the callbacks' hooks: a checkpoint
        # saved at a step's end would hold the average without that step's update and a resumed run would lack
        # it for good. It also makes one update per optimizer step under gradient accumulation.
        if self.ema is not None:
            self.ema.update(self.backbone)

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # A fixed generator per batch makes the validation loss comparable across epochs.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self._loss(batch, train=False, generator=generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size(batch))
        if batch_idx == 0:
            self._latent_shape = tuple(self.latents(batch).shape[1:])
            self._log_prompts = list(batch.get("caption", []))

    @torch.no_grad()
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """`walt test`: the diffusion loss on the test split, with the same fixed draws as validation."""
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self._loss(batch, train=False, generator=generator)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch_size(batch))

    def on_validation_epoch_end(self) -> None:
        if self.num_log_samples <= 0 or self.tokenizer is None or self._latent_shape is None:
            return
        if not self._logs_samples_here():
            return
        n = self.num_log_samples
        prompts = None
        if self.backbone.text_dim is not None:
            captions = self._log_prompts or [""]
            prompts = [captions[i % len(captions)] for i in range(n)]
        _, T, H, W = self._latent_shape
        time, space = self.tokenizer.temporal_factor, self.tokenizer.spatial_factor
        videos = self.pipeline().generate(  # every class in turn, seeds 0 .. n-1
            prompts=prompts, num_samples=n, num_frames=1 + time * (T - 1), height=space * H, width=space * W,
            output="float", progress=False,
        )  # fmt: skip
        grid = torch.cat(list(videos), dim=-1)  # (3, T, H, n*W)
        add_video(
            self.logger.experiment, "samples", to_uint8(grid).cpu().numpy(), self.global_step, self.video_fps
        )

    def _logs_samples_here(self) -> bool:
        """Whether this process generates the validation videos: rank 0 alone (the EMA backbone runs outside the
        data-parallel wrapper, so no other rank has to join), and no process under FSDP, where the sampling
        backbone is sharded (each forward is a collective all ranks must enter) and the tokenizer's weights are
        sharded outside the training forward; sample from the checkpoint with `walt sample` instead."""
        if self.global_rank != 0 or not isinstance(self.logger, TensorBoardLogger):
            return False
        if is_fsdp(self.trainer.strategy):
            rank_zero_warn(
                "validation videos are not generated under FSDP; use `walt sample` on a checkpoint"
            )
            return False
        return True

    def _loss(self, batch: dict, train: bool, generator: torch.Generator | None = None) -> Tensor:
        z = self.latents(batch)  # (B, C, T, H, W)
        return self.objective(self.backbone, z, lambda g: self.conditioner(batch, z, train, g), generator)

    def _conditioning(
        self, batch: dict, z: Tensor, train: bool, generator: torch.Generator | None
    ) -> tuple[Conditioning, Tensor | None]:
        """The batch's conditioning and the loss weight it implies (0 on given context frames)."""
        cond = self.conditioner(batch, z, train, generator)
        return cond, frames_to_generate(cond.context_mask)

    def latents(self, batch: dict) -> Tensor:
        """The batch's normalized latents: given, or encoded from pixels with the frozen tokenizer."""
        if "latent" in batch:
            return batch["latent"].float()
        if self.tokenizer is None:
            raise ValueError(
                "the batch holds pixels ('video') but the module has no tokenizer to encode them"
            )
        with torch.no_grad():
            return self.tokenizer.encode(batch["video"], self.tokenizer_chunk_size)

    # ---- sampling ----------------------------------------------------------------------------------------

    @property
    def sampling_backbone(self) -> WALT:
        """The weights used to sample: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.backbone

    def pipeline(self) -> Pipeline:
        """A :class:`walt.pipeline.Pipeline` over the module's current sampling weights (shared, not copied),
        tokenizer, schedule and text encoder: ``module.pipeline().generate(labels=[1, 3])``."""
        if self.tokenizer is None:
            raise ValueError("generating videos needs the tokenizer; construct the module with one")
        return Pipeline(
            self.sampling_backbone,
            self.tokenizer,
            self.schedule,
            self.text_encoder,
            self.class_names or None,
            sample_steps=self.sample_steps,
            tokenizer_chunk_size=self.tokenizer_chunk_size,
            fps=self.video_fps,
            super_resolution=self.super_resolution_settings(),
        )

    def super_resolution_settings(self) -> SuperResolution | None:
        """How a super-resolution subclass makes its low-res input; None for a base model."""
        return None

    @property
    def class_names(self) -> list[str]:
        """The training data's class names (recorded in checkpoints, so they travel with the model)."""
        if not self._class_names and self._trainer is not None:
            data = getattr(self.trainer, "datamodule", None)
            self.set_class_names(getattr(getattr(data, "train", None), "classes", None) or [])
        return self._class_names

    def set_class_names(self, names: Sequence[str]) -> None:
        """Names for the backbone's class labels; kept only when there is one per class (a model may be built
        for more classes than a dataset in use names, e.g. a MovingDigits split)."""
        num_classes = self.backbone.num_classes
        self._class_names = list(names) if num_classes is not None and len(names) == num_classes else []

    def model_description(self) -> dict:
        """What the model is, as JSON (walt.pipeline.describe_pipeline), plus how it was trained so far."""
        description = describe_pipeline(self.pipeline())
        description["training"] = self._training_record()
        return description

    def _training_record(self) -> dict:
        record: dict = {"global_step": int(self.global_step), "epoch": int(self.current_epoch)}
        if self._trainer is None:
            return record
        data = getattr(self.trainer, "datamodule", None)
        train = getattr(data, "train", None)
        if train is not None:
            record["data"] = {"dataset": type(train).__name__, "num_samples": len(train)}
        log_dir = self.trainer.log_dir
        config = Path(log_dir) / "config.yaml" if log_dir else None
        if config is not None and config.is_file():
            record["config"] = config.read_text()
        return record

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, strict: bool = True, **kwargs):
        """The module of a ``walt fit`` checkpoint, rebuilt from the model description it carries (backbone,
        tokenizer, schedule, text encoder, sampling and super-resolution settings) with its weights, EMA
        included. ``kwargs`` set the other constructor arguments (optimizer, dropout, ...), which checkpoints
        do not record. For inference, ``walt.pipeline.Pipeline.from_pretrained`` is the lighter path."""
        from walt.pipeline import ModelFileError, load_model

        checkpoint = read_checkpoint(checkpoint_path)
        if "walt_model" not in checkpoint:
            raise ModelFileError(f"{checkpoint_path} holds no model description (written by an older walt)")
        pipe = load_model(checkpoint_path, weights="live")
        built = dict(backbone=pipe.backbone, tokenizer=pipe.tokenizer, schedule=pipe.schedule, text_encoder=pipe.text_encoder,
                     sample_steps=pipe.sample_steps, tokenizer_chunk_size=pipe.tokenizer_chunk_size, video_fps=pipe.fps)  # fmt: skip
        if pipe.super_resolution is not None:
            sr = pipe.super_resolution
            built.update(spatial_factor=sr.spatial_factor, temporal_factor=sr.temporal_factor,
                         lowres_path=sr.lowres_path, sample_aug_level=sr.aug_level)  # fmt: skip
        pipe.backbone.requires_grad_(True).train()
        module = cls(**{**built, **kwargs})
        module.load_state_dict(checkpoint["state_dict"], strict=strict)
        module.set_class_names(pipe.class_names)
        return module.to(map_location) if map_location is not None else module

    # ---- checkpoints: exact resumption ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # WaltModule's: refuses diverged weights, records the weights' hash and the random stream.
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None:  # the model describes itself: it loads without its training YAML
            checkpoint["walt_model"] = self.model_description()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # the random stream
        self.set_class_names((checkpoint.get("walt_model") or {}).get("class_names") or self._class_names)


def _check_text_encoder(backbone: WALT, text_encoder: TextEncoder | None) -> None:
    if backbone.text_dim is None:
        if text_encoder is not None:
            raise ValueError(
                "a text_encoder was given but the backbone has no text_dim: set text_dim to its width"
            )
        return
    if text_encoder is None:
        raise ValueError(
            f"the backbone is text-conditional (text_dim={backbone.text_dim}) but no text_encoder was given; "
            "add one, e.g. walt.conditioning.MiniLMTextEncoder (384-d) or T5TextEncoder"
        )
    if text_encoder.dim != backbone.text_dim:
        raise ValueError(
            f"the text encoder gives {text_encoder.dim}-d tokens but the backbone has text_dim={backbone.text_dim}; "
            "make them equal"
        )


def batch_size(batch: dict) -> int:
    return (batch["latent"] if "latent" in batch else batch["video"]).shape[0]


def _freeze_spatial(backbone: WALT) -> None:
    """Train only blocks whose window spans time (and the temporal position table); freeze the rest."""
    backbone.requires_grad_(False)
    for i, block in enumerate(backbone.blocks):
        if backbone.windows[i % len(backbone.windows)][0] != 1:
            block.requires_grad_(True)
    backbone.pos_embed.temporal.requires_grad_(True)
