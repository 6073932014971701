"""One LightningModule for every diffusion model of the cascade: :class:`DiffusionModule`.

The base model, a super-resolution stage and a distillation round are configurations of it, not subclasses: what
differs between them is a part it is given (as EDM splits the loss from the network and the sampler).

- ``objective`` (:mod:`walt.diffusion.objectives`): what a training step draws and what the loss is:
  :class:`~walt.diffusion.VPrediction` (W.A.L.T's), or a distillation objective, which learns from a ``teacher``
  (:class:`walt.lightning.Teacher`);
- ``conditioner`` (:class:`walt.conditioning.Conditioner`): what the backbone is conditioned on, with its
  training dropout: labels, text, context frames, and the low-res input of a super-resolution stage.

The module holds what every stage shares: the frozen tokenizer (latents from pixels, videos from latents), the
optimizer with warmup, the EMA used for sampling, validation videos, checkpoints that describe the model, and
each rank's random stream.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from walt.checkpoint import read_checkpoint
from walt.checks import check_int, check_positive
from walt.conditioning import Conditioner, TextEncoder, downsample_video, pixel_video, upsample_video
from walt.data.transforms import to_uint8
from walt.diffusion import (
    Distillation,
    GuidanceDistillation,
    NoiseSchedule,
    ProgressiveDistillation,
    VPrediction,
)
from walt.distributed import check_compile, is_fsdp
from walt.lightning.distillation import Teacher, load_teacher_weights
from walt.lightning.ema import EMA
from walt.lightning.module import OptimizerFactory, WaltModule
from walt.lightning.video_logging import add_video
from walt.nn.fused_norm import check_fused_norm
from walt.pipeline import Pipeline, describe_pipeline
from walt.tokenizer import CausalVAE, load_vae_weights
from walt.transformer import WALT
from walt.transformer.float8 import FLOAT8_LAYERS, check_float8_device, check_float8_layers, convert_to_float8

__all__ = ["DiffusionModule", "adamw_for_diffusion"]


def adamw_for_diffusion(params) -> Optimizer:
    """W.A.L.T's optimizer: AdamW, lr 5e-4 (with warmup), no weight decay on the default path."""
    return torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.99), weight_decay=0.0)


class DiffusionModule(WaltModule):
    """Trains ``backbone`` with ``objective`` on latents, conditioned by ``conditioner`` (module docstring).

    Batches hold pixels (``video`` (B, 3, T, H, W), encoded by the frozen ``tokenizer``) or latents
    (``latent`` (B, C, T', H', W'), e.g. from :class:`walt.data.LatentShards`), plus ``label`` for a
    class-conditional backbone and ``caption`` (list of str) for a text-conditional one. A super-resolution
    stage (a backbone built with ``lowres=True``, a conditioner with ``lowres``) trains on pixels: its low-res
    inputs are made from them. Image batches (T = 1) train through the same step.

    Args:
        backbone: the denoiser (a distillation student: built with ``guidance_input=True``).
        objective: the loss (default: :class:`~walt.diffusion.VPrediction`, W.A.L.T's schedule and
            self-conditioning probability 0.9).
        conditioner: the batch's conditioning (default: labels as the backbone takes them, dropout 0.1).
        tokenizer: the frozen autoencoder; needed to train on pixels and to decode samples.
        tokenizer_weights: a TokenizerModule checkpoint or the ``vae.safetensors`` written by ``walt encode``
            (which holds the latent normalization); loaded at construction.
        teacher: what a distillation objective learns from (:class:`walt.lightning.Teacher`).
        optimizer: builds the optimizer from the trainable parameters.
        warmup_steps: linear learning-rate warmup, then constant.
        ema_decay: EMA of the backbone, used for sampling; None disables it.
        train_only_spatiotemporal: freeze everything but the spatiotemporal blocks and the temporal position
            embedding (Video LDM's temporal alignment of a pretrained image model).
        sample_steps: sampling steps of the validation videos and the model's default (None: 50; for a
            distilled student its ``student_steps``).
        num_log_samples / video_fps: videos logged after each validation, and their frame rate.
        tokenizer_chunk_size: latent frames per tokenizer chunk when encoding or decoding (the causal cache
            bounds memory on large videos; results are identical); None = one pass.
        compile: ``torch.compile`` the backbone and its EMA copy (whole graph, in place, so checkpoints keep
            their keys); on a GPU it roughly halves the step time (benchmarks/RESULTS.md), at a compilation
            cost of a minute or so per input shape at the start of a run.
        float8: FP8 matmuls for the blocks' attention and MLP linears (torchao float8 training, recipe
            "tensorwise" or "rowwise"; `walt.transformer.float8`), opt-in; needs torchao and a GPU with FP8
            tensor cores (refused before the first step elsewhere). Weights and checkpoints stay as they are.
        float8_layers: which of each block's linears take FP8 (names inside a block, default all four:
            attn.qkv, attn.proj, mlp.fc1, mlp.fc2); e.g. [mlp.fc1, mlp.fc2] for the MLP alone.
        fused_norm: run the blocks' modulated LayerNorms (with the gated residual adds) as Triton kernels,
            forward and backward (`WALT.fuse_norms`); the same function. Needs a CUDA GPU (refused before the
            first step elsewhere); checkpoints do not record it.
    """

    def __init__(
        self,
        backbone: WALT,
        objective: VPrediction | GuidanceDistillation | ProgressiveDistillation | None = None,
        conditioner: Conditioner | None = None,
        tokenizer: CausalVAE | None = None,
        tokenizer_weights: str | None = None,
        teacher: Teacher | None = None,
        optimizer: OptimizerFactory = adamw_for_diffusion,
        # One default each for every stage: W.A.L.T's base recipe (tens of thousands of steps). The EMA averages
        # over about 1 / (1 - decay) = 10,000 steps, so a short run (a distillation round, a CPU quickstart)
        # sets a smaller decay (0.999 or less) and a shorter warmup in its config, as configs/ do.
        warmup_steps: int = 1000,
        ema_decay: float | None = 0.9999,
        train_only_spatiotemporal: bool = False,
        sample_steps: int | None = None,
        num_log_samples: int = 4,
        video_fps: float = 8.0,
        tokenizer_chunk_size: int | None = None,
        compile: bool = False,
        float8: str | None = None,
        float8_layers: Sequence[str] = FLOAT8_LAYERS,
        fused_norm: bool = False,
    ) -> None:
        super().__init__()
        # Out of range, these would train without a word (a negative warmup); `walt fit` shows the error first.
        check_int("warmup_steps", warmup_steps, 0)
        if sample_steps is not None:
            check_int("sample_steps", sample_steps, 1)
        check_int("num_log_samples", num_log_samples, 0)
        check_positive("video_fps", video_fps)
        objective = objective if objective is not None else VPrediction()
        if isinstance(objective, Distillation):
            if not backbone.guidance_input:
                raise ValueError(
                    "the student takes the guidance scale as an input: build its backbone with guidance_input: true"
                )
            if teacher is None:
                raise ValueError(
                    f"{type(objective).__name__} learns from a teacher: give the module a teacher "
                    "(walt.lightning.Teacher with the teacher's checkpoint)"
                )
            objective = copy.copy(objective)  # the given object stays as it was
            # A function, not a model: the teacher is loaded on first use, after Lightning has placed the student.
            objective.teacher = partial(getattr, self, "teacher_model")
            sample_steps = sample_steps or objective.student_steps
        elif teacher is not None:
            raise ValueError(f"a teacher was given but {type(objective).__name__} learns from none")
        self.backbone = backbone
        self.tokenizer = tokenizer
        if tokenizer is not None:
            if tokenizer_weights is not None:
                load_vae_weights(tokenizer, tokenizer_weights)
            tokenizer.requires_grad_(False).eval()
        self.objective = objective
        self.conditioner = (conditioner or Conditioner()).for_model(
            backbone, tokenizer, objective.schedule, tokenizer_chunk_size
        )
        self.teacher = teacher
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.sample_steps = sample_steps or 50
        self.num_log_samples = num_log_samples
        self.video_fps = video_fps
        self.tokenizer_chunk_size = tokenizer_chunk_size
        if train_only_spatiotemporal:
            _freeze_spatial(backbone)
        self.float8 = float8
        self.float8_layers = check_float8_layers(float8_layers)  # refused at construction, not at the step
        if float8 is not None:  # before the EMA copy and compilation, so that both see the FP8 linears
            convert_to_float8(backbone, float8, self.float8_layers)
        self.fused_norm = fused_norm
        if fused_norm:  # before the EMA copy, so that it samples the validation videos with the same kernels
            backbone.fuse_norms()
        self.ema = EMA(backbone, ema_decay) if ema_decay is not None else None
        self.compile_models = compile
        if compile:
            backbone.compile(fullgraph=True)
            if self.ema is not None:
                self.ema.module.compile(fullgraph=True)
        if teacher is not None:  # saved with the weights, so neither a resume nor a second fit() starts over
            self.register_buffer("student_initialized", torch.tensor(False))
        self._latent_shape: tuple[int, ...] | None = None  # seen in validation; shapes the logged samples
        self._log_batch: dict = {}  # the first validation batch's captions (and low-res clips), to log samples
        self._class_names: list[str] = []  # read from the training data when first asked for

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule: the objective's."""
        return self.objective.schedule

    @property
    def text_encoder(self) -> TextEncoder | None:
        """The text encoder: the conditioner's."""
        return self.conditioner.text_encoder

    # ---- training ----------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> DiffusionModule:
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
        if self.float8 is not None:
            check_float8_device(self.trainer.strategy.root_device)
        if self.fused_norm:
            check_fused_norm(self.trainer.strategy.root_device)
        # Before Lightning restores a checkpoint (resuming), which then overwrites the student as it should.
        if stage == "fit" and self.teacher is not None and self.teacher.init_student:
            if not bool(self.student_initialized):
                self.initialize_student()

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
            self._log_batch = self._videos_to_log(batch)

    @torch.no_grad()
    def test_step(self, batch: dict, batch_idx: int) -> None:
        """`walt test`: the diffusion loss on the test split, with the same fixed draws as validation."""
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self._loss(batch, train=False, generator=generator)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch_size(batch))

    def _loss(self, batch: dict, train: bool, generator: torch.Generator | None = None) -> Tensor:
        z = self.latents(batch)  # (B, C, T, H, W)
        return self.objective(self.backbone, z, lambda g: self.conditioner(batch, z, train, g), generator)

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

    # ---- distillation ------------------------------------------------------------------------------------

    @property
    def teacher_model(self) -> WALT:
        """The frozen teacher on the student's device, loaded from the teacher's checkpoint on first use."""
        if self.teacher is None:
            raise ValueError("this module has no teacher: it trains a model from data, not by distillation")
        return self.teacher.model(self.backbone, self.objective, self.compile_models)

    def initialize_student(self) -> None:
        """Copies the teacher's weights into the student and its EMA (a guidance-stage student keeps its new,
        zero-output guidance embedding, so it starts as exactly the teacher)."""
        load_teacher_weights(self.backbone, self.teacher_model.state_dict())
        if self.ema is not None:
            self.ema.module.load_state_dict(self.backbone.state_dict())
        self.student_initialized.fill_(True)

    # ---- validation videos -------------------------------------------------------------------------------

    def _videos_to_log(self, batch: dict) -> dict:
        """What the validation videos are made from: the captions of the first batch, and for a
        super-resolution stage its low-res clips and labels."""
        n, lowres = self.num_log_samples, self.conditioner.lowres
        logged: dict = {"captions": list(batch.get("caption", []))}
        if lowres is not None and n > 0:
            video = pixel_video(batch)[:n]  # (n, 3, T, H, W)
            logged["lowres"] = downsample_video(video, lowres.spatial_factor, lowres.temporal_factor)
            logged["captions"] = logged["captions"][:n]
            if self.backbone.num_classes is not None:
                logged["labels"] = batch["label"][:n]
        return logged

    def on_validation_epoch_end(self) -> None:
        if self.num_log_samples <= 0 or self.tokenizer is None or self._latent_shape is None:
            return
        if not self._logs_samples_here():
            return
        if self.conditioner.lowres is not None:
            self._log_upsampled()
        else:
            self._log_samples()

    def _log_samples(self) -> None:
        """Generated videos side by side: every class in turn (or the batch's captions), seeds 0 .. n-1."""
        n = self.num_log_samples
        prompts = self._prompts(self._log_batch.get("captions"), n)
        _, T, H, W = self._latent_shape
        time, space = self.tokenizer.temporal_factor, self.tokenizer.spatial_factor
        videos = self.pipeline().generate(
            prompts=prompts, num_samples=n, num_frames=1 + time * (T - 1), height=space * H, width=space * W,
            output="float", progress=False,
        )  # fmt: skip
        grid = torch.cat(list(videos), dim=-1)  # (3, T, H, n*W)
        self._add_video("samples", grid)

    def _log_upsampled(self) -> None:
        """A super-resolution stage's low-res inputs (upsampled in pixels) above its outputs."""
        low = self._log_batch.get("lowres")
        if low is None:
            return
        s, t = self.conditioner.lowres.spatial_factor, self.conditioner.lowres.temporal_factor
        prompts = self._prompts(self._log_batch["captions"], len(low))
        videos = self.pipeline().generate(
            labels=self._log_batch.get("labels"), prompts=prompts, lowres=low, output="float", progress=False
        )  # (n, 3, T, H, W)
        inputs = upsample_video(low, s, t).clamp(-1, 1)  # (n, 3, T, H, W)
        grid = torch.cat([torch.cat(list(inputs), dim=-1), torch.cat(list(videos), dim=-1)], dim=-2)
        self._add_video("upsampled", grid)

    def _prompts(self, captions: list[str] | None, n: int) -> list[str] | None:
        if self.backbone.text_dim is None:
            return None
        captions = captions or [""]
        return [captions[i % len(captions)] for i in range(n)]

    def _add_video(self, tag: str, grid: Tensor) -> None:
        frames = to_uint8(grid).cpu().numpy()  # (T, H', W', 3)
        add_video(self.logger.experiment, tag, frames, self.global_step, self.video_fps)

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
            super_resolution=self.conditioner.lowres,
        )

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

    # ---- checkpoints -------------------------------------------------------------------------------------

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, strict: bool = True, **kwargs):
        """The module of a ``walt fit`` checkpoint, rebuilt from the model description it carries (backbone,
        tokenizer, schedule, text encoder, sampling and super-resolution settings) with its weights, EMA
        included. ``kwargs`` set the other constructor arguments (optimizer, objective, teacher, ...), which
        checkpoints do not record; a distilled checkpoint loads as a plain model unless given its teacher. For
        inference, ``walt.pipeline.Pipeline.from_pretrained`` is the lighter path."""
        from walt.pipeline import ModelFileError, load_model

        checkpoint = read_checkpoint(checkpoint_path)
        if "walt_model" not in checkpoint:
            raise ModelFileError(f"{checkpoint_path} holds no model description (written by an older walt)")
        pipe = load_model(checkpoint_path, weights="live")
        pipe.backbone.requires_grad_(True).train()
        module = cls(**cls._arguments(pipe, kwargs))
        state = dict(checkpoint["state_dict"])
        if module.teacher is None:
            state.pop("student_initialized", None)  # a distilled student, loaded as a model of its own
        module.load_state_dict(state, strict=strict)
        module.set_class_names(pipe.class_names)
        return module.to(map_location) if map_location is not None else module

    @classmethod
    def _arguments(cls, pipe: Pipeline, kwargs: dict) -> dict:
        """The constructor arguments of the module of ``pipe``'s model; ``kwargs`` add to them or replace them."""
        built = dict(
            backbone=pipe.backbone,
            objective=VPrediction(pipe.schedule),
            conditioner=Conditioner(text_encoder=pipe.text_encoder, lowres=pipe.super_resolution),
            tokenizer=pipe.tokenizer,
            sample_steps=pipe.sample_steps,
            tokenizer_chunk_size=pipe.tokenizer_chunk_size,
            video_fps=pipe.fps,
        )
        return {**built, **kwargs}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # WaltModule's: refuses diverged weights, records the weights' hash and the random stream.
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None:  # the model describes itself: it loads without its training YAML
            checkpoint["walt_model"] = self.model_description()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # the random stream
        self.set_class_names((checkpoint.get("walt_model") or {}).get("class_names") or self._class_names)


def batch_size(batch: dict) -> int:
    return (batch["latent"] if "latent" in batch else batch["video"]).shape[0]


def _freeze_spatial(backbone: WALT) -> None:
    """Train only blocks whose window spans time (and the temporal position table); freeze the rest."""
    backbone.requires_grad_(False)
    for i, block in enumerate(backbone.blocks):
        if backbone.windows[i % len(backbone.windows)][0] != 1:
            block.requires_grad_(True)
    backbone.pos_embed.temporal.requires_grad_(True)
