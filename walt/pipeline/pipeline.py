"""One path from a trained walt model to videos: :class:`Pipeline` (one model) and :class:`CascadePipeline`
(a base model, then super-resolution stages).

Plain library code: no argparse, no Lightning. The command line (``walt sample``), the benchmarks, the
evaluation, the tools and the validation videos of training all generate through it.

Every sample has its own seed: its initial noise and every stochastic step's noise come from a generator seeded
with that seed alone, so a sample is the same whatever the batch size, the batch it falls in, or the process
that computes it (up to the floating-point differences of the network's kernels at other batch sizes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from walt.conditioning import Conditioning, LowresConditioning, TextEncoder, augment_lowres, context_mask
from walt.data.transforms import resize_center_crop, to_float_video, to_uint8
from walt.diffusion import (
    SAMPLERS,
    ZeroTerminalSNRLinearSchedule,
    guided,
    per_sample_generators,
    randn,
    sample,
    self_conditioned,
)
from walt.diffusion.guidance import check_interval
from walt.diffusion.schedule import NoiseSchedule
from walt.tokenizer import CausalVAE
from walt.transformer import WALT, FirstBlockCache
from walt.transformer.float8 import FLOAT8_LAYERS

__all__ = ["CascadePipeline", "Pipeline", "SuperResolution"]

Output = Literal["uint8", "float", "latent"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# A super-resolution stage's generators are seeded with (seed + stage * STAGE_SEED_STRIDE): its noise is then
# independent of the base stage's, and still a function of the sample's own seed.
STAGE_SEED_STRIDE = 1_000_003


# How a super-resolution stage turns a low-res clip into its conditioning: the one description that training
# (walt.conditioning.Conditioner) and sampling share.
SuperResolution = LowresConditioning


class Pipeline:
    """A trained denoiser with its tokenizer: ``generate(...)`` returns videos.

    Args:
        backbone: the WALT denoiser (the EMA weights of a training run).
        tokenizer: the causal autoencoder whose normalized latents the backbone models.
        schedule: the noise schedule it was trained with (default: W.A.L.T's).
        text_encoder: for a text-conditional backbone (``text_dim`` set).
        class_names: names of the class labels, so ``labels`` may be given by name.
        sample_steps: the default number of sampling steps (a K-step distilled model: K).
        tokenizer_chunk_size: latent frames per decoder chunk (bounds memory; identical results).
        fps: frame rate of the videos (written into files by the callers).
        super_resolution: set for a super-resolution stage.
        info: what the model file says about itself (training, data, metrics), kept for the model card.
    """

    def __init__(
        self,
        backbone: WALT,
        tokenizer: CausalVAE,
        schedule: NoiseSchedule | None = None,
        text_encoder: TextEncoder | None = None,
        class_names: Sequence[str] | None = None,
        *,
        sample_steps: int = 50,
        tokenizer_chunk_size: int | None = None,
        fps: float = 8.0,
        super_resolution: SuperResolution | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        if (backbone.text_dim is None) != (text_encoder is None):
            raise ValueError(
                "a text-conditional backbone needs a text_encoder, and only such a backbone takes one "
                f"(backbone text_dim={backbone.text_dim}, text_encoder={type(text_encoder).__name__})"
            )
        if (super_resolution is not None) != backbone.lowres:
            raise ValueError(
                "super_resolution settings go with a backbone built with lowres=True, and only there"
            )
        if backbone.num_classes is not None and class_names and len(class_names) != backbone.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a backbone of {backbone.num_classes} classes"
            )
        # Shared, not copied: a training module's pipeline samples its current EMA weights (generate runs
        # without gradients and leaves the modules' modes and flags as they are).
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.schedule = schedule or ZeroTerminalSNRLinearSchedule()
        self.text_encoder = text_encoder
        self.class_names = list(class_names) if class_names else []
        self.sample_steps = sample_steps
        self.tokenizer_chunk_size = tokenizer_chunk_size
        self.fps = fps
        self.super_resolution = super_resolution
        self.info = dict(info or {})
        self.autocast_dtype: torch.dtype | None = None
        self.cache_stats = {"full": 0, "cached": 0}  # first-block cache of the last generate() call
        self._compiled = False
        self._compile_mode: str | None = None
        self._adapters = None  # walt.lora.AdapterSet, made by the first load_adapter
        self._float8: str | None = None  # the recipe of quantize_float8()

    # ---- loading, saving, placement ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        weights: Literal["ema", "live"] = "ema",
        text_encoder: TextEncoder | None = None,
        compile: bool = False,
    ) -> Pipeline:
        """Loads a model folder written by :meth:`save_pretrained` / ``walt export``, or a ``walt fit``
        checkpoint (``.ckpt``). ``weights="live"`` takes a checkpoint's trained weights instead of their EMA;
        ``text_encoder`` replaces the recorded one (e.g. a T5 from another local folder); ``dtype`` (e.g.
        ``torch.bfloat16``) runs the denoiser under autocast on a GPU."""
        from walt.pipeline.files import load_model

        pipeline = load_model(path, weights=weights, text_encoder=text_encoder)
        pipeline.to(device, dtype)
        if compile:
            pipeline.compile()
        return pipeline

    def save_pretrained(self, path: str | Path, card: str | None = None) -> Path:
        """Writes the model folder: model.json, backbone.safetensors, tokenizer.safetensors and README.md."""
        from walt.pipeline.files import save_model

        if self._float8:
            raise ValueError(
                "this pipeline's weights were quantized to FP8 for sampling (quantize_float8): save the pipeline "
                "before quantizing it"
            )
        if self.adapters:
            raise ValueError(
                f"this pipeline holds LoRA adapters ({', '.join(self.adapters)}): call merge_and_unload() to save one "
                "merged model, or share the base model and the adapter files"
            )
        return save_model(self, path, card)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Pipeline:
        """Moves the models to ``device``; ``dtype`` (bfloat16 or float16) runs the denoiser and decoder under
        autocast there, the sampler's own arithmetic staying in float64."""
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.backbone.to(device)
        self.tokenizer.to(device)
        self.autocast_dtype = None if dtype in (None, torch.float32) else dtype
        return self

    def compile(self, mode: str | None = None, decoder: bool = True) -> Pipeline:
        """``torch.compile`` of the denoiser and the tokenizer's decoder, in place (worth it on a GPU for many
        samples; state-dict keys unchanged). ``mode`` is torch.compile's for the denoiser (e.g. "reduce-overhead"
        for CUDA graphs); a first-block cache compiles its pieces in it too. The decoder compiles without
        ``fullgraph`` because its causal chunk cache is Python state; under bf16 it is as close to the float32
        decode as the eager decoder is (tests/test_gpu.py), and it took 5.8 % off guided sampling.
        ``decoder=False`` leaves it eager."""
        self.backbone.compile(fullgraph=True, mode=mode)
        if decoder:
            self.tokenizer.decoder.compile()
        self._compiled = True
        self._compile_mode = mode
        return self

    def quantize_float8(self, recipe: str = "rowwise", layers: Sequence[str] = FLOAT8_LAYERS) -> Pipeline:
        """FP8 matmuls for sampling, in place: the blocks' attention and MLP weights are stored in FP8 (one scale
        per output row for "rowwise", per tensor for "tensorwise";
        :func:`walt.transformer.float8.quantize_float8_inference`) and each call casts its activations.
        ``layers`` picks which of each block's linears (default all four; e.g. ``["mlp.fc1", "mlp.fc2"]``).

        Call it on the GPU after ``to(device, torch.bfloat16)`` and before :meth:`compile`. Needs torchao
        (``pip install 'walt[fp8]'``) and FP8 tensor cores (Ada, Hopper or newer). A quantized pipeline samples
        but is not saved and takes no adapters (merge them into a saved model first)."""
        from walt.transformer.float8 import check_float8_device, quantize_float8_inference

        check_float8_device(self.device, fix="sample without FP8 (no --float8, no quantize_float8())")
        if self.autocast_dtype != torch.bfloat16:
            raise ValueError(
                "FP8 sampling runs under bfloat16 autocast: place the pipeline with to(device, torch.bfloat16) "
                "first (walt sample --bf16)"
            )
        if self._float8:
            raise ValueError(f"this pipeline is already quantized to FP8 ({self._float8})")
        if self._compiled:
            raise ValueError("quantize_float8() after compile(): quantize first, then compile")
        if self.adapters:
            raise ValueError(
                "this pipeline holds LoRA adapters: merge_and_unload() them (and save that model) before "
                "quantize_float8()"
            )
        quantize_float8_inference(self.backbone, recipe, layers)
        self._float8 = recipe
        return self

    # ---- LoRA adapters (walt.lora; needs PEFT: pip install 'walt[lora]') -------------------------------------

    def load_adapter(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> Pipeline:
        """Loads a LoRA adapter file (written by a LoRA fine-tuning run) onto the backbone, its update times
        ``scale``, under ``name`` (default: the file's stem). Several adapters can be loaded; their updates add up.
        The classes an adapter adds get the next indices and its names. An adapter trained on another base model,
        a missing or damaged file are refused in one line (:class:`walt.lora.AdapterError`). Returns ``self``."""
        self._adapter_set().load(path, scale, name)
        return self

    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        """The loaded adapters: name -> scale, source, rank, new classes."""
        return {} if self._adapters is None else self._adapters.summary()

    def set_adapter_scale(self, name: str, scale: float) -> Pipeline:
        """Scales adapter ``name``'s update (0 turns it off; the classes it added stay)."""
        self._adapter_set().set_scale(name, scale)
        return self

    def merge_adapters(self) -> Pipeline:
        """Adds the loaded adapters' updates (at their scales) into the weights: sampling then costs what the
        base model costs. Same samples as unmerged, up to float rounding."""
        self._adapter_set().merge()
        return self

    def unmerge_adapters(self) -> Pipeline:
        """Takes merged updates out of the weights again (restored up to float rounding)."""
        self._adapter_set().unmerge()
        return self

    def merge_and_unload(self) -> Pipeline:
        """Merges the adapters for good: the backbone becomes a plain model again (with the added classes),
        which :meth:`save_pretrained` writes as a model folder."""
        self._adapter_set().merge_and_unload()
        return self

    def save_adapter(self, path: str | Path, name: str | None = None) -> Path:
        """Writes a loaded adapter (the only one, or ``name``) as an adapter file."""
        adapters = self._adapter_set()
        if name is None:
            if len(adapters.entries) != 1:
                raise ValueError(f"{len(adapters.entries)} adapters are loaded: say which one to save")
            name = next(iter(adapters.entries))
        return adapters.save(name, path)

    def _adapter_set(self):
        if self._float8:
            raise ValueError(
                "this pipeline's weights are quantized to FP8 (quantize_float8): load and merge adapters before "
                "quantizing"
            )
        if self._adapters is None:
            from walt.lora import AdapterSet, require_peft

            require_peft()
            self._adapters = AdapterSet(self.backbone, self.class_names)
        return self._adapters

    # ---- generation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        labels: Sequence[int | str] | int | str | Tensor | None = None,
        prompts: Sequence[str] | str | None = None,
        context: Any = None,
        context_frames: int | None = None,
        seeds: Sequence[int] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float = 1.0,
        eta: float = 0.0,
        sampler: str = "ddim",
        extend: int = 0,
        batch_size: int = 16,
        output: Output = "uint8",
        num_samples: int | None = None,
        lowres: Tensor | None = None,
        aug_level: float | None = None,
        progress: bool = True,
        cache_threshold: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
    ) -> Tensor:
        """Generates ``N`` videos; returns uint8 ``(N, T, H, W, 3)`` on the CPU (``output="float"``: float
        ``(N, 3, T, H, W)`` in [-1, 1]; ``"latent"``: normalized latents ``(N, C, T', h, w)``).

        ``N`` is the length of ``seeds``, ``labels``, ``prompts`` or ``lowres`` (those given must agree; a
        single label or prompt is used for all), or ``num_samples``, else 1. Seeds default to 0 .. N-1.

        - ``labels``: class indices or names (-1 = unconditional) for a class-conditional model.
        - ``prompts``: texts for a text-conditional model ("" = unconditional).
        - ``context``: given first frames (frame prediction, image-to-video) for a model trained with context
          frames: a video or image file, uint8 frames (T, H, W, 3) or float (3, T, H, W) in [-1, 1], one for all
          samples or a batch of N; ``context_frames`` pixel frames of it are kept (1 + 4j; default all).
        - ``num_frames`` (1 + 4k), ``height``, ``width``: default to the size the model was trained at.
        - ``steps`` (default: the model's own), ``guidance`` (classifier-free guidance scale w; 1 = none),
          ``eta`` (DDIM noise; 0 = deterministic), ``sampler`` ("ddim", "ddpm", "dpmpp_2m").
        - ``extend``: further segments, each continuing the last frames of the previous one.
        - ``lowres``: for a super-resolution stage, the low-res videos to upsample (N, 3, T, h, w) in [-1, 1];
          ``aug_level`` overrides its noise-augmentation level.
        - ``cache_threshold``: first-block caching (`walt.transformer.FirstBlockCache`): a denoising step whose
          first-block residual moved by less than this (relative change) since the last full step reuses the
          other blocks' residual from that step. 0 (default) is off and exact; 0.05 to 0.2 saves passes at a
          cost in fidelity to measure (README). ``cache_stats`` then counts full and cached passes.
        - ``guidance_interval``: ``(lo, hi)`` guides only at diffusion times ``lo < t <= hi`` (t = 1 is pure
          noise) and runs the conditional pass alone elsewhere (:func:`walt.diffusion.guided`); None (default)
          guides at every step.
        """
        steps = self.sample_steps if steps is None else steps
        self._check_settings(steps, guidance, eta, sampler, batch_size, output, extend)
        if not (math.isfinite(cache_threshold) and cache_threshold >= 0):
            raise ValueError(
                f"cache_threshold must be a finite number >= 0 (0 = no caching), got {cache_threshold}"
            )
        self.check_guidance_interval(guidance_interval, guidance)
        self.cache_stats = {"full": 0, "cached": 0}
        n, seeds = self._count(labels, prompts, seeds, lowres, num_samples, context)
        label_tensor = self._labels(labels, n)
        prompt_list = self._prompts(prompts, n)
        shape = self._latent_shape(num_frames, height, width, lowres)
        known, context_latents = self._context(context, context_frames, n, shape)
        if extend and not self.backbone.context_frames:
            raise ValueError("extend needs a model trained with context frames (context_frames=True)")
        batches = range(0, n, batch_size)
        total = len(batches) * steps * (1 + extend)
        out = []
        with tqdm(total=total, desc="denoising steps", disable=not progress, unit="step") as bar:
            for start in batches:
                part = slice(start, min(start + batch_size, n))
                generators = per_sample_generators(seeds[part], self.device)
                given = Conditioning(
                    labels=None if label_tensor is None else label_tensor[part].to(self.device)
                )
                if prompt_list is not None:
                    given.text, given.text_mask = self.text_encoder.encode(prompt_list[part], self.device)
                if lowres is not None:
                    given = self._lowres_condition(given, lowres[part], aug_level, seeds[part])
                ctx = None if context_latents is None else context_latents[part].to(self.device)
                settings = dict(
                    steps=steps,
                    guidance=guidance,
                    eta=eta,
                    sampler=sampler,
                    on_step=bar.update,
                    cache_threshold=cache_threshold,
                    guidance_interval=guidance_interval,
                )
                z = self._segment(shape, given, ctx, known, generators, settings)  # (b, C, T, h, w)
                for _ in range(extend):
                    z = self._extend(z, shape, given, generators, settings)
                out.append(z if output == "latent" else self.decode(z))
        videos = torch.cat(out)
        return to_uint8(videos).contiguous() if output == "uint8" else videos

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalized latents (B, C, T, h, w) -> pixels (B, 3, 1 + 4(T-1), 8h, 8w) in [-1, 1], on the CPU."""
        with self._autocast():
            video = self.tokenizer.decode(z.to(self.device), self.tokenizer_chunk_size)
        return video.float().clamp(-1, 1).cpu()

    # ---- the pieces of generate --------------------------------------------------------------------------

    def _segment(
        self,
        shape: tuple[int, ...],
        given: Conditioning,
        context: Tensor | None,
        known: int,
        generators: list[torch.Generator],
        settings: dict[str, Any],
    ) -> Tensor:
        """One clip of latents (b, C, T, h, w) on the CPU; the first ``known`` latent frames are ``context``'s."""
        b = len(generators)
        cond = dataclasses.replace(given)
        if known > 0:
            given = torch.full((b,), known, device=self.device)  # (b,)
            cond.context, cond.context_mask = context, context_mask(given, (b, *shape))  # (b, 1, T, h, w)
        noise = randn((b, *shape), generators, self.device)  # (b, C, T, h, w)
        net = self._denoiser(settings["cache_threshold"])
        z = sample(
            self._model_fn(cond, settings["guidance"], net, settings.get("guidance_interval")),
            noise,
            settings["steps"],
            sampler=settings["sampler"],
            eta=settings["eta"],
            schedule=self.schedule,
            generator=generators,
            on_step=lambda _: settings["on_step"](1),
        )
        if isinstance(net, FirstBlockCache):
            for key, count in net.stats.items():
                self.cache_stats[key] += count
        if known > 0:  # the given frames exactly
            z[:, :, :known] = context[:, :, :known]
        return z.cpu()

    def _extend(
        self,
        z: Tensor,
        shape: tuple[int, ...],
        given: Conditioning,
        generators: list[torch.Generator],
        settings: dict[str, Any],
    ) -> Tensor:
        """``z`` continued by one segment that starts from its last latent frames."""
        overlap = max(1, shape[1] // 2)
        context = torch.zeros(z.shape[0], *shape, device=self.device)  # (b, C, T, h, w)
        context[:, :, :overlap] = z[:, :, -overlap:].to(self.device)
        nxt = self._segment(shape, given, context, overlap, generators, settings)
        return torch.cat([z, nxt[:, :, overlap:]], dim=2)  # (b, C, T + T - overlap, h, w)

    def _denoiser(self, cache_threshold: float) -> WALT | FirstBlockCache:
        """The backbone, or a fresh first-block cache around it (one per sampling run: it holds its state)."""
        if cache_threshold == 0:
            return self.backbone
        return FirstBlockCache(self.backbone, cache_threshold, self._compiled, self._compile_mode)

    def _model_fn(
        self,
        cond: Conditioning,
        guidance: float,
        net: WALT | FirstBlockCache,
        interval: tuple[float, float] | None = None,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """The sampler's ``model_fn(x_t, t) -> v`` of ``net`` (the backbone or a cache around it): guidance
        (two passes, or the input w of a distilled model), then self-conditioning around it, under autocast."""
        backbone = self.backbone
        if backbone.guidance_input:
            cond.guidance = torch.full((cond_size(cond),), float(guidance), device=self.device)
            model = net
        else:
            model = guided(net, guidance, interval=interval) if guidance != 1.0 else net

        def autocast_model(x_t: Tensor, t: Tensor, c: Conditioning) -> Tensor:
            with self._autocast():
                return model(x_t, t, c).float()

        if backbone.self_conditioning:
            return self_conditioned(autocast_model, cond, self.schedule)
        return lambda x_t, t: autocast_model(x_t, t, cond)

    def _lowres_condition(
        self, given: Conditioning, lowres: Tensor, aug_level: float | None, seeds: Sequence[int]
    ) -> Conditioning:
        sr = self.super_resolution
        level_value = sr.aug_level if aug_level is None else aug_level
        if not 0.0 <= level_value <= 1.0:
            raise ValueError(f"aug_level is a diffusion time in [0, 1], got {level_value}")
        with self._autocast():
            clean = sr.latent(self.tokenizer, lowres.to(self.device), self.tokenizer_chunk_size).float()
        level = torch.full((clean.shape[0],), float(level_value), device=self.device)
        generators = per_sample_generators([s + STAGE_SEED_STRIDE for s in seeds], self.device)
        return dataclasses.replace(
            given, lowres=augment_lowres(clean, level, self.schedule, generators), aug_level=level
        )

    def _autocast(self):
        enabled = self.autocast_dtype is not None and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    # ---- arguments ---------------------------------------------------------------------------------------

    def check_guidance_interval(self, interval: tuple[float, float] | None, guidance: float) -> None:
        """Refuses a guidance interval that could not act as asked, naming what to do instead."""
        if interval is None:
            return
        check_interval(interval)
        if guidance == 1.0:
            raise ValueError(
                "guidance_interval with guidance 1 guides nowhere: set a guidance scale, or leave out the interval"
            )
        if self.backbone.guidance_input:
            raise ValueError(
                "guidance_interval needs two-pass guidance, and this guidance-distilled model takes w as an input: "
                "leave out the interval (guidance_interval=None, no --guidance-interval)"
            )

    @staticmethod
    def _check_settings(
        steps: int, guidance: float, eta: float, sampler: str, batch_size: int, output: str, extend: int
    ) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance}")
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM noise), got {eta}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if sampler == "dpmpp_2m" and eta != 0:
            raise ValueError("dpmpp_2m is deterministic: leave eta at 0, or use sampler='ddim' with eta")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if output not in ("uint8", "float", "latent"):
            raise ValueError(f"output must be 'uint8', 'float' or 'latent', got {output!r}")
        if extend < 0:
            raise ValueError(f"extend must be >= 0, got {extend}")

    def _count(self, labels, prompts, seeds, lowres, num_samples, context) -> tuple[int, list[int]]:
        """The number of samples and their seeds, from whichever arguments fix it."""
        counts = {}
        for name, value in (("labels", labels), ("prompts", prompts), ("seeds", seeds), ("lowres", lowres)):
            if value is not None and not isinstance(value, (int, str)) and not _is_scalar_tensor(value):
                counts[name] = len(value)
        if isinstance(context, (Tensor, np.ndarray)) and _context_is_batch(context):
            counts["context"] = len(context)
        if num_samples is not None:
            counts["num_samples"] = num_samples
        if len(set(counts.values())) > 1:
            raise ValueError(f"the sample counts disagree: {counts}; give lists of one length")
        n = next(iter(counts.values()), 1)
        if n < 1:
            raise ValueError("nothing to generate: the count of samples is 0")
        seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
        return n, seeds

    def _labels(self, labels, n: int) -> Tensor | None:
        num_classes = self.backbone.num_classes
        if num_classes is None:
            if labels is not None:
                raise ValueError("labels were given but the model is not class-conditional")
            return None
        if labels is None:
            return torch.arange(n) % num_classes  # every class in turn
        if isinstance(labels, Tensor):
            labels = labels.reshape(-1).tolist()
        items = [labels] * n if isinstance(labels, (int, str)) else list(labels)
        return torch.tensor([self.class_index(item) for item in items], dtype=torch.long)

    def class_index(self, label: int | str) -> int:
        """A class index from an index or a class name ("3", 3 or "red circle moving left"); -1 = null."""
        num_classes = self.backbone.num_classes
        if isinstance(label, str) and label.lstrip("-").isdigit():
            label = int(label)
        if isinstance(label, str):
            if label not in self.class_names:
                known = (
                    f"; known classes: {', '.join(self.class_names)}"
                    if self.class_names
                    else " (this model has no class names: give indices)"
                )
                raise ValueError(f"unknown class {label!r}{known}")
            return self.class_names.index(label)
        if not -1 <= int(label) < num_classes:
            raise ValueError(f"class index {label} is outside 0..{num_classes - 1} (-1 = unconditional)")
        return int(label)

    def _prompts(self, prompts, n: int) -> list[str] | None:
        if self.backbone.text_dim is None:
            if prompts is not None:
                raise ValueError("prompts were given but the model is not text-conditional")
            return None
        if prompts is None:
            raise ValueError('the model is text-to-video: give prompts ("" samples unconditionally)')
        return [prompts] * n if isinstance(prompts, str) else [str(p) for p in prompts]

    def _latent_shape(self, num_frames, height, width, lowres) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the latents to sample."""
        t, h, w = self.backbone.input_size
        if lowres is not None:
            sr = self.super_resolution
            if self.super_resolution is None:
                raise ValueError("lowres videos were given but the model is not a super-resolution stage")
            frames = 1 + sr.temporal_factor * (lowres.shape[2] - 1)
            height, width = lowres.shape[3] * sr.spatial_factor, lowres.shape[4] * sr.spatial_factor
            num_frames = frames if num_frames is None else num_frames
        elif self.super_resolution is not None:
            raise ValueError("a super-resolution stage upsamples given videos: pass lowres=(N, 3, T, h, w)")
        # The tokenizer's factors (4 in time, 8 in space for W.A.L.T's); without one, latents are the pixels.
        time, space = (1, 1) if self.tokenizer is None else self.tokenizer_factors()
        if num_frames is not None:
            if num_frames < 1 or (num_frames - 1) % time:
                raise ValueError(f"num_frames must be 1 + {time}k (e.g. {1 + 4 * time}), got {num_frames}")
            t = (num_frames - 1) // time + 1
        patch = space * self.backbone.patch_embed.patch_size
        for name, value in (("height", height), ("width", width)):
            if value is not None and (value < patch or value % patch):
                raise ValueError(
                    f"{name} must be a multiple of {patch} ({space} x the patch size), got {value}"
                )
        h = h if height is None else height // space
        w = w if width is None else width // space
        return self.backbone.in_channels, t, h, w

    def tokenizer_factors(self) -> tuple[int, int]:
        """(time, space): how many pixel frames and pixels one latent frame and cell stand for."""
        return self.tokenizer.temporal_factor, self.tokenizer.spatial_factor

    def _context(self, context, context_frames, n: int, shape) -> tuple[int, Tensor | None]:
        """Latent frames given and the context latents (N, C, T, h, w), from the pixel context."""
        if context is None:
            if context_frames is not None:
                raise ValueError("context_frames was given without a context")
            return 0, None
        if not self.backbone.context_frames:
            raise ValueError("a context was given but the model was not trained with context frames")
        video = _context_video(context)  # (B or 1, 3, T, H, W) float
        frames = video.shape[2] if context_frames is None else context_frames
        time, space = self.tokenizer_factors()
        if frames < 1 or (frames - 1) % time:
            raise ValueError(
                f"context_frames must be 1 + {time}j (1 = an image, {1 + time}, {1 + 2 * time}, ...), got {frames}"
            )
        if frames > video.shape[2]:
            raise ValueError(f"the context has {video.shape[2]} frames, fewer than context_frames={frames}")
        known = (frames - 1) // time + 1
        if known >= shape[1]:
            raise ValueError(
                f"context_frames={frames} leaves nothing to generate in {shape[1]} latent frames"
            )
        size = (shape[2] * space, shape[3] * space)
        video = torch.stack([resize_center_crop(v[:, :frames], size) for v in video])  # (B, 3, frames, H, W)
        with self._autocast():
            latent = self.tokenizer.encode(video.to(self.device), self.tokenizer_chunk_size).float()
        context_latents = torch.zeros(latent.shape[0], *shape)
        context_latents[:, :, :known] = latent.cpu()
        return known, context_latents.expand(n, -1, -1, -1, -1) if latent.shape[0] == 1 else context_latents


class CascadePipeline:
    """A base pipeline followed by super-resolution pipelines; labels, prompts, given frames (``context``) and
    seeds reach every stage that takes them. Stage i > 0 upsamples the previous stage's videos.
    ``stage_settings``: per stage, keyword arguments for its ``generate`` (steps, guidance, eta, sampler,
    aug_level, cache_threshold, guidance_interval)."""

    def __init__(self, stages: Sequence[Pipeline], stage_settings: Sequence[dict] | None = None) -> None:
        if not stages or stages[0].super_resolution is not None:
            raise ValueError("a cascade starts with a base model")
        if any(s.super_resolution is None for s in stages[1:]):
            raise ValueError("every stage after the first must be a super-resolution model")
        self.stages = list(stages)
        self.stage_settings = [dict(s) for s in (stage_settings or [{} for _ in stages])]
        if len(self.stage_settings) != len(self.stages):
            raise ValueError(f"{len(self.stage_settings)} stage settings for {len(self.stages)} stages")
        for i, (stage, settings) in enumerate(zip(self.stages, self.stage_settings)):
            if "guidance_interval" not in settings:
                continue
            try:  # before any stage samples: a bad setting of the last stage would waste the first's work
                stage.check_guidance_interval(
                    settings.get("guidance_interval"), settings.get("guidance", 1.0)
                )
            except ValueError as err:
                raise ValueError(f"stage {i}: {err}") from None

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> CascadePipeline:
        from walt.pipeline.files import load_cascade

        cascade = load_cascade(path)
        for stage in cascade.stages:
            stage.to(device, dtype)
        return cascade

    def save_pretrained(self, path: str | Path) -> Path:
        from walt.pipeline.files import save_cascade

        return save_cascade(self, path)

    @property
    def fps(self) -> float:
        return self.stages[-1].fps

    @torch.no_grad()
    def generate(
        self,
        labels=None,
        prompts=None,
        seeds: Sequence[int] | None = None,
        batch_size: int = 16,
        output: Output = "uint8",
        progress: bool = True,
        **base_kwargs: Any,
    ) -> Tensor:
        """The base stage's ``generate`` (with ``base_kwargs``: context, num_frames, ... and its settings), then
        every super-resolution stage on its result; same return convention as :meth:`Pipeline.generate`."""
        base = self.stages[0]
        first = {**self.stage_settings[0], **base_kwargs}
        videos = base.generate(
            labels, prompts, seeds=seeds, batch_size=batch_size, output="float", progress=progress, **first
        )
        n = videos.shape[0]
        seeds = list(range(n)) if seeds is None else list(seeds)
        if labels is not None and base.backbone.num_classes is not None:
            labels = base._labels(
                labels, n
            ).tolist()  # names resolved once, with the base model's class names
        for index, (stage, settings) in enumerate(zip(self.stages[1:], self.stage_settings[1:]), start=1):
            videos = stage.generate(
                labels=self._for_stage(stage, labels, "labels"),
                prompts=self._for_stage(stage, prompts, "prompts"),
                context=self._for_stage(stage, base_kwargs.get("context"), "context"),
                context_frames=self._for_stage(stage, base_kwargs.get("context_frames"), "context"),
                seeds=[s + index * STAGE_SEED_STRIDE for s in seeds],
                lowres=videos,
                batch_size=batch_size,
                output="float",
                progress=progress,
                **settings,
            )
        return to_uint8(videos).contiguous() if output == "uint8" else videos

    @staticmethod
    def _for_stage(stage: Pipeline, value, kind: str):
        """``value`` (labels, prompts or the given frames) if the stage takes it, else None."""
        backbone = stage.backbone
        takes = {"labels": backbone.num_classes is not None, "prompts": backbone.text_dim is not None}
        return value if takes.get(kind, backbone.context_frames) else None


def cond_size(cond: Conditioning) -> int:
    for value in (cond.labels, cond.text, cond.context, cond.lowres):
        if value is not None:
            return value.shape[0]
    raise ValueError("cannot tell the batch size from an empty conditioning")


def _is_scalar_tensor(value) -> bool:
    return isinstance(value, Tensor) and value.ndim == 0


def _context_is_batch(context) -> bool:
    """A batch of contexts: uint8 (N, T, H, W, 3) or float (N, 3, T, H, W)."""
    return context.ndim == 5


def _context_video(context) -> Tensor:
    """Any accepted context -> float (B, 3, T, H, W) in [-1, 1]."""
    if isinstance(context, (str, Path)):
        path = Path(context)
        if not path.is_file():
            raise FileNotFoundError(f"context file not found: {path}")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            from PIL import Image

            frames = np.array(Image.open(path).convert("RGB"))[None]  # (1, H, W, 3)
        else:
            from walt.data import read_video

            frames = read_video(path)  # (T, H, W, 3)
        return to_float_video(frames)[None]
    tensor = torch.as_tensor(context)
    if tensor.dtype == torch.uint8:  # (T, H, W, 3) or (N, T, H, W, 3)
        batch = tensor if tensor.ndim == 5 else tensor[None]
        return torch.stack([to_float_video(v) for v in batch])
    if tensor.ndim == 4:  # (3, T, H, W) float
        return tensor.float()[None]
    if tensor.ndim == 5:
        return tensor.float()
    raise ValueError(
        "context must be a file path, uint8 frames (T, H, W, 3) / (N, T, H, W, 3), or float (3, T, H, W) / "
        f"(N, 3, T, H, W) in [-1, 1]; got a tensor of shape {tuple(tensor.shape)}"
    )
